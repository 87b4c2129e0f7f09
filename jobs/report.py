"""spark-submit-able entry point: report (see `patternlake report --help`).

spark-submit --master spark://host:7077 jobs/report.py --conf cluster --out /dbfs/reports/today.html
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
