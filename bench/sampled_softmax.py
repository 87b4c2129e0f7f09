"""Sampled vs full softmax: the teacher's validation NDCG@10 on generated data, one run.

    .venv/bin/python bench/sampled_softmax.py [--users 6000] [--events 300000]
        [--items 20000] [--epochs 30] [--sampled-epochs N] [--negatives 1024[,4096]]
        [--backend single]

The generated events go through ingest -> validate -> featurize -> segment into a fresh
lake; the teacher is then trained twice on the same pinned data with the same seed and
schedule, once with ``teacher.softmax: full`` and once with ``sampled``
(``teacher.sampled_softmax`` negatives drawn by popularity^0.75 plus the batch's targets,
logQ-corrected; the item table updated row-wise by LazyAdamW), each to early stopping on
validation (at most ``--epochs``). Printed: each run's best validation NDCG@10 (the sample
of ``train.valid_users`` users), its best epoch, training targets/s, and the ratio sampled /
full. Target: the ratio >= 0.98. Test targets are not read.

``--sampled-epochs`` gives the sampled runs their own epoch budget (the cosine schedule
decays over it): a sampled epoch costs a fraction of a full one, so equal wall time means
more of them. ``--negatives`` runs the sampled softmax once per negatives count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from patternlake.config import GenerateConfig, load_config
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
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--sampled-epochs", type=int, default=0, help="0: --epochs")
    ap.add_argument("--negatives", default="", help="comma-separated; default conf's")
    ap.add_argument("--backend", default="single")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-sampled-"))
    overrides = [
        f"lake.root={work}/lake",
        f"models.root={work}/models",
        f"mlflow.tracking_uri=sqlite:///{work}/mlruns.db",
        f"mlflow.artifact_location={work}/artifacts",
    ]
    config = load_config("local", overrides)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    g = config.generate.model_dump() | {
        "users": args.users,
        "events": args.events,
        "items": args.items,
    }
    generate(GenerateConfig(**g), work / "data")
    ingest(spark, lake, config, str(work / "data" / "events"), None, parse_mapping(None))
    validate_pending(spark, lake, config)
    featurize(spark, lake, config)
    segment_users(spark, lake, config)

    runs = {}
    negatives = [int(n) for n in args.negatives.split(",") if n] or [config.teacher.sampled_softmax]
    variants = [("full", "full", config.teacher.sampled_softmax, args.epochs)] + [
        (f"sampled {n}", "sampled", n, args.sampled_epochs or args.epochs) for n in negatives
    ]
    for name, mode, n, epochs in variants:
        cfg = config.model_copy(
            update={
                "teacher": config.teacher.model_copy(
                    update={"softmax": mode, "sampled_softmax": n}
                ),
                "train": config.train.model_copy(update={"epochs": epochs}),
            }
        )
        r = train_teacher(spark, lake, cfg, args.backend, fresh=True)
        runs[name] = {
            "valid_ndcg@10": r["best_valid_ndcg@10"],
            "best_epoch": r["best_epoch"],
            "epochs": len(r["history"]),
            "targets_per_s": r["samples_per_s"],
            "train_s": round(sum(h["seconds"] for h in r["history"]), 1),
        }
    full = max(1e-12, runs["full"]["valid_ndcg@10"])
    ratios = {name: r["valid_ndcg@10"] / full for name, r in runs.items() if name != "full"}
    print(
        f"\nteacher on generated data: {args.users:,} users, {args.events:,} events, "
        f"{args.items:,} items; backend {args.backend}, early stopping on validation "
        f"(at most {args.epochs} epochs full, {args.sampled_epochs or args.epochs} sampled)"
    )
    print(
        f"{'softmax':13s} {'valid NDCG@10':>14s} {'best epoch':>11s} {'epochs':>7s} "
        f"{'targets/s':>10s} {'train s':>8s}"
    )
    for name, r in runs.items():
        print(
            f"{name:13s} {r['valid_ndcg@10']:14.4f} {r['best_epoch']:11d} {r['epochs']:7d} "
            f"{r['targets_per_s']:10,.0f} {r['train_s']:8.0f}"
        )
    for name, ratio in ratios.items():
        print(f"{name} / full validation NDCG@10: {ratio:.3f} (target >= 0.98)")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "runs": runs, "ratios": ratios}, indent=1)
        )


if __name__ == "__main__":
    main()
