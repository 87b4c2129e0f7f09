"""spark-submit-able entry point: the teacher's architecture search (see
`patternlake tune teacher --help`).

spark-submit jobs/tune_teacher.py --set tune.n_trials=40 --set tune.parallel=4
"""

import sys

from patternlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", "teacher", *sys.argv[1:]]))
