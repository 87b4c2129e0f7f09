"""heads: per segment, a small specialisation of the shared student, kept only where it wins.

A head is what a segment may change of the shared student that serves it: the final layer
norm, a learned score per item (the segment's own popularity: tastes differ between
segments more than sequences do) and a low-rank residual adapter after the norm
(``heads.adapter_rank``). Its file holds only those tensors and names the shared student
version it runs on, so a fleet ships the shared model once and a few kilobytes per segment
(``models.student.head_bytes``).

1. **Which segments.** Those whose champion is the current teacher's shared student (fp32
   or int8: the head is trained on, and gated against, the weights that serve), or a head
   on it. A segment the teacher serves gets no head.
2. **Training, one Spark task per segment** (``groupBy(segment_id).applyInArrow``): the
   segment's rows of ``teacher_topk`` (its users' sequences and the teacher's stored top-K
   at every training target; at most ``heads.max_users`` users, drawn by a hash of the
   user id). The shared body is frozen, so its states at every training target are
   computed once; each epoch trains only the head on them with the student's loss
   (``alpha x T^2 x KL`` over the teacher's top-K plus ``(1 - alpha) x`` the next-item
   loss). Early stopping on the segment's "tune" half of the validation users; epoch 0 is
   the shared student itself.
3. **The gate, on the driver**: a paired bootstrap of per-user NDCG@10, head against the
   shared student it specialises, over the segment's "gate" half (users the head's
   training never chose on). Kept when the ratio's 90% lower bound is at least
   ``heads.gate`` (1.0: it beats the shared student, not only matches it); then the
   segment's champion alias points at the head, else at the shared student (a rerun
   decides every segment's head again). Every head is registered and every verdict
   recorded in ``model_decisions`` (stage ``heads``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import BinaryType, DoubleType, LongType, StructField, StructType

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.fit import split_of
from patternlake.models.store import metadata
from patternlake.models.student import (
    from_bytes,
    head_bytes,
    head_params,
    is_head_tensor,
    with_head,
)
from patternlake.sequence_reader import evaluation_arrays, soft_arrays, training_arrays
from patternlake.students import gates
from patternlake.students.distill import SHARED, GateUsers, pinned_files
from patternlake.students.promotion import Candidate, Verdict, record
from patternlake.students.topk import TABLE, store_teacher_topk

log = logging.getLogger(__name__)

# One row per segment: the head's file and what its training measured.
RESULT = StructType(
    [
        StructField("segment_id", LongType()),
        StructField("head", BinaryType()),
        StructField("best_epoch", LongType()),
        StructField("epochs", LongType()),
        StructField("base_ndcg", DoubleType()),
        StructField("tune_ndcg", DoubleType()),
        StructField("tune_users", LongType()),
        StructField("users", LongType()),
        StructField("targets", LongType()),
        StructField("seconds", DoubleType()),
    ]
)
RESULT_ARROW = to_arrow_schema(RESULT)


def _ndcg(model: torch.nn.Module, x: np.ndarray, target: np.ndarray) -> float:
    if not len(target):
        return 0.0
    return float(gates.per_user_ndcg(gates.ranks_and_top10(model, x, target)[0]).mean())


def fit_head(base: torch.nn.Module, table: pa.Table, s: dict[str, Any]) -> dict[str, Any]:
    """One segment's head on ``base`` (the shared student that serves it), trained on
    ``table`` (the segment's ``teacher_topk`` rows); ``s``: the heads' and students'
    settings (:func:`settings`). Returns the best epoch's head file and what was measured."""
    started = time.monotonic()
    torch.manual_seed(s["seed"])
    rng = np.random.default_rng(s["seed"])
    model = with_head(base, s["item_bias"], s["adapter_rank"])
    if model.catalogue is not None:
        raise ValueError("a head specialises a whole-catalogue (shared) student")
    net = model.net
    net.distill = (s["alpha"], s["temperature"])
    L = model.config.max_len
    items, types, gaps, targets = training_arrays(table, L, s["stride"])
    soft_i, soft_l = soft_arrays(table, L, s["top_k"], s["stride"])
    if net.config.sampled_softmax:  # the segment's own popularity for the negatives
        net.set_sampling(np.bincount(targets[targets > 0], minlength=net.config.n_items))
    # the frozen body's states at every training target, once
    batches = []
    with torch.no_grad():
        for lo in range(0, len(items), s["batch_size"]):
            part = slice(lo, lo + s["batch_size"])
            it, ty, ga, tg = (torch.from_numpy(a[part]) for a in (items, types, gaps, targets))
            mask = tg > 0
            if bool(mask.any()):
                body = net.encode_body(it, ty, ga)[mask]
                si = torch.from_numpy(soft_i[part]).long()[mask]
                sl = torch.from_numpy(soft_l[part])[mask]
                batches.append((body, it, mask, tg[mask], si, sl))
    users, vi, vt, vg, vtarget = evaluation_arrays(table, L, "valid")
    tune = np.flatnonzero(split_of(users) == 0)
    if len(tune) > s["valid_users"]:
        tune = np.sort(rng.choice(tune, s["valid_users"], replace=False))
    vx = np.stack([vi, vt, vg], axis=1)[tune]
    vtarget = vtarget[tune]

    for p in net.parameters():
        p.requires_grad_(False)
    params = head_params(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=s["lr"])

    def head_state() -> dict[str, torch.Tensor]:  # the head's tensors only: the body is frozen
        return {k: v.clone() for k, v in model.state_dict().items() if is_head_tensor(k)}

    base_ndcg = best = _ndcg(model, vx, vtarget)
    best_state, best_epoch, epochs = head_state(), 0, 0
    for epoch in range(1, s["epochs"] + 1):
        net.train()
        for b in rng.permutation(len(batches)):
            body, it, mask, y, si, sl = batches[b]
            loss = net.masked_distill_loss(net.final(body), it, mask, y, si, sl)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs = epoch
        score = _ndcg(model, vx, vtarget)
        if score > best:
            best, best_epoch, best_state = score, epoch, head_state()
        elif epoch - best_epoch >= s["patience"]:
            break
    model.load_state_dict(best_state, strict=False)
    model.eval()
    return {
        "head": head_bytes(model, s["base_version"], segment=s["segment"]),
        "best_epoch": best_epoch,
        "epochs": epochs,
        "base_ndcg": base_ndcg,
        "tune_ndcg": best,
        "tune_users": len(vtarget),
        "users": table.num_rows,
        "targets": int((targets > 0).sum()),
        "seconds": round(time.monotonic() - started, 1),
    }


def settings(config: Config, stride: int) -> dict[str, Any]:
    h, s = config.heads, config.students
    return {
        "item_bias": h.item_bias,
        "adapter_rank": h.adapter_rank,
        "epochs": h.epochs,
        "patience": h.patience,
        "lr": h.lr,
        "batch_size": h.batch_size,
        "valid_users": h.valid_users,
        "seed": s.seed,
        "alpha": s.alpha,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "stride": stride or None,
    }


def heads(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    registry.require_store(config, "heads")
    teacher_data, tags = registry.teacher_file(config)
    files, data_version = pinned_files(lake, tags, "heads")
    h, s, t = config.heads, config.students, config.train
    if not lake.exists("segments"):
        raise PatternlakeError("heads: no segments table yet; run `patternlake segment` first")
    segment_ids = sorted(
        int(r[0]) for r in lake.read("segments").select("segment_id").distinct().collect()
    )
    bases = shared_bases(config, segment_ids, tags["version"])
    if not bases:
        log.info("heads: no segment is served by a shared student (the teacher serves): no heads")
        return {"segments": {}, "teacher_version": tags["version"], "heads": 0}
    blobs = {
        str(mv.version): registry.version_file(config, registry.STUDENT, mv.version).read_bytes()
        for mv in bases.values()
    }
    base_of = {g: str(mv.version) for g, mv in bases.items()}
    max_len = int(from_bytes(next(iter(blobs.values()))).config.max_len)
    stride = min(t.window_stride, max_len) or max_len
    topk_version, _ = store_teacher_topk(
        spark, lake, teacher_data, tags["version"], data_version, s.top_k, stride
    )
    frame = _segment_rows(lake, topk_version, sorted(bases), h.max_users)
    shared = spark.sparkContext.broadcast((blobs, base_of, settings(config, stride)))

    def run(key: tuple, table: pa.Table) -> pa.Table:
        torch.set_num_threads(1)
        blob, owner, common = shared.value
        g = int(key[0].as_py())
        base = from_bytes(blob[owner[g]])
        out = fit_head(base, table, common | {"segment": g, "base_version": owner[g]})
        return pa.Table.from_pylist([{"segment_id": g, **out}], schema=RESULT_ARROW)

    try:
        trained = frame.groupBy("segment_id").applyInArrow(run, RESULT).collect()
    finally:
        shared.unpersist()
    judged = GateUsers(spark, lake, files, max_len)
    verdicts = [_pooled_row(bases, trained)]
    for row in sorted(trained, key=lambda r: r.segment_id):
        verdicts.append(_judge(config, judged, row, bases[row.segment_id], blobs, tags))
    for g in sorted(set(bases) - {r.segment_id for r in trained}):
        verdicts.append(_no_users(config, g, bases[g]))
    out = record(lake, verdicts, tags["version"], started)
    kept = sum(v.promoted for v in verdicts[1:])
    log.info("heads: %d of %d segments keep a head", kept, len(bases))
    return out | {"heads": kept}


def shared_bases(config: Config, segments: list[int], teacher_version: str) -> dict[int, Any]:
    """segment -> the ModelVersion of the shared student that serves it: its champion, or
    the base of the head that serves it (a rerun decides every head again); segments the
    teacher serves are left out."""
    out = {}
    for g, mv in registry.current_champions(config, segments, teacher_version).items():
        if mv is not None and mv.tags.get("variant") == "head":
            mv = registry.student_version(config, mv.tags["base_version"])
        if mv is not None and mv.tags.get("shared") == "true":
            out[g] = mv
    return out


def _segment_rows(lake: Lake, version: int, segments: list[int], max_users: int):
    """``teacher_topk`` rows of the segments' users with their ``segment_id``; at most about
    ``max_users`` users per segment, drawn by a hash of the user id (the same every run)."""
    seg = lake.read("segments").select("user_id", "segment_id")
    seg = seg.where(F.col("segment_id").isin(segments))
    frame = lake.read(TABLE, version=version).join(seg, "user_id")
    counts = {r.segment_id: r["count"] for r in seg.groupBy("segment_id").count().collect()}
    share = F.pmod(F.xxhash64("user_id"), F.lit(1 << 24)) / F.lit(float(1 << 24))
    keep = F.lit(False)
    for g, n in counts.items():
        keep = keep | ((F.col("segment_id") == g) & (share < F.lit(min(1.0, max_users / n))))
    return frame.where(keep)


def _judge(
    config: Config,
    judged: GateUsers,
    row: Any,
    base_mv: Any,
    blobs: dict[str, bytes],
    tags: dict[str, str],
) -> Verdict:
    """A segment's head against the shared student it specialises, on the segment's gate
    users; registered either way, the segment's champion when it wins."""
    h, s = config.heads, config.students
    g = int(row.segment_id)
    base_version = str(base_mv.version)
    base = from_bytes(blobs[base_version], config.compress.runtime)
    data = bytes(row.head)
    head = from_bytes(data, config.compress.runtime, base=blobs[base_version])
    mine = judged.segment == g
    interval = gates.paired_bootstrap(
        judged.ndcg(head, mine), judged.ndcg(base, mine), s.resamples, s.seed
    )
    decision = gates.promotion(interval, h.gate, s.min_users)
    if row.best_epoch == 0:  # the head is the shared student: nothing to keep
        decision = gates.Decision(
            False, interval, "no epoch beat the shared student on the segment's tune users"
        )
    base_name = f"{registry.champion_name(base_mv)} v{base_version}"
    params = int(metadata(data)["head_params"])
    version = Candidate(
        segment=g,
        variant="head",
        model=data,
        run_tags={
            "data.version": tags.get("data.version", ""),
            "teacher.version": tags["version"],
            "base.version": base_version,
        },
        run_params={
            "item_bias": h.item_bias,
            "adapter_rank": h.adapter_rank,
            "lr": h.lr,
            "epochs": h.epochs,
        },
        run_metrics={
            "tune_valid_ndcg_at_10": row.tune_ndcg,
            "base_tune_valid_ndcg_at_10": row.base_ndcg,
            "gate_valid_ndcg_at_10": interval.candidate,
            "ratio": interval.ratio,
            "ratio_lower_90": interval.lower,
            "bytes": len(data),
        },
        version_tags={
            "shared": "false",
            "base_version": base_version,
            "params": params,
            "bytes": len(data),
            "valid_ndcg_at_10": round(interval.candidate, 6),
            "teacher_version": tags["version"],
            "data_version": tags.get("data.version", ""),
        },
    ).register(config)
    # kept: the head serves; else the shared student it was judged against (an earlier
    # head of this segment is dropped: every run decides again)
    registry.set_champion(config, g, version if decision.passed else base_version)
    return Verdict.of_interval(
        "heads",
        g,
        "head",
        interval,
        reference=base_name,
        threshold=h.gate,
        promoted=decision.passed,
        champion=f"student-head v{version}" if decision.passed else base_name,
        reason=decision.reason,
        details={
            "base_version": base_version,
            "best_epoch": row.best_epoch,
            "epochs": row.epochs,
            "tune_users": row.tune_users,
            "tune_ndcg": row.tune_ndcg,
            "base_tune_ndcg": row.base_ndcg,
            "users": row.users,
            "targets": row.targets,
            "seconds": row.seconds,
            "bytes": len(data),
            "base_bytes": len(blobs[base_version]),
        },
        version=version,
        params=params,
        nbytes=len(data),
    )


def _pooled_row(bases: dict[int, Any], trained: list[Any]) -> Verdict:
    """The stage's first row (segment -1): what ran; the segments' rows hold the verdicts."""
    versions = sorted({str(mv.version) for mv in bases.values()})
    return Verdict(
        stage="heads",
        segment=SHARED,
        variant="head",
        valid_users=0,
        reference=", ".join(f"student v{v}" for v in versions),
        reference_ndcg=0.0,
        threshold=0.0,
        promoted=False,
        champion="per segment",
        reason=f"{len(trained)} heads trained for {len(bases)} segments served by a shared student",
        details={"base_versions": versions, "trained": len(trained)},
    )


def _no_users(config: Config, g: int, base_mv: Any) -> Verdict:
    registry.set_champion(config, g, str(base_mv.version))
    name = f"{registry.champion_name(base_mv)} v{base_mv.version}"
    return Verdict(
        stage="heads",
        segment=g,
        variant="head",
        valid_users=0,
        reference=name,
        reference_ndcg=0.0,
        threshold=0.0,
        promoted=False,
        champion=name,
        reason="no training rows for this segment: no head",
        details={},
    )
