"""The model stages' work at catalogue scale: 20,000 vs 1,000,000 items, side by side.

    .venv/bin/python bench/scale.py [--items 20000,1000000] [--users 4096] [--dense]
                                    [--index faiss] [--stages score,evaluate,train]

What one Spark task of each model stage does, in-process on this machine, with the
teacher's default shape (conf/base.yaml ``teacher``) and random weights (speed and memory
do not depend on the weights), each stage in its own process so that its peak RSS is its
own:

* **score**: ``scoring.score.score_batches``, the ``mapInPandas`` function of ``patternlake
  score`` -- exact top-10 over item chunks, occlusion explanations over the 20 most recent
  events (the deleted histories encoded against the shared shifted prefix,
  ``encode_deletions``; only the 10 items scored per deleted history), a rule book to
  match -- on Arrow-sized batches of 1,024 users with 50-event histories (Zipf-distributed
  items);
* **evaluate**: the evaluation protocol's target ranks (capped at 20, the metrics' largest
  cut-off) and top 10 over item chunks (``models.metrics.evaluate_ranks`` with
  ``models.ranking``), as ``patternlake evaluate`` and validation during training run them;
* **train**: optimizer steps of the teacher (AdamW; LazyAdamW over a row-wise item table
  with sampled softmax, as ``models.fit`` trains it; batches of 128 windows of 50 events;
  sampled softmax, in-batch plus 1,024 popularity negatives (conf's default), the catalogue-independent loss; full softmax too
  where its logits fit in 4 GB).

Per stage and catalogue: wall time, users/s (targets/s for training), peak RSS, and the
roofline: the FLOPs the stage's model work needs (encoder passes, the explanations'
prefix and suffix passes, catalogue products) over this machine's GEMM rate (2 threads, a square fp32 product), and
the share of it reached. Then each ratio 1M / 20k. ``--dense`` adds the dense path that
scoring used before (a (users x catalogue) score matrix per batch and every explanation
pass over the whole catalogue), capped at 8 GB of address space, to show where it breaks.

``--index faiss`` adds the score stage with ``score.index: faiss`` (``models.ann``: IVF-Flat,
conf's default lists and nprobe) and prints, per catalogue, the index's build time, the
top-10 kernel alone (encoded users, exact chunks vs the index's rescored candidates) in
users/s, and recall@10 against exact top-10: for the random weights every other line uses
(item vectors with no clusters: the index's worst case) and for the same teacher with its
item table grouped into sqrt(N) topics (a centroid each plus noise as large as their
spread), the way trained item vectors cluster.

``--pipeline`` runs the CLI stages instead (``bench/scale_pipeline.py``: ``run daily``,
``train``, ``distill``, ``compress``, ``evaluate``, ``score`` on generated data at both
catalogue sizes, with the Spark jobs, the training launch and the Delta writes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

L, D, HEADS, LAYERS = 50, 64, 2, 2  # conf/base.yaml teacher
K, EXPLAIN, BATCH = 10, 20, 1024


def gemm_rate(threads: int = 2) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def encoder_flops(length: int = L, d: int = D, layers: int = LAYERS) -> float:
    """FLOPs (2 x multiply-adds) of one history through the encoder up to the last
    position's state: every layer but the last in full -- QKV, output, MLP (12 L d^2) and
    attention (2 L^2 d) -- and the last one for the last position only (its keys and values
    over every position, 2 L d^2; the rest for one row, 10 d^2 + 2 L d)."""
    full = 12 * length * d * d + 2 * length * length * d
    last = 2 * length * d * d + 10 * d * d + 2 * length * d
    return 2.0 * ((layers - 1) * full + last)


def explanation_flops(
    events: int = EXPLAIN, length: int = L, d: int = D, layers: int = LAYERS
) -> float:
    """FLOPs of the ``events`` deleted histories' last states as ``encode_deletions``
    computes them: the history shifted by one as one encoder pass (the shared prefix: every
    block's keys and values kept; the last block's output at the last position only), then
    per deletion j = 1..events-1 its j later positions through every layer but the last
    (attending over ``length`` keys) and, in the last, their keys and values and the last
    position's output."""
    prefix = encoder_flops(length, d, layers) / 2
    suffix = sum(
        (layers - 1) * (12 * j * d * d + 2 * j * length * d)
        + 2 * j * d * d + 10 * d * d + 2 * length * d
        for j in range(1, events)
    )  # fmt: skip
    return 2.0 * (prefix + suffix)


def _teacher(n_items: int, sampled: int = 0):
    from patternlake.models.teacher import SequentialTeacher, TeacherConfig

    torch.manual_seed(0)
    c = TeacherConfig(
        n_items=n_items, n_types=6, max_len=L, d_model=D, n_heads=HEADS, n_layers=LAYERS,
        dropout=0.0, seen_bias=True, sampled_softmax=sampled,
    )  # fmt: skip
    return SequentialTeacher(c).eval()


def _histories(n_users: int, n_items: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.2, size=(n_users, L)), n_items - 1).astype(np.int64)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_score(n_items: int, n_users: int, dense: bool, index: str = "exact") -> dict:
    import pandas as pd

    from patternlake.config import load_config
    from patternlake.models.teacher import teacher_bytes
    from patternlake.scoring.score import score_batches, worker_models

    torch.set_num_threads(1)  # a Spark task: one core per Python worker
    seqs = _histories(n_users, n_items)
    payload = {
        "teacher": teacher_bytes(_teacher(n_items)), "teacher_version": "1", "students": {},
        "runtime": "dequant", "max_len": L, "data_version": 0,
    }  # fmt: skip
    rules = {(0, int(i)): [((int(i) + 1,), {"kind": "sequential"})] for i in range(1, 200)}
    conf = load_config(environ={}, conf_dir=ROOT / "conf").score  # base.yaml's defaults
    settings = dict(top_k=K, min_history=1, exclude_seen=False, explain_events=EXPLAIN,
                    explain_top=3, pattern_window=20, index=index,
                    faiss_nlist=conf.faiss_nlist, faiss_nprobe=conf.faiss_nprobe)  # fmt: skip
    frames = [
        pd.DataFrame(
            {
                "user_id": [f"u{i}" for i in range(lo, min(n_users, lo + BATCH))],
                "segment_id": 0,
                "item_seq": list(seqs[lo : lo + BATCH]),
                "type_seq": [[1] * L] * len(seqs[lo : lo + BATCH]),
                "gap_seq": [[1] * L] * len(seqs[lo : lo + BATCH]),
                "recent_names": [
                    [(int(i), str(i)) for i in s[-EXPLAIN:]] for s in seqs[lo : lo + BATCH]
                ],
            }
        )
        for lo in range(0, n_users, BATCH)
    ]
    if dense:
        return _dense_score(n_items, n_users, seqs)
    # a Python worker loads the models once (cached by digest) and then scores every batch
    # of its partitions: the load is timed apart from the per-user rate
    t = time.perf_counter()
    worker_models("d", payload)
    out: dict = {"load_s": time.perf_counter() - t}
    scanned = n_items
    if index == "faiss":  # the worker builds its index before the first batch is timed
        out |= _faiss_index(payload, settings, seqs)
        scanned = out["scanned"]
    t = time.perf_counter()
    rows = sum(len(f) for f in score_batches(iter(frames), "d", payload, {}, rules, settings))
    sec = time.perf_counter() - t
    assert rows == n_users * K
    flops = encoder_flops() + explanation_flops() + 2 * D * scanned + EXPLAIN * 2 * D * K
    return out | {"seconds": sec, "rate": n_users / sec, "flops_per_unit": flops}


def _top10_kernel(ranker, index, x: torch.Tensor) -> dict:
    """Exact and index top-10 of encoded users, BATCH at a time: users/s of each, recall@10."""
    from patternlake.models import ann, ranking

    exact_s = approx_s = 0.0
    hits = 0
    with torch.no_grad():
        for lo in range(0, len(x), BATCH):
            state = ranker.encode(x[lo : lo + BATCH])
            t = time.perf_counter()
            _, want = ranking.top_k(ranker, state, K)
            exact_s += time.perf_counter() - t
            t = time.perf_counter()
            _, got = ann.approx_top_k(index, ranker, state, K)
            approx_s += time.perf_counter() - t
            hits += sum(
                len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist(), strict=True)
            )
    return {"exact_rate": len(x) / exact_s, "faiss_rate": len(x) / approx_s,
            "recall": hits / (K * len(x))}  # fmt: skip


def _faiss_index(payload: dict, settings: dict, seqs: np.ndarray) -> dict:
    """Build the served teacher's index as the worker does (timed), then the top-10 kernel
    and recall@10 on the random weights and on the item table grouped into topics."""
    from patternlake.models import ann
    from patternlake.scoring import score

    m = score.worker_models("d", payload)[score.NO_SEGMENT]
    t = time.perf_counter()
    index = score.item_index(m, settings)
    out = {"build_s": time.perf_counter() - t, "nlist": index.nlist, "nprobe": index.nprobe}
    out["scanned"] = index.nprobe * index.n_items / index.nlist + index.nlist
    x = torch.zeros((len(seqs), 3, L), dtype=torch.int64)
    x[:, 0] = torch.from_numpy(seqs)
    x[:, 1] = 1
    out["random"] = _top10_kernel(m.ranker, index, x)
    table = m.ranker.table  # a copy of the teacher, its items grouped into sqrt(N) topics
    n = table.shape[0]
    g = torch.Generator().manual_seed(0)
    topics = max(1, round(n**0.5))
    centroids = torch.randn(topics, table.shape[1], generator=g)
    grouped = centroids[torch.randint(0, topics, (n,), generator=g)]
    grouped = 0.02 * (grouped + torch.randn(grouped.shape, generator=g))  # the init's scale
    saved = table.detach().clone()
    with torch.no_grad():
        table.copy_(grouped)
        table[0].zero_()
        t = time.perf_counter()
        topic_index = ann.ItemIndex(m.ranker, index.nlist, index.nprobe)
        out["topics"] = {"n": topics, "build_s": time.perf_counter() - t}
        out["topics"] |= _top10_kernel(m.ranker, topic_index, x)
        table.copy_(saved)  # the timed run scores the random weights, as the exact line does
    return out


def _dense_score(n_items: int, n_users: int, seqs: np.ndarray) -> dict:
    """The scoring path before item chunks: (users x catalogue) scores, a masked copy for
    top-K, and every explanation pass over the whole catalogue."""
    from patternlake.models.teacher import TeacherScorer

    model = TeacherScorer(_teacher(n_items)).eval()
    x = torch.zeros((n_users, 3, L), dtype=torch.int64)
    x[:, 0] = torch.from_numpy(seqs)
    x[:, 1] = 1
    t = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n_users, BATCH):
            xs = x[lo : lo + BATCH]
            s = model(xs).clone()
            ids = s.topk(K, dim=1).indices
            base = s.gather(1, ids)
            for j in range(EXPLAIN):
                keep = torch.ones(L, dtype=torch.bool)
                keep[L - 1 - j] = False
                deleted = torch.zeros_like(xs)
                deleted[:, :, 1:] = xs[:, :, keep]
                _ = base - model(deleted).gather(1, ids)
    sec = time.perf_counter() - t
    flops = (1 + EXPLAIN) * (encoder_flops() + 2 * D * n_items)
    return {"seconds": sec, "rate": n_users / sec, "flops_per_unit": flops}


def stage_evaluate(n_items: int, n_users: int, dense: bool) -> dict:
    from patternlake.models import ranking
    from patternlake.models.metrics import evaluate_ranks, ranker_ranks

    torch.set_num_threads(1)
    seqs = _histories(n_users, n_items, seed=1)
    x = torch.zeros((n_users, 3, L), dtype=torch.int64)
    x[:, 0] = torch.from_numpy(seqs)
    x[:, 1] = 1
    targets = _histories(n_users, n_items, seed=2)[:, 0]
    rank = ranker_ranks(ranking.ranker_for(_teacher(n_items)), lambda s: x[s])
    t = time.perf_counter()
    evaluate_ranks(rank, n_users, targets, np.zeros(n_users), n_items, BATCH)
    sec = time.perf_counter() - t
    return {
        "seconds": sec,
        "rate": n_users / sec,
        "flops_per_unit": encoder_flops() + 2 * D * n_items,
    }


def stage_train(n_items: int, n_users: int, dense: bool, sampled: int = 1024) -> dict:
    torch.set_num_threads(2)
    steps, batch = 8, 128
    model = _teacher(n_items, 0 if dense else sampled).train()
    items = torch.from_numpy(_histories(batch * (steps + 1), n_items, seed=4))
    if not dense:  # the popularity the product counts from the training items
        model.set_sampling(np.bincount(items.numpy().ravel(), minlength=n_items))
    # the product's choice (models.fit): a row-wise item table under sampled softmax
    from patternlake.models.fit import sparse_item_table
    from patternlake.models.optim import LazyAdamW

    sparse = sparse_item_table(model.config, "single", torch.device("cpu"))
    model.item_emb.sparse = sparse
    opt = (LazyAdamW if sparse else torch.optim.AdamW)(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(3)
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # step 0 warms up (allocations, Adam's state)
        b = items[step * batch : (step + 1) * batch]
        inputs, targets = b[:, :-1], b[:, 1:]
        types = torch.ones_like(inputs)
        gaps = torch.from_numpy(rng.integers(0, 5, size=inputs.shape))
        pad = torch.zeros((batch, 1), dtype=torch.int64)
        loss = model.loss(
            torch.cat([pad, inputs], 1)[:, :L], torch.cat([pad, types], 1)[:, :L],
            torch.cat([pad, gaps], 1)[:, :L], torch.cat([pad, targets], 1)[:, :L],
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    sec = time.perf_counter() - t0
    n_targets = steps * batch * (L - 1)
    full = 2.0 * LAYERS * (12 * L * D * D + 2 * L * L * D)  # training: every position
    per_target = 3 * full / L + 3 * 2 * D * (n_items if dense else batch * L + sampled)
    return {"seconds": sec, "rate": n_targets / sec, "flops_per_unit": per_target}


STAGES = {"score": stage_score, "evaluate": stage_evaluate, "train": stage_train}


def child(stage: str, n_items: int, n_users: int, dense: bool, cap_gb: float, index: str) -> None:
    if cap_gb:
        limit = int(cap_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        extra = {"index": index} if index != "exact" else {}
        out = STAGES[stage](n_items, n_users, dense, **extra)
        out["rss_mb"] = _rss_mb()
    except (MemoryError, RuntimeError) as e:
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", "rss_mb": _rss_mb()}
    print("RESULT " + json.dumps(out))


def run_child(
    stage: str, n_items: int, n_users: int, dense: bool, cap_gb: float, index: str = "exact"
) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--items", str(n_items), "--users",
           str(n_users), "--cap-gb", str(cap_gb), "--index", index]  # fmt: skip
    cmd += ["--dense"] if dense else []
    run = subprocess.run(cmd, capture_output=True, text=True)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {run.returncode}: {run.stderr.strip().splitlines()[-1:]}", "rss_mb": 0}


def _faiss_lines(r: dict) -> str:
    def kernel(k: dict) -> str:
        return (f"top-10 alone {k['exact_rate']:,.0f} users/s exact, {k['faiss_rate']:,.0f} "
                f"faiss; recall@10 vs exact {k['recall']:.3f}")  # fmt: skip

    topics = r["topics"]
    return (
        f"{'':19s}index: IVF-Flat, {r['nlist']:,d} lists, nprobe {r['nprobe']}, built in "
        f"{r['build_s']:.1f} s (outside the time above)\n"
        f"{'':19s}random weights:     {kernel(r['random'])}\n"
        f"{'':19s}items in {topics['n']:,d} topics: {kernel(topics)} "
        f"(index built in {topics['build_s']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--pipeline" in argv:  # the CLI stages end to end: bench/scale_pipeline.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from scale_pipeline import main as pipeline

        return pipeline([a for a in argv if a != "--pipeline"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", default="20000,1000000")
    p.add_argument("--users", type=int, default=4096)
    p.add_argument("--stages", default="score,evaluate,train")
    p.add_argument("--dense", action="store_true", help="also the dense paths, capped")
    p.add_argument("--cap-gb", type=float, default=0.0)
    p.add_argument("--index", choices=["exact", "faiss"], default="exact",
                   help="faiss: also score through the approximate item index")  # fmt: skip
    p.add_argument("--child", default="")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.items.split(",")]
    if a.child:
        child(a.child, sizes[0], a.users, a.dense, a.cap_gb, a.index)
        return 0
    gemm = gemm_rate()
    print(f"GEMM rate (2048^2 fp32, 2 threads): {gemm:.1f} GFLOP/s; one thread ~ half of it")
    print(f"teacher: max_len {L}, d_model {D}, {LAYERS} layers; {a.users} users; top-{K}, "
          f"{EXPLAIN} events explained\n")  # fmt: skip
    results: dict[tuple[str, str, int], dict] = {}
    variants = [("chunked", False, 0.0, "exact")]
    variants += [("dense", True, 8.0, "exact")] if a.dense else []
    variants += [("faiss", False, 0.0, "faiss")] if a.index == "faiss" else []
    for stage in a.stages.split(","):
        for name, dense, cap, index in variants:
            if (stage == "evaluate" and dense) or (stage != "score" and index != "exact"):
                continue
            for n in sizes:
                if stage == "train" and dense and n * 128 * L * 4 * 3 > 4 << 30:
                    results[(stage, name, n)] = {"error": "full-softmax logits > 4 GB: not run"}
                    continue
                results[(stage, name, n)] = r = run_child(stage, n, a.users, dense, cap, index)
                unit = "targets/s" if stage == "train" else "users/s"
                if "error" in r:
                    print(f"{stage:9s} {name:8s} {n:>9,d} items: FAILED {r['error']} "
                          f"(peak RSS {r.get('rss_mb', 0):.0f} MB)")  # fmt: skip
                    continue
                threads = 2 if stage == "train" else 1
                roof = gemm * 1e9 * threads / 2 / r["flops_per_unit"]
                print(
                    f"{stage:9s} {name:8s} {n:>9,d} items: {r['seconds']:7.1f} s  "
                    f"{r['rate']:9.1f} {unit}  peak RSS {r['rss_mb']:6.0f} MB  "
                    f"roofline {roof:9.1f} {unit} ({r['rate'] / roof:.0%} of it)"
                    + (
                        f"; models loaded in {r['load_s']:.1f} s, once per worker"
                        if "load_s" in r
                        else ""
                    )
                )
                if "build_s" in r:
                    print(_faiss_lines(r))
    print("\nratios (largest / smallest catalogue):")
    lo, hi = min(sizes), max(sizes)
    for (stage, name, n), r in results.items():
        if n != hi or "rate" not in r:
            continue
        base = results.get((stage, name, lo), {})
        if "rate" in base:
            print(f"  {stage:9s} {name:8s} rate {r['rate'] / base['rate']:.2f}x  "
                  f"peak RSS {r['rss_mb'] / base['rss_mb']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
