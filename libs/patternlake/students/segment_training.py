"""What runs inside one Spark task: distil (or compress) the student of one segment.

No Spark here: a task gets plain values (the pinned ``user_sequences`` and ``segments``
files, its segment id, the settings) and the teacher's bytes (a broadcast variable), reads
its segment's rows with pyarrow, trains on one thread and returns a dict with the model's
bytes and its numbers. The driver writes and registers what comes back.

Training data: the segment's users' windows over their whole training part (as the
teacher's, ``sequence_reader.training_arrays``); early stopping and the gates use the
validation targets of the segment's users only.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from patternlake.models import ranking
from patternlake.models.metrics import evaluate_ranks, ranker_ranks
from patternlake.models.student import (
    Student,
    from_bytes,
    kd_loss,
    large_tensors,
    quantized_bytes,
)
from patternlake.models.teacher import SequentialTeacher, TeacherScorer, teacher_from_bytes
from patternlake.sequence_reader import evaluation_arrays, read_table, training_arrays
from patternlake.students.transforms import magnitude_masks, segment_catalogue, student_config


def segment_table(files: list[str], segment_files: list[str], segment: int) -> pa.Table:
    seg = pa.concat_tables(
        [pq.read_table(f, columns=["user_id", "segment_id"]) for f in segment_files]
    )
    users = seg.filter(pc.equal(seg.column("segment_id"), segment)).column("user_id")
    table = read_table(files)
    return table.filter(pc.is_in(table.column("user_id"), value_set=users.combine_chunks()))


class SegmentData:
    """The segment's training windows and validation inputs, as tensors."""

    def __init__(self, table: pa.Table, max_len: int):
        items, types, gaps, targets = training_arrays(table, max_len)
        self.train = [torch.from_numpy(a) for a in (items, types, gaps, targets)]
        _, vi, vt, vg, vy = evaluation_arrays(table, max_len, "valid")
        self.valid = torch.from_numpy(np.stack([vi, vt, vg], axis=1))  # (n, 3, L)
        self.valid_target = vy
        self.users = table.num_rows
        self.soft: tuple[bytes | None, torch.Tensor] | None = None  # see _cached_soft_targets

    @property
    def n_windows(self) -> int:
        return len(self.train[0])

    @property
    def n_valid(self) -> int:
        return len(self.valid_target)


@torch.no_grad()
def ndcg(model: torch.nn.Module, data: SegmentData, n_items: int, batch: int = 512) -> float:
    if data.n_valid == 0:
        return 0.0
    model.eval()

    rank = ranker_ranks(ranking.ranker_for(model), lambda s: data.valid[s])
    overall, _ = evaluate_ranks(
        rank, data.n_valid, data.valid_target, np.zeros(data.n_valid), n_items, batch
    )
    return float(overall["ndcg@10"])


def _soft_targets(
    teacher: SequentialTeacher, student: Student, items, types, gaps, mask
) -> torch.Tensor:
    """The teacher's logits at the masked positions, over the student's local columns."""
    with torch.no_grad():
        logits = teacher.position_scores(items, types, gaps, mask)
        logits[:, 0] = float("-inf")
        if student.catalogue is None:
            return logits
        local = torch.full((len(logits), student.config.n_items), float("-inf"))
        local[:, 2:] = logits[:, student.to_global]
        return local


def _cached_soft_targets(
    teacher: SequentialTeacher, student: Student, data: SegmentData, cache_mb: int
) -> torch.Tensor | None:
    """The teacher's logits for every window position, computed once (fp16, (windows, L,
    n_local)), when they fit in ``cache_mb``: the teacher is frozen, so every epoch would
    recompute the same values. Kept on ``data`` for the next student over the same catalogue
    (compress's sparsities, search trials). None: computed batch by batch instead."""
    n, L = data.train[0].shape
    if n * L * student.config.n_items * 2 > cache_mb * 2**20:
        return None
    key = None if student.catalogue is None else student.catalogue.tobytes()
    if data.soft is not None and data.soft[0] == key:
        return data.soft[1]
    data.soft = None  # one cache at a time: within cache_mb
    cache = torch.empty((n, L, student.config.n_items), dtype=torch.float16)
    everywhere = torch.ones((1, L), dtype=torch.bool)
    for start in range(0, n, 256):
        items, types, gaps = (t[start : start + 256] for t in data.train[:3])
        mask = everywhere.expand(len(items), L)
        soft = _soft_targets(teacher, student, items, types, gaps, mask)
        cache[start : start + len(items)] = soft.view(len(items), L, -1).half()
    data.soft = (key, cache)
    return cache


def train_student(
    student: Student,
    teacher: SequentialTeacher,
    data: SegmentData,
    s: dict[str, Any],
    epochs: int,
    masks: dict[str, torch.Tensor] | None = None,
    on_epoch: Any = None,
) -> dict[str, Any]:
    """Distillation epochs with early stopping on the segment's validation NDCG@10; the
    best epoch's weights are restored. ``masks`` (pruning) are re-applied after every step."""
    gen = torch.Generator().manual_seed(s["seed"])
    opt = torch.optim.AdamW(student.parameters(), lr=s["lr"], weight_decay=0.0)
    cache = _cached_soft_targets(teacher, student, data, s.get("cache_mb", 0))
    params = dict(student.named_parameters())
    best, best_state, best_epoch, bad, history = -1.0, None, -1, 0, []
    samples, seconds = 0, 0.0
    n_global = student.n_global
    for epoch in range(epochs):
        student.train()
        started = time.perf_counter()
        order = torch.randperm(data.n_windows, generator=gen)
        loss_sum, steps = 0.0, 0
        for start in range(0, data.n_windows, s["batch_size"]):
            idx = order[start : start + s["batch_size"]]
            items, types, gaps, targets = (t[idx] for t in data.train)
            local_y = student.local_targets(targets)
            mask = local_y > 0
            if not mask.any():
                continue
            if cache is not None:
                soft = cache[idx][mask].float()
            else:
                soft = _soft_targets(teacher, student, items, types, gaps, mask)
            h = student.hidden(items, types, gaps)[mask]
            loss = kd_loss(
                student.local_scores(h, student.seen_positions(items, mask)),
                soft,
                local_y[mask],
                s["temperature"],
                s["alpha"],
                s["top_k"] if s["loss"] == "topk" else 0,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for name, m in masks.items():
                        params[name].mul_(m)
            loss_sum += float(loss.detach())
            steps += 1
            samples += int(mask.sum())
        seconds += time.perf_counter() - started
        score = ndcg(student, data, n_global)
        history.append(
            {"epoch": epoch, "loss": round(loss_sum / max(steps, 1), 5), "valid_ndcg@10": score}
        )
        if on_epoch is not None:
            on_epoch(epoch, score)  # may raise (the search's pruning)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            bad += 1
            if bad >= s["patience"]:
                break
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return {
        "best_valid_ndcg@10": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "train_s": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 1) if seconds else 0.0,
    }


def ms_per_1000_users(
    model: torch.nn.Module, x: torch.Tensor, batch: int = 512, repeats: int = 3
) -> float:
    """Scoring time of inputs ``x`` ((n, 3, L)) in batches, per 1,000 users (best of
    ``repeats``; fewer than 256 rows are repeated to have enough to time); 0 for no rows."""
    if len(x) == 0:
        return 0.0
    while len(x) < 256:
        x = torch.cat([x, x])
    best = float("inf")
    with torch.no_grad():
        model(x[:64])
        for _ in range(repeats):
            t = time.perf_counter()
            for s in range(0, len(x), batch):
                model(x[s : s + batch])
            best = min(best, time.perf_counter() - t)
    return round(1000 * best / len(x) * 1000, 3)


def distill_segment(job: dict[str, Any], teacher_data: bytes) -> dict[str, Any]:
    """One segment's student: catalogue, size under the budget, distillation, its numbers."""
    import os

    task_started = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(job["settings"]["seed"] + job["segment"])
    s = job["settings"]
    teacher = teacher_from_bytes(teacher_data)
    tc = teacher.config
    table = segment_table(job["files"], job["segment_files"], job["segment"])
    data = SegmentData(table, tc.max_len)
    out: dict[str, Any] = {
        "segment": job["segment"],
        "users": data.users,
        "valid_users": data.n_valid,
        "train_windows": data.n_windows,
        "teacher_params": teacher.num_params(),
        "budget": job["budget"],
        "pid": os.getpid(),
        "task_started": task_started,
    }
    out["teacher_valid_ndcg@10"] = ndcg(TeacherScorer(teacher), data, tc.n_items)
    if data.n_windows == 0:
        return {**out, "error": "the segment has no training windows"}
    search = None
    if s.get("search_trials", 0) > 0:
        from patternlake.students.search import search_student

        search = search_student(teacher, data, s, job["budget"])
        if search["chosen"] is not None:
            c = search["chosen"]
            s = {
                **s,
                "catalogue_share": c["catalogue_share"],
                "d_model": [c["d_model"]],
                "n_layers": c["n_layers"],
                "dropout": c["dropout"],
                "lr": c["lr"],
            }
        out["search"] = search
    catalogue = segment_catalogue(data.train[3].numpy().ravel(), s["catalogue_share"])
    cfg = student_config(
        tc, job["budget"], s["d_model"], s["n_layers"], s["n_heads"], s["dropout"], catalogue
    )
    if cfg is None:
        return {**out, "error": f"no student of widths {s['d_model']} fits {job['budget']} params"}
    student = Student(cfg, tc.n_items, catalogue)
    fit = train_student(student, teacher, data, s, s["epochs"])
    model = student.to_bytes(segment=job["segment"])
    return {
        **out,
        **fit,
        "params": student.num_params(),
        "catalogue_items": tc.n_items - 1 if catalogue is None else len(catalogue),
        "config": cfg.to_dict(),
        "bytes": len(model),
        "ms_per_1000_users": ms_per_1000_users(student, data.valid),
        "teacher_ms_per_1000_users": ms_per_1000_users(TeacherScorer(teacher), data.valid),
        "task_finished": time.time(),
        "model": model,
    }


def compress_segment(
    job: dict[str, Any], teacher_data: bytes, student_data: bytes
) -> dict[str, Any]:
    """Prune (each sparsity of ``settings.sparsity``, highest first) with short fine-tuning,
    then int8; the first whose int8 model keeps ``gate`` of the fp32 student's NDCG@10 is
    the result (else the last tried, which the gate then refuses)."""
    torch.set_num_threads(1)
    torch.manual_seed(job["settings"]["seed"] + job["segment"])
    s = job["settings"]
    teacher = teacher_from_bytes(teacher_data)
    fp32 = from_bytes(student_data)
    table = segment_table(job["files"], job["segment_files"], job["segment"])
    data = SegmentData(table, teacher.config.max_len)
    n = fp32.n_global
    base = ndcg(fp32, data, n)
    out: dict[str, Any] = {
        "segment": job["segment"],
        "valid_users": data.n_valid,
        "fp32_valid_ndcg@10": base,
        "fp32_bytes": len(student_data),
        "fp32_ms_per_1000_users": ms_per_1000_users(fp32, data.valid),
        "tried": [],
    }
    chosen = None
    for sparsity in sorted(s["sparsity"], reverse=True):
        pruned = copy.deepcopy(fp32)
        masks: dict[str, torch.Tensor] = {}
        if sparsity > 0:
            state = dict(pruned.named_parameters())
            masks = magnitude_masks({k: state[k] for k in large_tensors(pruned)}, sparsity)
            with torch.no_grad():
                for k, m in masks.items():
                    state[k].mul_(m)
            if s["finetune_epochs"] > 0:
                train_student(pruned, teacher, data, s, s["finetune_epochs"], masks)
        pruned_ndcg = ndcg(pruned, data, n)
        packed = quantized_bytes(pruned, segment=job["segment"], sparsity=sparsity)
        int8 = from_bytes(packed)
        int8_ndcg = ndcg(int8, data, n)
        zeros = sum(int((pruned.state_dict()[k] == 0).sum()) for k in large_tensors(pruned))
        total = sum(pruned.state_dict()[k].numel() for k in large_tensors(pruned))
        tried = {
            "sparsity": sparsity,
            "sparsity_reached": round(zeros / max(total, 1), 4),
            "pruned_valid_ndcg@10": pruned_ndcg,
            "int8_valid_ndcg@10": int8_ndcg,
            "int8_bytes": len(packed),
            "pruned_fp32_bytes": len(pruned.to_bytes()),
        }
        out["tried"].append(tried)
        chosen = (tried, packed, int8)
        if int8_ndcg >= s["gate_int8"] * base:
            break
    tried, packed, int8 = chosen
    return {
        **out,
        **tried,
        "int8_ms_per_1000_users": ms_per_1000_users(int8, data.valid),
        "model": packed,
    }
