"""Pure pieces of the student stages (no Spark, no files): the student's size under the byte
budget and magnitude pruning masks (the gates are ``students.gates``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from patternlake.models.student import Student, quantized_bytes
from patternlake.models.teacher import TeacherConfig


def student_config(
    teacher: TeacherConfig,
    budget_bytes: int,
    widths: list[int],
    n_layers: int,
    n_heads: int,
    dropout: float,
    item_share: float = 0.0,
) -> tuple[TeacherConfig, int] | None:
    """The widest student over the whole catalogue (first of ``widths``, widest first) whose
    served file -- int8 rows with per-row scales (``quantized_bytes``) -- is within
    ``budget_bytes``, and that file's size; None if even the narrowest does not fit. The
    size is measured on initial weights (the int8 values compress a little; a trained file
    was 2% larger on MovieLens-100k: ``compress`` checks it against the budget again).
    The student keeps the teacher's window, vocabularies, softmax and seen term.
    ``item_share`` > 0: a low-rank item table of rank ``item_share`` x the width (the bytes
    it saves go to a wider encoder)."""
    for d in sorted(widths, reverse=True):
        if d % n_heads:
            continue
        rank = max(1, round(d * item_share)) if item_share > 0 else 0
        c = replace(
            teacher, d_model=d, n_layers=n_layers, n_heads=n_heads, dropout=dropout, item_rank=rank
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            size = len(quantized_bytes(Student(c, teacher.n_items, None)))
        if size <= budget_bytes:
            return c, size
    return None


def magnitude_masks(tensors: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Per tensor, keep the largest-magnitude ``1 - sparsity`` share of the weights (ties
    broken by position, so the count is exact). Padding rows that are already zero count as
    pruned first."""
    masks = {}
    for name, w in tensors.items():
        flat = w.detach().abs().flatten()
        keep = int(round(flat.numel() * (1 - sparsity)))
        m = torch.zeros_like(flat, dtype=torch.bool)
        if keep > 0:
            m[torch.topk(flat, keep, sorted=False).indices] = True
        masks[name] = m.view_as(w)
    return masks


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The fields of a task result worth logging (no model bytes, no history)."""
    return {k: v for k, v in result.items() if k not in ("model", "history", "tried")}
