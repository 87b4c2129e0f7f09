"""Teacher variants side by side on one pinned lake: validation and test NDCG@10 per
setting (and per seed), next to the first-order Markov baseline of the same split.

    .venv/bin/python bench/teacher_variants.py --data generated \\
        --variant base: --variant seen:teacher.seen_bias=true
    .venv/bin/python bench/teacher_variants.py --data ml-100k --seeds 7,8 \\
        --variant base: --variant seen+ema:teacher.seen_bias=true,train.ema_decay=0.995

The lake (generated data with planted chains: conf's ``generate`` section, or public
MovieLens-100k) is built once in ``--work`` (ingest -> validate -> featurize -> segment ->
mine, as bench/compress.py does); every variant then trains the teacher single-process on
the same pinned ``user_sequences`` version with conf's settings plus the variant's
``--set``-style overrides (one process training what ``train.num_proc`` processes would:
their global batch at their scaled learning rate, ``train_spec.on_one_process``), early stopping on validation targets only (best epoch kept; with
``train.members`` > 1 an ensemble), and is scored on the test targets: full ranking,
nothing masked, patternlake's rank rule. Only validation should pick a variant; the test
column is for reporting. Results: bench/results/teacher-variants-<data>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress import RESULTS, build_lake, work_config  # noqa: E402

from patternlake.lake import Lake  # noqa: E402
from patternlake.spark import get_spark  # noqa: E402


def test_metrics(model, table, max_len: int, n_items: int, which: str) -> dict[str, float]:
    from patternlake.models.metrics import evaluate_scorer
    from patternlake.sequence_reader import evaluation_arrays

    _, items, types, gaps, target = evaluation_arrays(table, max_len, which)
    stacked = [torch.from_numpy(a) for a in (items, types, gaps)]

    def score(s: slice) -> torch.Tensor:
        with torch.no_grad():
            return model.last_scores(*(a[s] for a in stacked))

    overall, _ = evaluate_scorer(score, len(target), target, np.zeros(len(target)), n_items, 512)
    return overall


def markov_metrics(table, n_items: int) -> dict[str, dict[str, float]]:
    from patternlake.models.baselines import MarkovChain
    from patternlake.models.metrics import evaluate_scorer
    from patternlake.sequence_reader import evaluation_arrays, first_training_items, training_arrays

    train_in, _, _, train_out = training_arrays(table, 50)  # every training transition
    mk = MarkovChain(n_items).fit(train_in, train_out, first_training_items(table))
    out = {}
    for which in ("valid", "test"):
        _, items, _, _, target = evaluation_arrays(table, 1, which)
        overall, _ = evaluate_scorer(
            lambda s, items=items: mk.scores(items[s]),
            len(target),
            target,
            np.zeros(len(target)),
            n_items,
            512,
        )
        out[which] = overall
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", choices=["generated", "ml-100k"], default="generated")
    ap.add_argument("--work", default=None)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a setting to train (repeatable); 'base:' = conf as is",
    )
    ap.add_argument("--seeds", default="", help="e.g. 7,8: each variant once per seed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from patternlake.models.fit import train_worker
    from patternlake.models.train_spec import build_spec, on_one_process
    from patternlake.sequence_reader import read_table
    from patternlake.training.train import train_members

    work = Path(args.work or Path.home() / ".cache/patternlake/bench-variants" / args.data)
    config = work_config(work)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    build_lake(spark, lake, config, args.data, work)
    variants = args.variant or ["base:"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    torch.set_num_threads(args.threads)
    rows = []
    table = None
    for spec_text in variants:
        name, _, sets = spec_text.partition(":")
        overrides = [s for s in sets.split(",") if s.strip()]
        for seed in seeds:
            extra = [*overrides, *([f"train.seed={seed}"] if seed is not None else [])]
            conf = work_config(work, extra)
            spec = on_one_process(build_spec(lake, conf, "single"), conf.train.num_proc)
            spec.threads = args.threads
            # every variant from scratch in its own folder: nothing resumed from another
            spec.checkpoint_dir = str(work / "checkpoints" / f"{name}-{spec.seed}-{time.time_ns()}")
            if table is None:
                table = read_table(spec.files)
                baseline = markov_metrics(table, spec.model["n_items"])
            t = time.perf_counter()
            model, result = train_members(spec, conf.train.members, lambda s: train_worker(vars(s)))
            seconds = time.perf_counter() - t
            shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
            cfg = model.config
            row = {
                "variant": name,
                "overrides": overrides,
                "seed": spec.seed,
                "valid_ndcg@10": test_metrics(model, table, cfg.max_len, cfg.n_items, "valid")[
                    "ndcg@10"
                ],
                "test": test_metrics(model, table, cfg.max_len, cfg.n_items, "test"),
                "members": result["members"],
                "params": model.num_params(),
                "seconds": round(seconds, 1),
            }
            if cfg.seen_bias:
                nets = getattr(model, "nets", [model])
                row["seen_weight"] = [round(float(m.seen_weight.item()), 3) for m in nets]
            rows.append(row)
            print(
                f"{name:>14s} seed {spec.seed}: valid {row['valid_ndcg@10']:.4f} test "
                f"{row['test']['ndcg@10']:.4f} ({seconds:.0f} s)"
                + (f" seen weight {row['seen_weight']}" if "seen_weight" in row else ""),
                flush=True,
            )
    mk_valid, mk_test = baseline["valid"]["ndcg@10"], baseline["test"]["ndcg@10"]
    print(f"\n{args.data}: Markov valid {mk_valid:.4f}, test {mk_test:.4f}")
    print("| variant | seeds | valid NDCG@10 | test NDCG@10 | test HR@10 | test vs Markov |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for spec_text in variants:
        name = spec_text.partition(":")[0]
        mine = [r for r in rows if r["variant"] == name]
        v = float(np.mean([r["valid_ndcg@10"] for r in mine]))
        t = float(np.mean([r["test"]["ndcg@10"] for r in mine]))
        h = float(np.mean([r["test"]["hr@10"] for r in mine]))
        summary[name] = {"valid_ndcg@10": v, "test_ndcg@10": t, "test_hr@10": h}
        print(f"| {name} | {len(mine)} | {v:.4f} | {t:.4f} | {h:.4f} | {t / mk_test:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"teacher-variants-{args.data}.json"
    out.write_text(
        json.dumps({"markov": baseline, "runs": rows, "summary": summary}, indent=2) + "\n"
    )
    print(f"JSON: {out}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
