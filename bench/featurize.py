"""The data path at Spark speed: ingest + validate + featurize vs a bare Spark pass.

    .venv/bin/python bench/featurize.py                       # 10M events, then 1M and 30M
    .venv/bin/python bench/featurize.py --events 2000000 --scaling ""   # quicker look
    .venv/bin/python bench/featurize.py --profile             # + where the seconds go

Generated events (``patternlake generate``'s model: sessions, planted chains, 0.5%
re-delivered rows), ``users = events / 50``, 20,000 items, CSV in 8 files, local[2], all in
one Spark session, one run:

1. **bare pass**: read the CSV, group by user, sort each user's events
   (``sort_array(collect_list(struct))``), no write — what a hand-written job does at least;
2. **floor**: the writes the platform must make, by hand, no checks: CSV -> Parquet (bronze),
   Parquet -> deduplicated Parquet (silver, one shuffle by event id), Parquet -> per-user
   sorted arrays (one shuffle by user) -> Parquet;
3. **pipeline**: ``ingest`` (bronze), ``validate`` (Great Expectations suite, quarantine,
   dedupe, silver), ``featurize --full`` (item index, sequences, features) into a fresh lake;
4. **incremental day**: the next 1% of events (the last of 101 generated days, the users who
   were active that day) on top of the lake of step 3 (``featurize`` incremental), against the
   same day processed alone in a fresh lake;
5. **scaling**: the pipeline on each size of ``--scaling`` (fresh lake each).

Prints per stage seconds, the ratios (targets: pipeline <= 1.5x the bare pass; incremental
day <= 1.1x the day alone; time linear in events) and events/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config, load_config
from patternlake.features.featurize import featurize
from patternlake.ingest.ingest import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from patternlake.spark import get_spark
from patternlake.synthetic.generate import generate_events

FILES = 8


def write_events(table, folder: Path, files: int) -> str:
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        pacsv.write_csv(
            table.slice(bounds[i], bounds[i + 1] - bounds[i]), folder / f"part-{i:05d}.csv"
        )
    return str(folder)


def make_data(config: Config, events: int, items: int, work: Path, day: bool) -> dict:
    """``events`` rows (time-ordered, 8 files); with ``day``, 1% more over one more day
    (generated together, so the day's users are the lake's users)."""
    total = events + (events // 100 if day else 0)
    params = config.generate.model_copy(
        update={
            "events": total,
            "users": max(events // 50, 100),
            "items": items,
            "days": 101 if day else 100,
            "format": "csv",
            "files": FILES,
        }
    )
    t = time.perf_counter()
    table = generate_events(params).events
    n_hist = round(table.num_rows * events / total)
    out = {"history": write_events(table.slice(0, n_hist), work / f"hist-{events}", FILES)}
    out["rows"] = n_hist
    if day:
        rest = table.slice(n_hist)
        out["day"] = write_events(rest, work / f"day-{events}", 1)
        out["day_rows"] = rest.num_rows
    print(f"generated {table.num_rows:,} rows in {time.perf_counter() - t:.1f}s", flush=True)
    return out


def bare_pass(spark: SparkSession, path: str) -> float:
    t0 = time.perf_counter()
    df = spark.read.option("header", "true").csv(path)
    grouped = df.groupBy("user_id").agg(
        F.sort_array(F.collect_list(F.struct("event_time", "item_id", "event_type"))).alias(
            "events"
        )
    )
    grouped.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def floor(spark: SparkSession, path: str, out: Path) -> dict[str, float]:
    """The writes that must happen, by hand: bronze, deduplicated silver, per-user arrays."""
    t = {}
    t0 = time.perf_counter()
    spark.read.option("header", "true").csv(path).write.parquet(str(out / "bronze"))
    t["bronze"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = Window.partitionBy("event_id").orderBy("event_time")
    (
        spark.read.parquet(str(out / "bronze"))
        .withColumn("_n", F.row_number().over(first))
        .filter("_n = 1")
        .drop("_n")
        .write.parquet(str(out / "silver"))
    )
    t["silver"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    (
        spark.read.parquet(str(out / "silver"))
        .groupBy("user_id")
        .agg(
            F.sort_array(F.collect_list(F.struct("event_time", "item_id", "event_type"))).alias(
                "events"
            )
        )
        .write.parquet(str(out / "gold"))
    )
    t["gold"] = time.perf_counter() - t0
    return t


def pipeline(spark: SparkSession, config: Config, path: str, full: bool = True) -> dict:
    lake = Lake(spark, config.lake)
    t = {}
    t0 = time.perf_counter()
    ingest(spark, lake, config, path)
    t["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    validate_pending(spark, lake, config)
    t["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    featurize(spark, lake, config, full=full)
    t["featurize"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t


def stages(t: dict) -> str:
    return " + ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total") + (
        f" = {t['total']:.1f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument(
        "--scaling", default="1000000,30000000", help="other sizes for the scaling table"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--profile", action="store_true", help="Spark event log, summarised per job label"
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    config = load_config("local", [f"lake.root={work}/lake"])
    if args.profile:
        (work / "events").mkdir()
        config.spark.conf.update(
            {
                "spark.eventLog.enabled": "true",
                "spark.eventLog.dir": str(work / "events"),
                "spark.eventLog.compress": "false",
            }
        )
    data = make_data(config, args.events, args.items, work, day=True)
    n = data["rows"]
    spark = get_spark(config.spark)

    bare_pass(spark, data["history"])  # warm-up: JVM, file cache
    base = bare_pass(spark, data["history"])
    low = floor(spark, data["history"], work / "floor")
    low_total = sum(low.values())

    windows = {}
    w0 = time.time()
    full = pipeline(spark, config, data["history"])
    windows["pipeline"] = (w0, time.time())

    w0 = time.time()
    on_top = pipeline(spark, config, data["day"], full=False)
    windows["day on top"] = (w0, time.time())
    alone_conf = load_config("local", [f"lake.root={work}/lake-day"])
    alone = pipeline(spark, alone_conf, data["day"])

    print(f"\nevents={n:,} users={max(n // 50, 100):,} items={args.items:,} (local[2], CSV)")
    print(f"bare pass read+groupBy+sort: {base:.1f}s ({n / base / 1e6:.2f} M events/s)")
    print(f"floor (bronze, silver, gold writes by hand): {stages({**low, 'total': low_total})}")
    print(f"pipeline: {stages(full)} ({n / full['total'] / 1e6:.2f} M events/s)")
    print(
        f"ratio pipeline/bare pass: {full['total'] / base:.2f}x (target <= 1.50x); "
        f"floor/bare pass: {low_total / base:.2f}x; pipeline/floor: {full['total'] / low_total:.2f}x"
    )
    print(f"\nincremental day ({data['day_rows']:,} events, 1% on top of {n:,}):")
    print(f"  on top of the lake: {stages(on_top)}")
    print(f"  alone, fresh lake:  {stages(alone)}")
    print(f"  ratio: {on_top['total'] / alone['total']:.2f}x (target <= 1.10x)")

    sizes = {n: full["total"]}
    for size in [int(s) for s in args.scaling.split(",") if s.strip()]:
        spark.catalog.clearCache()
        d = make_data(config, size, args.items, work / f"scale-{size}", day=False)
        conf = load_config("local", [f"lake.root={work}/lake-{size}"])
        t = pipeline(spark, conf, d["history"])
        sizes[d["rows"]] = t["total"]
        print(f"  {d['rows']:,} events: {stages(t)}", flush=True)
        shutil.rmtree(work / f"scale-{size}", ignore_errors=True)
        shutil.rmtree(work / f"lake-{size}", ignore_errors=True)
    if len(sizes) > 1:
        print("\nscaling (fresh lake each):")
        print(f"  {'events':>12} {'seconds':>8} {'M events/s':>11} {'s per M events':>15}")
        for size, secs in sorted(sizes.items()):
            print(
                f"  {size:>12,} {secs:>8.1f} {size / secs / 1e6:>11.3f} {secs / size * 1e6:>15.2f}"
            )
    spark.stop()
    if args.profile:
        from sparkprofile import render, summarise

        print()
        print(render(summarise(work / "events", windows), top=60))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
