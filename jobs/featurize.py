"""spark-submit-able entry point for the `featurize` stage (see `patternlake featurize --help`).

spark-submit jobs/featurize.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["featurize", *sys.argv[1:]]))
