"""spark-submit-able entry point for the `ingest` stage (see `patternlake ingest --help`).

spark-submit jobs/ingest.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
