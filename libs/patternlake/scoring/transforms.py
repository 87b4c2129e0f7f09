"""Pure pieces of `score`: model inputs from histories, occlusion explanations over the
recommended items only, the deletion-curve faithfulness check and the in-order rule match.
Top-K over the catalogue is ``models.ranking.top_k`` (item chunks). No files, no sessions;
tested on hand-made values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from patternlake.models import ranking

ENCODE_BATCH = 2048  # histories per encoder pass in explanations
PATTERN_FIELDS = ("kind", "antecedent", "consequent", "support", "confidence", "lift")


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


def _one_position(x: torch.Tensor, p: int) -> torch.Tensor:
    mask = torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    mask[:, p] = True
    return mask


def occlusion(
    model: Any,
    x: torch.Tensor,
    items: torch.Tensor,
    last: int,
    base: torch.Tensor | None = None,
    batch: int = ENCODE_BATCH,
) -> torch.Tensor:
    """Leave-one-out: for each of the ``last`` most recent positions p, the drop of each
    recommended item's score when event p is deleted (the history shifted as if it never
    happened). x: (B, 3, L); items: (B, K) -> (B, K, last) drops (0 on padding).

    Only the K items are scored (each deleted history's state against their vectors), and
    the deleted histories of every position and row go through the encoder together,
    ``batch`` at a time. ``base``: the items' scores on x when the caller has them."""
    ranker = ranking.ranker_for(model)
    B, _, L = x.shape
    K = items.shape[1]
    if base is None:
        base = ranking.score_items(ranker, x, items, batch)
    if isinstance(ranker, ranking.DotRanker):
        return _cached_occlusion(ranker, x, items, last, base, batch)
    rows, cols, variants = [], [], []
    for j in range(last):
        present = torch.nonzero(x[:, 0, L - 1 - j] > 0).squeeze(1)
        if len(present):
            variants.append(
                ranking.delete_positions(x[present], _one_position(x[present], L - 1 - j))
            )
            rows.append(present)
            cols.append(torch.full((len(present),), j, device=x.device))
    drops = torch.zeros((B, K, last), device=x.device)
    if not rows:
        return drops
    r, c = torch.cat(rows), torch.cat(cols)
    s = ranking.score_items(ranker, torch.cat(variants), items[r], batch)
    d = base[r] - s
    drops[r, :, c] = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    return drops


def _cached_occlusion(
    ranker: ranking.DotRanker,
    x: torch.Tensor,
    items: torch.Tensor,
    last: int,
    base: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """:func:`occlusion` for a SequentialTeacher-family network: the deleted histories'
    states from ``encode_deletions`` (the shared shifted prefix encoded once per row, each
    deletion's later events against it), scored against the K items with their own windows
    (the seen term)."""
    B, _, L = x.shape
    last = min(last, L)
    rows = max(1, batch // 8)  # histories per pass: their keys and values stay in cache
    local = ranker._local(x[:, 0])
    states = torch.cat(
        [
            ranker.net.encode_deletions(
                local[lo : lo + rows], x[lo : lo + rows, 1], x[lo : lo + rows, 2], last
            )
            for lo in range(0, B, rows)
        ]
    )  # (B, last, D)
    deleted = x[:, 0, L - 1 - torch.arange(last, device=x.device)]  # (B, last); 0: padding
    s = ranker.items_after_deletion(states, x[:, 0], items, deleted)  # (B, last, K)
    d = base.unsqueeze(1) - s
    d = torch.where(torch.isfinite(d) & (deleted > 0).unsqueeze(2), d, torch.zeros_like(d))
    return d.transpose(1, 2).contiguous()  # (B, K, last)


def normalise(drops: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, E) drops -> the ``keep`` positions (0 = most recent) with the largest positive
    drops per item and their weights, summing to 1 over the kept positive ones (all 0 when
    no event raised the score)."""
    pos = drops.clamp_min(0)
    w, idx = pos.topk(min(keep, pos.shape[-1]), dim=-1)
    total = w.sum(-1, keepdim=True)
    return idx, torch.where(total > 0, w / total.clamp_min(1e-12), torch.zeros_like(w))


def deletion_curve(
    model: Any,
    x: torch.Tensor,
    item: torch.Tensor,
    order: torch.Tensor,
    steps: int,
) -> np.ndarray:
    """Mean score of ``item`` (B,) after deleting the first 0..steps positions of ``order``
    ((B, E) positions from the end, 0 = most recent) from each history: a faithful
    explanation's curve falls faster than a random order's."""
    ranker = ranking.ranker_for(model)
    B, _, L = x.shape
    out = []
    for k in range(steps + 1):
        mask = torch.zeros((B, L), dtype=torch.bool, device=x.device)
        for j in range(k):
            mask[torch.arange(B, device=x.device), L - 1 - order[:, j]] = True
        deleted = ranking.delete_positions(x, mask)
        s = ranking.score_items(ranker, deleted, item.unsqueeze(1), ENCODE_BATCH).squeeze(1)
        out.append(float(torch.where(torch.isfinite(s), s, torch.zeros_like(s)).mean()))
    return np.array(out)


def in_order(antecedent: Sequence[int], history: Sequence[int]) -> bool:
    """True where every element of ``antecedent`` occurs in ``history`` in the same order
    (not necessarily adjacent): a greedy left-to-right scan."""
    it = iter(history)
    return all(any(h == a for h in it) for a in antecedent)


Rule = tuple[tuple[int, ...], dict[str, Any]]  # (antecedent item ids, the pattern struct)


def rule_book(rows: Iterable[dict[str, Any]]) -> dict[tuple[int, int], list[Rule]]:
    """(segment, consequent item id) -> its sequential rules, best first (confidence, then
    lift, then support, then the antecedent's names): what :func:`best_rule` scans."""
    book: dict[tuple[int, int], list[tuple[tuple, Rule]]] = {}
    for r in rows:
        if r["kind"] != "sequential" or r["consequent_idx"] is None:
            continue
        pattern = {k: r[k] for k in PATTERN_FIELDS}
        pattern["antecedent"] = list(pattern["antecedent"] or [])
        # best first, a missing measure last (as Spark's descending sort puts nulls)
        key = tuple((r[m] is None, -(r[m] or 0.0)) for m in ("confidence", "lift", "support")) + (
            list(r["antecedent"] or []),
        )
        rule = (tuple(int(i) for i in r["antecedent_idx"] or ()), pattern)
        book.setdefault((int(r["segment_id"]), int(r["consequent_idx"])), []).append((key, rule))
    return {k: [rule for _, rule in sorted(v, key=lambda t: t[0])] for k, v in book.items()}


def best_rule(
    book: dict[tuple[int, int], list[Rule]], segment: int, item: int, recent: Sequence[int]
) -> dict[str, Any] | None:
    """The best rule of the segment with ``item`` as consequent whose antecedent occurs in
    order in ``recent`` (None: no such rule)."""
    for antecedent, pattern in book.get((segment, item), ()):
        if in_order(antecedent, recent):
            return pattern
    return None
