"""Pure pieces of `score`: model inputs from histories, top-K, occlusion explanations, the
deletion-curve faithfulness check and the in-order rule match (a Spark Column expression).
No files, no sessions; tested on hand-made values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from pyspark.sql import Column
from pyspark.sql import functions as F


def windows(
    item_seqs: Sequence[Sequence[int]],
    type_seqs: Sequence[Sequence[int]],
    gap_seqs: Sequence[Sequence[int]],
    max_len: int,
    n_items: int,
) -> torch.Tensor:
    """The last ``max_len`` events of every history, left-padded: (B, 3, L) int64. Items the
    model does not know (ids >= ``n_items``, newer than the model) become padding."""
    out = np.zeros((len(item_seqs), 3, max_len), dtype=np.int64)
    for row, seqs in enumerate(zip(item_seqs, type_seqs, gap_seqs, strict=True)):
        items = np.asarray(seqs[0], dtype=np.int64)[-max_len:]
        n = len(items)
        if n == 0:
            continue
        known = items < n_items
        out[row, 0, max_len - n :] = np.where(known, items, 0)
        out[row, 1, max_len - n :] = np.where(known, np.asarray(seqs[1])[-n:], 0)
        out[row, 2, max_len - n :] = np.where(known, np.asarray(seqs[2])[-n:], 0)
    return torch.from_numpy(out)


def top_k(
    scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k best items of each row; padding (0), -inf items and, with
    ``exclude`` ((B, L) item ids), the user's past items are never returned (a row with
    fewer than k scorable items gets -inf values at its end, which callers drop)."""
    s = scores.clone()
    s[:, 0] = float("-inf")
    if exclude is not None:
        s.scatter_(1, exclude, float("-inf"))
        s[:, 0] = float("-inf")
    values, ids = s.topk(min(k, s.shape[1]), dim=1)
    return values, ids


def delete_positions(x: torch.Tensor, row_positions: torch.Tensor) -> torch.Tensor:
    """x (B, 3, L) with, in each row b, the events at ``row_positions[b]`` (a boolean (B, L)
    mask) removed and the rest shifted right (left padding grows): the history as if those
    events had not happened."""
    B, _, L = x.shape
    keep = ~row_positions & (x[:, 0] > 0)
    out = torch.zeros_like(x)
    for b in range(B):
        kept = x[b][:, keep[b]]
        if kept.shape[1]:
            out[b, :, L - kept.shape[1] :] = kept
    return out


def occlusion(
    score: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    items: torch.Tensor,
    last: int,
) -> torch.Tensor:
    """Leave-one-out: for each of the ``last`` most recent positions p, the drop of each
    recommended item's score when event p is deleted (the history shifted as if it never
    happened). x: (B, 3, L); items: (B, K) -> (B, K, last) drops (0 on padding)."""
    B, _, L = x.shape
    base = score(x).gather(1, items)  # (B, K)
    drops = torch.zeros((B, items.shape[1], last))
    for j in range(last):
        p = L - 1 - j
        mask = torch.zeros((B, L), dtype=torch.bool)
        mask[:, p] = True
        present = x[:, 0, p] > 0
        if not present.any():
            continue
        s = score(delete_positions(x, mask)).gather(1, items)
        d = torch.where(torch.isfinite(s), base - s, torch.zeros_like(s))
        drops[:, :, j] = torch.where(present.unsqueeze(1), d, torch.zeros_like(d))
    return drops


def normalise(drops: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, E) drops -> the ``keep`` positions (0 = most recent) with the largest positive
    drops per item and their weights, summing to 1 over the kept positive ones (all 0 when
    no event raised the score)."""
    pos = drops.clamp_min(0)
    w, idx = pos.topk(min(keep, pos.shape[-1]), dim=-1)
    total = w.sum(-1, keepdim=True)
    return idx, torch.where(total > 0, w / total.clamp_min(1e-12), torch.zeros_like(w))


def deletion_curve(
    score: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    item: torch.Tensor,
    order: torch.Tensor,
    steps: int,
) -> np.ndarray:
    """Mean score of ``item`` (B,) after deleting the first 0..steps positions of ``order``
    ((B, E) positions from the end, 0 = most recent) from each history: a faithful
    explanation's curve falls faster than a random order's."""
    B, _, L = x.shape
    out = []
    for k in range(steps + 1):
        mask = torch.zeros((B, L), dtype=torch.bool)
        for j in range(k):
            mask[torch.arange(B), L - 1 - order[:, j]] = True
        s = score(delete_positions(x, mask)).gather(1, item.unsqueeze(1)).squeeze(1)
        out.append(float(torch.where(torch.isfinite(s), s, torch.zeros_like(s)).mean()))
    return np.array(out)


def in_order(antecedent: Column, history: Column) -> Column:
    """True where every element of ``antecedent`` occurs in ``history`` in the same order
    (not necessarily adjacent): a greedy left-to-right scan with ``aggregate``."""
    matched = F.aggregate(
        history,
        F.lit(0),
        lambda acc, x: F.when(
            (acc < F.size(antecedent)) & (x == F.try_element_at(antecedent, acc + 1)), acc + 1
        ).otherwise(acc),
    )
    return matched == F.size(antecedent)
