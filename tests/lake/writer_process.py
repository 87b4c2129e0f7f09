"""A separate writer process for the lake contract tests (concurrency, crash).

usage: python writer_process.py TABLE_URI LAKE_ROOT ID_OFFSET BATCHES ROWS [BARRIER_DIR NAME PEERS]
Writes BATCHES DataFrames of ROWS rows (ids from ID_OFFSET, ``writer`` = ID_OFFSET) to
TABLE_URI through the lake layer, each commit tagged ``probe=writer-<ID_OFFSET>``, and
prints ``wrote batch B -> version V`` per batch. With a barrier, it waits until PEERS
processes are ready before the first write.

Environment:
  PL_WRITER_OP   append (default), overwrite, merge (upsert on ``id``), delete (the rows
                 with ``id`` = ID_OFFSET; held while Delta evaluates the predicate), replace_where
                 (overwrite of partition ``part`` = ID_OFFSET, partitioned by ``part``), or
                 add_column (an append with one more column, ``c<ID_OFFSET>``, merge_schema)
  PL_PAUSE_AT    write: hold inside the Spark job that writes the data (after the operation
                 read the table's snapshot, before it commits)
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
    if len(sys.argv) > 6:
        barrier, name, peers = Path(sys.argv[6]), sys.argv[7], int(sys.argv[8])
        (barrier / name).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < peers and time.time() < deadline:
            time.sleep(0.05)
    probe = {"probe": f"writer-{offset}"}
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
        if op == "delete":
            held = F.col("id")
            if pause_at == "write":

                @F.udf("long")
                def held_id(value: int) -> int:
                    hold(pause_dir)
                    return value

                held = held_id("id")
            n = lake.delete(uri, held == F.lit(offset), commit_info=probe)
            print(f"deleted {n}", flush=True)
            continue
        if op == "merge":
            version = lake.merge(df, uri, keys=["id"], commit_info=probe)
        elif op == "replace_where":
            df = df.withColumn("part", F.lit(offset))
            version = lake.write(
                df,
                uri,
                "overwrite",
                partition_by=["part"],
                replace_where={"part": offset},
                commit_info=probe,
            )
        elif op == "add_column":
            df = df.withColumn(f"c{offset}", F.lit(offset))
            version = lake.write(df, uri, merge_schema=True, commit_info=probe)
        else:
            version = lake.write(df, uri, op, commit_info=probe)
        print(f"wrote batch {b} -> version {version}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
