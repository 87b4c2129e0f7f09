"""spark-submit-able entry point: heads (see `patternlake heads --help`).

spark-submit --master spark://host:7077 jobs/heads.py --conf cluster
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["heads", *sys.argv[1:]]))
