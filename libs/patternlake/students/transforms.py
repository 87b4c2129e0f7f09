"""Pure pieces of the student stages (no Spark, no files): the segment catalogue, the
student size under the parameter budget, magnitude pruning masks, and the promotion gates."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from patternlake.models.student import count_params
from patternlake.models.teacher import TeacherConfig


def segment_catalogue(targets: np.ndarray, share: float) -> np.ndarray | None:
    """The fewest items (most frequent first, ties by id) that cover ``share`` of the
    segment's training targets; None for share >= 1 (the whole catalogue)."""
    if share >= 1:
        return None
    t = targets[targets > 0]
    if len(t) == 0:
        return np.zeros(0, dtype=np.int64)
    ids, counts = np.unique(t, return_counts=True)
    order = np.lexsort((ids, -counts))
    covered = np.cumsum(counts[order]) / counts.sum()
    n = int(np.searchsorted(covered, share, side="left")) + 1
    return np.sort(ids[order[:n]]).astype(np.int64)


def student_config(
    teacher: TeacherConfig,
    budget: int,
    widths: list[int],
    n_layers: int,
    n_heads: int,
    dropout: float,
    catalogue: np.ndarray | None,
) -> TeacherConfig | None:
    """The widest student (first of ``widths``, widest first) whose parameters, embeddings
    counted, are within ``budget``; None if even the narrowest does not fit."""
    n_items = teacher.n_items if catalogue is None else len(catalogue) + 2
    for d in sorted(widths, reverse=True):
        if d % n_heads:
            continue
        c = replace(
            teacher,
            n_items=n_items,
            d_model=d,
            n_layers=n_layers,
            n_heads=n_heads,
            dropout=dropout,
            sampled_softmax=0,
        )
        if count_params(c) <= budget:
            return c
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


@dataclass(frozen=True)
class Gate:
    passed: bool
    ratio: float | None
    reason: str


def gate(candidate: float, reference: float, threshold: float, users: int, min_users: int) -> Gate:
    """A candidate's validation NDCG@10 against its reference's on the same users: promoted
    if ``candidate >= threshold * reference`` and there are enough users to tell."""
    ratio = candidate / reference if reference > 0 else (1.0 if candidate >= reference else 0.0)
    if users < min_users:
        return Gate(False, ratio, f"{users} validation users < min_users {min_users}")
    if not np.isfinite(candidate):
        return Gate(False, None, "the candidate's NDCG@10 is not finite")
    if candidate >= threshold * reference:
        return Gate(True, ratio, f"{candidate:.4f} >= {threshold:g} x {reference:.4f}")
    return Gate(False, ratio, f"{candidate:.4f} < {threshold:g} x {reference:.4f}")


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The fields of a task result worth logging (no model bytes, no history)."""
    return {k: v for k, v in result.items() if k not in ("model", "history", "tried")}
