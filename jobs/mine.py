"""spark-submit-able entry point for the `mine` stage (see `patternlake mine --help`).

spark-submit jobs/mine.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
