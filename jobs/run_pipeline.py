"""spark-submit-able entry point: run a pipeline (see `patternlake run --help`).

spark-submit --master spark://host:7077 jobs/run_pipeline.py all --conf cluster --input /data/events
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
