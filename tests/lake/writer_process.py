"""A separate writer process for the lake contract tests (concurrency, crash).

usage: python writer_process.py TABLE_URI LAKE_ROOT ID_OFFSET BATCHES ROWS [BARRIER_DIR NAME PEERS]
Appends BATCHES DataFrames of ROWS rows (ids from ID_OFFSET) to TABLE_URI through the lake
layer. With a barrier, it waits until PEERS processes are ready before the first write.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark


def main() -> None:
    uri, root, offset, batches, rows = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    config = load_config(
        "local",
        [
            f"lake.root={root}",
            "spark.master=local[1]",
            "spark.shuffle_partitions=1",
            "spark.driver_memory=1g",
        ],
        environ={},
    )
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    if len(sys.argv) > 6:
        barrier, name, peers = Path(sys.argv[6]), sys.argv[7], int(sys.argv[8])
        (barrier / name).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < peers and time.time() < deadline:
            time.sleep(0.05)
    for b in range(batches):
        start = offset + b * rows
        df = (
            spark.range(start, start + rows, numPartitions=2)
            .withColumn("payload", F.sha2(F.col("id").cast("string"), 256))
            .withColumn("writer", F.lit(offset))
        )
        version = lake.write(df, uri, "append")
        print(f"wrote batch {b} -> version {version}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
