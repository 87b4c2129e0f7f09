"""spark-submit-able entry point: distill (see `patternlake distill --help`).

spark-submit --master spark://host:7077 jobs/distill.py --conf cluster
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
