"""spark-submit-able entry point: forget-user (see `patternlake forget-user --help`).

spark-submit --master spark://host:7077 jobs/forget_user.py --conf cluster u123 u456
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["forget-user", *sys.argv[1:]]))
