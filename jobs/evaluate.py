"""spark-submit-able entry point: evaluate the registered teacher and the baselines.

spark-submit jobs/evaluate.py --json
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
