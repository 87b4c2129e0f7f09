"""Teacher training: throughput per backend and quality against the baselines, one run.

    .venv/bin/python bench/train.py                       # generated data (conf defaults)
    .venv/bin/python bench/train.py --events 300000 --users 6000
    .venv/bin/python bench/train.py --input ml-100k/u.data --format tsv \\
        --map user_id=0,item_id=1,event_time=3,rating=2   # any MovieLens-style file

1. the data goes through ingest -> validate -> featurize -> segment into a fresh lake;
2. throughput: each backend trains the same number of epochs on the same pinned data
   (single process with 1 and 2 threads, Horovod x2 and DDP x2 with 1 thread each) and the
   training-loop samples/s are printed side by side;
3. quality: the teacher is trained to early stopping with Horovod x2 and evaluated with
   popularity and Markov on the protocol's test split (overall NDCG@10, HR@10, ...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from patternlake.config import GenerateConfig, load_config
from patternlake.evaluation.evaluate import evaluate_models
from patternlake.features.featurize import featurize
from patternlake.ingest.ingest import ingest, parse_mapping
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from patternlake.segments.segment import segment_users
from patternlake.spark import get_spark
from patternlake.synthetic.generate import generate
from patternlake.training.train import train_teacher


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", default=None, help="events to use instead of generated ones")
    ap.add_argument("--format", default=None)
    ap.add_argument("--map", dest="mapping", default=None)
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--throughput-epochs", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    overrides = [
        f"lake.root={work}/lake",
        f"models.root={work}/models",
        f"mlflow.tracking_uri=sqlite:///{work}/mlruns.db",
        f"mlflow.artifact_location={work}/artifacts",
        "validate.max_invalid_share=1.0",
    ]
    config = load_config("local", overrides)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    source = args.input
    if source is None:
        g = config.generate.model_dump()
        g.update({k: v for k, v in (("events", args.events), ("users", args.users)) if v})
        generate(GenerateConfig(**g), work / "data")
        source = str(work / "data" / "events")
    ingest(spark, lake, config, source, args.format, parse_mapping(args.mapping))
    validate_pending(spark, lake, config)
    featurize(spark, lake, config)
    segment_users(spark, lake, config)

    rows = []
    fixed = {"epochs": args.throughput_epochs, "patience": 10_000}
    for label, backend, extra in (
        ("single x1 (1 thread)", "single", {"threads_per_proc": 1}),
        ("single x1 (2 threads)", "single", {"threads_per_proc": 2}),
        ("horovod x2 (1 thread each)", "horovod", {"threads_per_proc": 1}),
        ("ddp x2 (1 thread each)", "ddp", {"threads_per_proc": 1}),
    ):
        cfg = config.model_copy(
            update={"train": config.train.model_copy(update={**fixed, **extra, "num_proc": 2})}
        )
        r = train_teacher(spark, lake, cfg, backend, fresh=True)
        rows.append((label, r["samples_per_s"], r["world"]))
    base = rows[0][1]
    print(f"\nthroughput, {args.throughput_epochs} epochs each on the same data (2 cores):")
    for label, sps, _world in rows:
        print(f"  {label:28s} {sps:9.0f} samples/s  ({sps / base:.2f}x single x1)")

    result = train_teacher(spark, lake, config, "horovod", fresh=True)
    report = evaluate_models(spark, lake, config)
    print(
        f"\nquality (teacher: Horovod x2, best epoch {result['best_epoch']}, {result['params']:,} params), "
        f"{report['protocol']['users']:,} test users, {report['protocol']['items']:,} items, "
        f"mask_history={report['protocol']['mask_history']}:"
    )
    keys = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "coverage@10")
    print(f"  {'model':12s} " + " ".join(f"{k:>11s}" for k in keys))
    for name, m in report["models"].items():
        print(f"  {name:12s} " + " ".join(f"{m['overall'][k]:11.4f}" for k in keys))
    t, mk = report["models"]["teacher"]["overall"], report["models"]["markov"]["overall"]
    print(f"  teacher/markov NDCG@10: {t['ndcg@10'] / mk['ndcg@10']:.2f}x")
    (work / "report.json").write_text(json.dumps(report))
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
