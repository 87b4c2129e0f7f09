"""spark-submit-able entry point: compress (see `patternlake compress --help`).

spark-submit --master spark://host:7077 jobs/compress.py --conf cluster
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
