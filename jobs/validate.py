"""spark-submit-able entry point for the `validate` stage (see `patternlake validate --help`).

spark-submit jobs/validate.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
