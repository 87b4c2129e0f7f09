"""Lake write overhead: the same DataFrame through the lake layer vs plain Parquet.

    .venv/bin/python bench/lake_write.py [--rows 5000000] [--repeats 3]

Both writes run in one Spark session on the same cached DataFrame, interleaved, and the
median of each is compared. Target: lake write within 1.3x of `df.write.parquet`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.lake import Lake
from patternlake.spark import get_spark


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    config = load_config("local", [f"lake.root={work}/lake"])
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    df = (
        spark.range(args.rows, numPartitions=4)
        .select(
            F.concat(F.lit("u"), (F.col("id") % 200_000).cast("string")).alias("user_id"),
            F.concat(F.lit("i"), (F.col("id") * 7919 % 20_000).cast("string")).alias("item_id"),
            F.element_at(
                F.array(F.lit("view"), F.lit("cart"), F.lit("buy")),
                (F.col("id") % 3 + 1).cast("int"),
            ).alias("event_type"),
            (F.lit(1_767_225_600_000) + F.col("id") * 997).alias("event_time"),
            (F.col("id") % 1000 / 10.0).alias("price"),
        )
        .cache()
    )
    df.count()

    plain, via_lake = [], []
    for i in range(-1, args.repeats):  # run -1 warms up the JVM and is not counted
        out = work / f"plain-{i}"
        t = time.perf_counter()
        df.write.parquet(str(out))
        if i >= 0:
            plain.append(time.perf_counter() - t)
        shutil.rmtree(out)

        t = time.perf_counter()
        lake.write(df, str(work / f"lake-{i}"), "overwrite")
        if i >= 0:
            via_lake.append(time.perf_counter() - t)
        assert lake.read(str(work / f"lake-{i}")).count() == args.rows
        shutil.rmtree(work / f"lake-{i}")

    p, lk = statistics.median(plain), statistics.median(via_lake)
    print(f"rows={args.rows} repeats={args.repeats} engine={lake.engine.name}")
    print(f"plain parquet write: median {p:.2f}s  runs {[round(x, 2) for x in plain]}")
    print(f"lake write:          median {lk:.2f}s  runs {[round(x, 2) for x in via_lake]}")
    print(f"ratio lake/plain: {lk / p:.2f}x (target <= 1.30x)")
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
