"""Featurization overhead: ingest + validate + featurize vs a bare Spark baseline.

    .venv/bin/python bench/featurize.py [--events 10000000] [--users 200000] [--items 20000]

Both run in one Spark session on the same generated CSV files: the baseline reads them,
groups by user and sorts each user's events (sort_array(collect_list)); the pipeline runs
ingest (bronze), validate (Great Expectations + quarantine + dedupe into silver) and a full
featurize (item index, sequences, features) into a fresh lake. Prints both times, the
ratio (target <= 1.5x) and events/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.features.featurize import featurize
from patternlake.ingest.bronze import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from patternlake.spark import get_spark
from patternlake.synthetic.generate import GenerateParams, generate


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    config = load_config("local", [f"lake.root={work}/lake"])
    params = GenerateParams(
        **{
            **config.generate.model_dump(),
            "events": args.events,
            "users": args.users,
            "items": args.items,
            "format": "csv",
            "files": 8,
        }
    )
    t = time.perf_counter()
    meta = generate(params, work / "data")
    print(f"generated {meta['rows']:,} rows in {time.perf_counter() - t:.1f}s")
    events = str(work / "data" / "events")

    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)

    def baseline() -> float:
        t0 = time.perf_counter()
        df = spark.read.option("header", "true").csv(events)
        grouped = df.groupBy("user_id").agg(
            F.sort_array(F.collect_list(F.struct("event_time", "item_id", "event_type"))).alias(
                "events"
            )
        )
        grouped.write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t0

    baseline()  # warm-up: JVM, file cache
    base = baseline()

    t0 = time.perf_counter()
    ingest(spark, lake, config, events)
    t1 = time.perf_counter()
    validate_pending(spark, lake, config)
    t2 = time.perf_counter()
    featurize(spark, lake, config, full=True)
    t3 = time.perf_counter()
    pipeline = t3 - t0
    n = meta["rows"]
    print(f"events={n:,} users={args.users:,} items={args.items:,} (local[2])")
    print(f"baseline read+groupBy+sort: {base:.1f}s ({n / base / 1e6:.2f} M events/s)")
    print(
        f"ingest {t1 - t0:.1f}s + validate {t2 - t1:.1f}s + featurize {t3 - t2:.1f}s = {pipeline:.1f}s "
        f"({n / pipeline / 1e6:.2f} M events/s)"
    )
    print(f"ratio pipeline/baseline: {pipeline / base:.2f}x (target <= 1.50x)")
    spark.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
