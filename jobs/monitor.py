"""spark-submit-able entry point: monitor (see `patternlake monitor --help`).

spark-submit --master spark://host:7077 jobs/monitor.py --conf cluster --auto-retrain
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
