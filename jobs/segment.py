"""spark-submit-able entry point for the `segment` stage (see `patternlake segment --help`).

spark-submit jobs/segment.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
