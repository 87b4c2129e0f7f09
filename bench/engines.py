"""The lake's engine side by side: delta-spark (this checkout) against the delta-rs writer it
replaced (Spark writing Parquet, delta-rs committing the log; the code of ``--old``, checked
out into a temporary git worktree), on the same generated events, in one run.

    .venv/bin/python bench/engines.py                      # 10M events
    .venv/bin/python bench/engines.py --events 2000000     # quicker look

For each engine, a process of its own (its own Spark session, local[2]) runs on a fresh lake:

1. **pipeline**: ``ingest`` (bronze) + ``validate`` (silver, quarantine) + ``featurize --full``
   (item index, user sequences, user features);
2. **1% merge**: 1% of the users' ``user_features`` rows changed, half of them new users,
   merged into the table on ``user_id`` (what an incremental day does to the gold tables);
3. **1% delete**: the rows of 1% of the users deleted from ``silver_events`` (forget-user's
   core, at scale).

The floor of step 1 is the same writes by hand with no checks (plain Parquet: bronze,
deduplicated silver, per-user sorted arrays; ``bench/featurize.py``'s floor), measured in the
same run. Prints each engine's seconds per step and the ratios delta-spark / delta-rs and
pipeline / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
# the last commit with the delta-rs writer (lake/deltars.py)
OLD_WRITER = "b2c2a3b"


def worker(lake_root: str, data: str, settings: list[str]) -> dict:
    """One engine's steps, in this process (patternlake from whichever tree is on the path)."""
    from featurize import pipeline
    from pyspark.sql import functions as F

    import patternlake
    from patternlake.config import load_config
    from patternlake.lake import Lake
    from patternlake.spark import get_spark

    config = load_config("local", [f"lake.root={lake_root}", *settings], environ={})
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    out = {"engine": lake.engine.name, "package": patternlake.__file__}
    out["pipeline"] = pipeline(spark, config, data)

    features = lake.read("user_features")
    n_users = features.count()
    changed = features.sample(fraction=0.005, seed=1).withColumn("n_events", F.col("n_events") + 1)
    fresh = features.sample(fraction=0.005, seed=2).withColumn(
        "user_id", F.concat(F.lit("new-"), F.col("user_id"))
    )
    source = changed.unionByName(fresh).localCheckpoint()
    n_new = source.filter(F.col("user_id").startswith("new-")).count()
    t0 = time.perf_counter()
    lake.merge(source, "user_features", keys=["user_id"])
    out["merge_1pct"] = time.perf_counter() - t0
    out["merge_rows"] = source.count()
    assert lake.read("user_features").count() == n_users + n_new

    gone = [
        r.user_id
        for r in lake.read("user_features")
        .sample(fraction=0.01, seed=3)
        .select("user_id")
        .collect()
    ]
    before = lake.read("silver_events").count()
    t0 = time.perf_counter()
    if hasattr(lake, "update"):  # delta-spark: a Delta DELETE by a Column
        deleted = lake.delete("silver_events", F.col("user_id").isin(gone))
    else:  # the delta-rs writer: forget-user's copy-on-write rewrite
        cond = F.col("user_id").isin(gone)
        r = lake.rewrite("silver_events", cond, lambda df: df.filter(~cond))
        deleted = r["rows_before"] - r["rows_after"]
    out["delete_1pct"] = time.perf_counter() - t0
    out["deleted_rows"] = deleted
    assert lake.read("silver_events").count() == before - deleted
    spark.stop()
    return out


def run_engine(name: str, tree: Path, work: Path, data: str, settings: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "libs")}
    cmd = [sys.executable, str(HERE / "engines.py"), "--worker", str(work / f"lake-{name}"), data]
    cmd += [x for s in settings for x in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t0
    assert Path(result["package"]).is_relative_to(tree), result["package"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--old", default=OLD_WRITER, help="commit with the delta-rs writer")
    ap.add_argument("--worker", nargs=2, metavar=("LAKE", "DATA"), help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.set), default=str), flush=True)
        return

    from featurize import floor, make_data

    from patternlake.config import load_config
    from patternlake.spark import get_spark

    settings = ["spark.master=local[2]", "spark.shuffle_partitions=16", "spark.driver_memory=6g"]
    work = Path(tempfile.mkdtemp(prefix="pl-engines-"))
    old_tree = work / "old"
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.old],
            check=True,
            capture_output=True,
        )
        config = load_config("local", [f"lake.root={work / 'floor-lake'}", *settings], environ={})
        data = make_data(config, args.events, args.items, work, day=False)
        spark = get_spark(config.spark)
        t0 = time.perf_counter()
        f = floor(spark, data["history"], work / "floor")
        f["total"] = time.perf_counter() - t0
        spark.stop()
        print(f"floor (plain Parquet, no checks): {f['total']:.1f}s", flush=True)

        results = {}
        for name, tree in (("delta-spark", REPO), ("delta-rs", old_tree)):
            results[name] = run_engine(name, tree, work, data["history"], settings)
            r = results[name]
            p = r["pipeline"]
            print(
                f"{name:12s} ingest {p['ingest']:.1f}s + validate {p['validate']:.1f}s + "
                f"featurize {p['featurize']:.1f}s = {p['total']:.1f}s; merge 1% "
                f"({r['merge_rows']:,} rows) {r['merge_1pct']:.1f}s; delete 1% "
                f"({r['deleted_rows']:,} rows) {r['delete_1pct']:.1f}s",
                flush=True,
            )
        new, old = results["delta-spark"], results["delta-rs"]
        print(f"\n{args.events:,} events, {data['rows']:,} rows ingested, local[2]")
        print(f"{'step':24s} {'delta-spark':>12s} {'delta-rs':>10s} {'ratio':>7s}")
        for step in ("ingest", "validate", "featurize", "total"):
            a, b = new["pipeline"][step], old["pipeline"][step]
            print(f"pipeline {step:15s} {a:11.1f}s {b:9.1f}s {a / b:6.2f}x")
        for step in ("merge_1pct", "delete_1pct"):
            a, b = new[step], old[step]
            print(f"{step:24s} {a:11.1f}s {b:9.1f}s {a / b:6.2f}x")
        print(
            f"pipeline / floor: delta-spark {new['pipeline']['total'] / f['total']:.2f}x, "
            f"delta-rs {old['pipeline']['total'] / f['total']:.2f}x (floor {f['total']:.1f}s)"
        )
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)],
            capture_output=True,
        )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
