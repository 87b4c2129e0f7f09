"""spark-submit-able entry point for the `item_stats` stage (see `patternlake item stats --help`).

spark-submit jobs/item_stats.py [OPTIONS] [--conf cluster] [--set key=value]
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["item", "stats", *sys.argv[1:]]))
