"""A separate writer process for the lake contract tests (concurrency, crash).

usage: python writer_process.py TABLE_URI LAKE_ROOT ID_OFFSET BATCHES ROWS [BARRIER_DIR NAME PEERS]
Writes BATCHES DataFrames of ROWS rows (ids from ID_OFFSET, ``writer`` = ID_OFFSET) to
TABLE_URI through the lake layer. With a barrier, it waits until PEERS processes are ready
before the first write.

Environment:
  PL_WRITER_OP   append (default), overwrite, or merge (upsert on ``id``)
  PL_PAUSE_AT    write: hold inside the Spark job writing the staged Parquet files;
                 commit: hold just before the first commit (files already moved into the table)
  PL_PAUSE_DIR   where the writer creates ``paused`` once held, and waits for ``release``
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark


def hold(pause_dir: str) -> None:
    """Signal that this writer is held, then wait until the test releases it."""
    Path(pause_dir, "paused").touch()
    deadline = time.time() + 300
    while not Path(pause_dir, "release").exists() and time.time() < deadline:
        time.sleep(0.05)


def hold_before_first_commit(pause_dir: str) -> None:
    from deltalake import DeltaTable

    commit = DeltaTable.create_write_transaction
    held = []

    def held_commit(self, *args, **kwargs):
        if not held:
            held.append(True)
            hold(pause_dir)
        return commit(self, *args, **kwargs)

    DeltaTable.create_write_transaction = held_commit


def main() -> None:
    uri, root, offset, batches, rows = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    op = os.environ.get("PL_WRITER_OP", "append")
    pause_at, pause_dir = os.environ.get("PL_PAUSE_AT"), os.environ.get("PL_PAUSE_DIR", "")
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
    if pause_at == "commit":
        hold_before_first_commit(pause_dir)
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
        if pause_at == "write":

            @F.udf("string")
            def held_payload(value: str) -> str:
                hold(pause_dir)
                return value

            df = df.withColumn("payload", held_payload("payload"))
        version = lake.merge(df, uri, keys=["id"]) if op == "merge" else lake.write(df, uri, op)
        print(f"wrote batch {b} -> version {version}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
