"""Where the data path's seconds go, piece by piece: each step of ingest's parse and of
validate's two passes run alone into Spark's ``noop`` sink (best of two), next to a plain CSV
read and a plain CSV -> Parquet copy, in one session.

    .venv/bin/python bench/data_path_parts.py 500000

Read the differences between consecutive lines: what each added piece costs.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize import make_data
from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.ingest.ingest import ingest
from patternlake.ingest.sources import fingerprint, list_source_files, read_events
from patternlake.lake import Lake
from patternlake.quality.suite import load_suite, row_reasons, with_violation_flags
from patternlake.quality.validate import keyed_by_event_id, ranked_by_event_id, typed_events
from patternlake.spark import get_spark


def t(label, df, reps=2):
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        df.write.format("noop").mode("overwrite").save()
        best = min(best, time.perf_counter() - t0)
    print(f"{label:55s} {best:6.1f}s", flush=True)


def measure(events: int, work: Path) -> None:
    config = load_config("local", [f"lake.root={work}/lake"])
    data = make_data(config, events, 20000, work, day=False)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    path = data["history"]
    t("warm csv", spark.read.option("header", "true").csv(path), 1)
    t("csv read all strings", spark.read.option("header", "true").csv(path))
    files = [fingerprint(f) for f in list_source_files(path)]
    ev = read_events(
        spark,
        files,
        "csv",
        dict(config.ingest.mapping),
        set(),
        config.ingest.header,
        config.ingest.sep,
    )
    t("read_events", ev)
    t("read_events no ordinal/file", ev.drop("_line_ordinal", "_source_file"))
    t("read_events no props", ev.drop("properties"))
    t0 = time.perf_counter()
    ingest(spark, lake, config, path)
    print(f"{'ingest':55s} {time.perf_counter() - t0:6.1f}s")
    t0 = time.perf_counter()
    spark.read.option("header", "true").csv(path).write.parquet(str(work / "plain"))
    print(f"{'plain csv->parquet':55s} {time.perf_counter() - t0:6.1f}s")
    bronze = lake.read("bronze_events")
    t("bronze read all", bronze)
    typed = typed_events(bronze, config.ingest.default_event_type)
    t("typed", typed)
    suite = load_suite(config.validate_)
    tagged = with_violation_flags(typed, suite).withColumn("reasons", row_reasons(suite))
    t("tagged", tagged)
    t("tagged filter bad", tagged.filter(F.size("reasons") > 0))
    typed2 = typed.drop("event_id").withColumn("event_id", F.col("_line_ordinal").cast("string"))
    t("typed without sha2 event id", typed2)
    ranked = ranked_by_event_id(keyed_by_event_id(tagged))
    t("ranked firsts", ranked.filter("_valid and _n = 1"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("events", type=int, nargs="?", default=2_000_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    try:
        measure(args.events, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
