"""spark-submit-able entry point: train the teacher (see `patternlake train --help`).

spark-submit --master spark://host:7077 jobs/train.py --backend horovod --conf cluster
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
