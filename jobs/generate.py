"""spark-submit-able entry point: synthetic events with planted patterns.

spark-submit jobs/generate.py --out data/demo --events 1000000
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
