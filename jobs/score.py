"""spark-submit-able entry point: score (see `patternlake score --help`).

spark-submit --master spark://host:7077 jobs/score.py --conf cluster --run-id 2026-11-22
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
