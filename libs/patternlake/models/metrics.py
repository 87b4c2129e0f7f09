"""Ranking metrics of the evaluation protocol (docs/design.md): full ranking over the whole
catalogue, one held-out target per user.

HR@k, NDCG@k, MRR@k for k in (10, 20) and catalogue coverage@10 (share of items that
appear in at least one user's top 10), overall and per segment; each per-user mean with its
95% confidence interval (``<metric>_ci95_low`` / ``_ci95_high``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

METRICS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "coverage@10")
# the largest cut-off: ranks at or past it count as misses in every metric, so the chunked
# protocol stops counting there (``models.ranking.capped_ranks``)
RANK_CAP = 20


def masked_scores(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores with padding (item 0) and, when given, the user's past items ``exclude``
    (B, L) set to -inf; the target itself is never masked.

    A score that is not finite (NaN, +inf, -inf: a diverged model) becomes -inf, so it ranks
    last: a NaN target counts as a miss, never as a hit, and NaN items never enter a top 10."""
    worst = float("-inf")
    s = scores.nan_to_num(nan=worst, posinf=worst, neginf=worst)  # a copy
    s[:, 0] = float("-inf")
    if exclude is not None:
        target_score = s.gather(1, targets.unsqueeze(1))
        s.scatter_(1, exclude, float("-inf"))
        s.scatter_(1, targets.unsqueeze(1), target_score)
        s[:, 0] = float("-inf")
    return s


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items; ties count against the target, so a
    target scored -inf ranks last. Give it ``masked_scores`` (no NaN left)."""
    t = scores.gather(1, targets.unsqueeze(1))
    return (scores >= t).sum(dim=1) - 1


class RankingAccumulator:
    """Collects ranks and top-10 lists batch by batch; reports metrics per group."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.ranks: list[np.ndarray] = []
        self.groups: list[np.ndarray] = []
        self.top10: list[np.ndarray] = []

    def add_ranks(self, ranks: np.ndarray, top10: np.ndarray, groups: np.ndarray) -> None:
        """Ranks and top-10 ids already counted (``models.ranking.target_ranks``)."""
        self.ranks.append(np.asarray(ranks))
        self.top10.append(np.asarray(top10))
        self.groups.append(np.asarray(groups))

    def report(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        ranks = np.concatenate(self.ranks) if self.ranks else np.zeros(0)
        groups = np.concatenate(self.groups) if self.groups else np.zeros(0)
        top = np.concatenate(self.top10) if self.top10 else np.zeros((0, 10), dtype=np.int64)
        overall = _metrics(ranks, top, self.n_items)
        per = {
            str(g): _metrics(ranks[groups == g], top[groups == g], self.n_items)
            for g in np.unique(groups)
        }
        return overall, per


PER_USER = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@10")  # per-user values, averaged


def _metrics(ranks: np.ndarray, top10: np.ndarray, n_items: int) -> dict[str, float]:
    per_user: dict[str, np.ndarray] = {}
    for k in (10, 20):
        hit = ranks < k
        per_user[f"hr@{k}"] = hit.astype(np.float64)
        per_user[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)
    per_user["mrr@10"] = np.where(ranks < 10, 1.0 / (ranks + 1), 0.0)
    n = len(ranks)
    means = {m: float(v.mean()) if n else 0.0 for m, v in per_user.items()}
    sds = {m: float(v.std(ddof=1)) if n > 1 else 0.0 for m, v in per_user.items()}
    covered = len(np.unique(top10[top10 > 0]))
    return summary_metrics(n, means, sds, covered, n_items)


def summary_metrics(
    n: int, means: dict[str, float], sds: dict[str, float], covered: int, n_items: int
) -> dict[str, float]:
    """The report of ``n`` users from each per-user metric's mean and sample standard
    deviation (``PER_USER``) and the number of distinct items in their top 10s: what a
    Spark aggregation returns, and what :func:`_metrics` computes in one process."""
    out: dict[str, float] = {"users": int(n)}
    if n == 0:
        bounds = {f"{m}_ci95_{e}": 0.0 for m in METRICS[:-1] for e in ("low", "high")}
        return out | {m: 0.0 for m in METRICS} | bounds
    for name in PER_USER:
        out[name] = float(means[name])
    out["coverage@10"] = float(covered / max(1, n_items - 1))
    # 95% confidence interval of each per-user mean (normal approximation, clipped to
    # [0, 1]: with a few hundred users one user's hit moves NDCG@10 by ~0.5%)
    for name in PER_USER:
        half = 1.96 * float(sds[name] or 0.0) / np.sqrt(n) if n > 1 else 0.0
        out[f"{name}_ci95_low"] = max(0.0, out[name] - half)
        out[f"{name}_ci95_high"] = min(1.0, out[name] + half)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def evaluate_scorer(
    score: Callable[[slice], torch.Tensor],
    n_users: int,
    targets: np.ndarray,
    groups: np.ndarray,
    n_items: int,
    batch_size: int = 1024,
    history: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``score(slice)`` returns (b, N) scores for those users; ``history`` (n, L) masks the
    users' past items when given."""

    def rank(s: slice, target: torch.Tensor, exclude: torch.Tensor | None):
        scores = masked_scores(score(s).float().cpu(), target, exclude)
        top = torch.topk(scores, 10, dim=1)
        # an item scored -inf (masked, or not finite) is in no one's top 10: coverage skips 0
        return target_ranks(scores, target), torch.where(top.values > float("-inf"), top.indices, 0)

    return evaluate_ranks(rank, n_users, targets, groups, n_items, batch_size, history)


RankFn = Callable[[slice, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def evaluate_ranks(
    rank: RankFn,
    n_users: int,
    targets: np.ndarray,
    groups: np.ndarray,
    n_items: int,
    batch_size: int = 1024,
    history: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """:func:`evaluate_scorer` without a (users x catalogue) matrix: ``rank(slice, targets,
    exclude)`` returns those users' target ranks and top-10 ids, counted over item chunks
    (:func:`ranker_ranks`)."""
    acc = RankingAccumulator(n_items)
    for s in _slices(n_users, batch_size):
        exclude = torch.from_numpy(history[s]) if history is not None else None
        ranks, top = rank(s, torch.from_numpy(targets[s]), exclude)
        acc.add_ranks(ranks.cpu().numpy(), top.cpu().numpy(), groups[s])
    return acc.report()


def ranker_ranks(ranker: Any, inputs: Callable[[slice], Any]) -> RankFn:
    """The rank function of a ``models.ranking`` ranker over ``inputs(users)``: ranks past
    ``RANK_CAP`` are returned as ``RANK_CAP`` (a miss in every metric)."""
    from patternlake.models import ranking

    def rank(s: slice, targets: torch.Tensor, exclude: torch.Tensor | None):
        x = inputs(s)
        if isinstance(x, torch.Tensor):  # the model's device (CUDA in training)
            targets = targets.to(x.device)
            exclude = exclude.to(x.device) if exclude is not None else None
        with torch.no_grad():
            return ranking.target_ranks(ranker, ranker.encode(x), targets, exclude, cap=RANK_CAP)

    return rank


def _slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
