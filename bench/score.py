"""Batch scoring speed: teacher fp32 vs students fp32 vs students int8, the same users, one run.

    .venv/bin/python bench/score.py [--work DIR] [--users 10000,100000,1000000]

Uses a work folder of bench/compress.py (default: its generated-data folder, built by it
if missing): the registered teacher and each segment's newest fp32 and int8 students.

1. **Models side by side**: every user of the lake scored by the teacher, by their segment's
   fp32 student and by its int8 student (runtime ``compress.runtime``), top-K included,
   in-process on one thread (what one Spark task does per Arrow batch). Prints users/s and
   the ratio int8 students / teacher (docs/design.md target: >= 5x).
2. **Growth**: int8 students on 10k -> 1M users (histories resampled from the lake's users),
   users/s at each size (linear growth = constant users/s).
3. **GEMM**: the scoring matmul (users x d -> users x items) in isolation against this
   machine's fp32 GEMM rate on a large square product (docs/design.md target: within 3x).
4. **The Spark job**: ``patternlake score`` end to end on the lake (wall time, users/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def score_all(models: dict, x: torch.Tensor, groups: np.ndarray, k: int, batch: int = 1024) -> None:
    from patternlake.models.ranking import ranker_for, top_k

    with torch.no_grad():
        for g in np.unique(groups):
            rows = torch.from_numpy(np.nonzero(groups == g)[0])
            model = models.get(int(g), models.get(-1))
            L = model.config.max_len
            xs = x[rows][:, :, -L:]
            for s in range(0, len(xs), batch):
                ranker = ranker_for(model)
                top_k(ranker, ranker.encode(xs[s : s + batch]), k)


def faithfulness(teacher, x: torch.Tensor, last: int = 20, steps: int = 5) -> dict:
    """Deletion curves of the top item's score: events deleted in the order of occlusion,
    of integrated gradients (Captum, on the item embeddings) and at random."""
    from captum.attr import LayerIntegratedGradients

    from patternlake.scoring.transforms import deletion_curve, occlusion

    def score(z):
        with torch.no_grad():
            return teacher.last_scores(z[:, 0], z[:, 1], z[:, 2])

    L = x.shape[-1]
    top = score(x).topk(1).indices[:, 0]
    t = time.perf_counter()
    occ = occlusion(score, x, top.unsqueeze(1), last)[:, 0].argsort(dim=1, descending=True)
    occ_s = time.perf_counter() - t

    def target(items, types, gaps, item):
        return teacher.last_scores(items, types, gaps).gather(1, item.unsqueeze(1)).squeeze(1)

    t = time.perf_counter()
    lig = LayerIntegratedGradients(target, teacher.item_emb)
    attr = lig.attribute(
        x[:, 0],
        baselines=torch.zeros_like(x[:, 0]),
        additional_forward_args=(x[:, 1], x[:, 2], top),
        n_steps=16,
        internal_batch_size=256,
    ).sum(-1)  # (B, L): attribution of each position
    recent = attr[:, L - last :].flip(1)  # 0 = most recent
    recent = torch.where(x[:, 0, L - last :].flip(1) > 0, recent, torch.full_like(recent, -1e9))
    ig = recent.argsort(dim=1, descending=True)
    ig_s = time.perf_counter() - t
    rnd = torch.stack(
        [torch.randperm(last, generator=torch.Generator().manual_seed(i)) for i in range(len(x))]
    )
    curves = {
        name: deletion_curve(score, x, top, order, steps)
        for name, order in (("occlusion", occ), ("integrated gradients", ig), ("random", rnd))
    }
    print(
        f"faithfulness on {len(x)} users (teacher, top item's mean score after deleting k events):"
    )
    print("  " + " ".join(f"{'k=' + str(k):>7s}" for k in range(steps + 1)) + "   drop@3  seconds")
    secs = {"occlusion": occ_s, "integrated gradients": ig_s, "random": 0.0}
    for name, c in curves.items():
        print(
            f"  {' '.join(f'{v:7.3f}' for v in c)}   {c[0] - c[3]:6.3f}  {secs[name]:6.1f}  {name}"
        )
    print()
    return curves


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--work",
        default=str(Path.home() / ".cache" / "patternlake" / "bench-compress" / "generated"),
    )
    ap.add_argument("--users", default="10000,100000,1000000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-spark", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if not (work / "mlruns.db").exists():
        import compress as compress_bench

        compress_bench.main(["--data", "generated", "--work", str(work)])
    from compress import work_config

    from patternlake import registry
    from patternlake.lake import Lake
    from patternlake.models.student import from_bytes
    from patternlake.models.teacher import TeacherScorer
    from patternlake.sequence_reader import read_table
    from patternlake.spark import get_spark

    config = work_config(work)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    teacher, tags = registry.load_teacher(config)
    table = read_table(lake.files("user_sequences"))
    from patternlake.scoring.transforms import windows

    L = teacher.config.max_len
    x = windows(
        table.column("item_seq").to_pylist(),
        table.column("type_seq").to_pylist(),
        table.column("gap_seq").to_pylist(),
        L,
        teacher.config.n_items,
    )
    seg_of = {r.user_id: r.segment_id for r in lake.read("segments").collect()}
    groups = np.array([seg_of.get(u, -1) for u in table.column("user_id").to_pylist()])
    k = config.score.top_k

    scorer = TeacherScorer(teacher)
    fp32, int8 = {-1: scorer}, {-1: scorer}
    for g in set(groups.tolist()):
        for variant, store in (("fp32", fp32), ("int8", int8)):
            # the shared student serves every segment (docs/students.md)
            v = registry.student_versions(
                config, variant=variant, shared="true", teacher_version=tags["version"]
            )
            if v:
                blob = registry.version_file(config, "student", v[0].version).read_bytes()
                store[g] = from_bytes(blob, config.compress.runtime)
    faithfulness(teacher, x[:500])
    n = len(x)
    print(f"{n} users, {teacher.config.n_items - 1} items, top-{k}, {args.threads} thread(s)")
    res = {}
    for name, models in (
        ("teacher fp32", {-1: scorer}),
        ("students fp32", fp32),
        ("students int8", int8),
    ):
        sec = timed(
            lambda m=models, teacher_only=(name == "teacher fp32"): score_all(
                m, x, np.full(n, -1) if teacher_only else groups, k
            )
        )
        res[name] = n / sec
        print(f"  {name:14s} {sec:7.3f} s  {n / sec:>10,.0f} users/s")
    print(
        f"  int8 students / teacher: {res['students int8'] / res['teacher fp32']:.1f}x (target >= 5x)"
    )

    print("\ngrowth (int8 students, histories resampled from the lake's users):")
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.users.split(",")):
        pick = rng.integers(0, n, size)
        xs, gs = x[torch.from_numpy(pick)], groups[pick]
        sec = timed(lambda xs=xs, gs=gs: score_all(int8, xs, gs, k), repeats=1)
        print(f"  {size:>9,d} users {sec:8.2f} s {size / sec:>10,.0f} users/s")

    print("\nscoring matmul vs this machine's GEMM rate (fp32):")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    sec = timed(lambda: a @ b)
    gemm = 2 * 2048**3 / sec / 1e9
    # the widest student's width against the whole catalogue (a segment catalogue is smaller)
    widths = [m.config.d_model for g, m in int8.items() if g != -1] or [teacher.config.d_model]
    d, items = max(widths), teacher.config.n_items
    h = torch.randn(1024, d)
    E = torch.randn(items, d)
    sec = timed(lambda: [h @ E.T for _ in range(20)]) / 20
    rate = 2 * 1024 * d * items / sec / 1e9
    print(
        f"  square 2048 GEMM: {gemm:.1f} GFLOP/s; scoring (1024 x {d}) @ ({d} x {items}): {rate:.1f} GFLOP/s "
        f"= {gemm / rate:.1f}x below peak (target <= 3x; a width-{d} product is memory-bound: "
        f"{4 * 1024 * items / 1e6:.1f} MB of scores per batch)"
    )
    if not args.skip_spark:
        from patternlake.scoring.score import score_users

        t = time.perf_counter()
        out = score_users(spark, lake, config, "bench")
        sec = time.perf_counter() - t
        print(
            f"\npatternlake score (Spark, local[*], explanations on): {out['users']} users in {sec:.1f}s "
            f"= {out['users'] / sec:,.0f} users/s ({out['rows']} rows, {out['with_pattern']} with a rule)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
