"""The students' gates, decided on per-user numbers so that noise cannot pass them.

* :func:`paired_bootstrap` -- the ratio of a candidate's mean per-user NDCG@10 to its
  reference's on the same users, with a one-sided interval from resampling the *users*
  (each resample keeps a user's two values together, so what the two models share -- an
  easy or hard user -- cancels out);
* :func:`promotion` -- non-inferiority: promoted only when the interval's lower bound clears
  the threshold (a point estimate above it on a few hundred users is not enough);
* :func:`harm` -- a per-segment guard: the segment falls back to the reference only when the
  candidate is *significantly* below ``floor`` x the reference there (the upper bound under
  it, at a level corrected for the number of segments, :func:`harm_level`), so a small
  segment's noise neither promotes nor demotes on its own;
* :func:`fidelity` -- an int8 model against its fp32 model on every validation input: the
  mean overlap of their top 10s and the correlation of their scores on those items.

Everything here is plain numpy/torch on arrays the stages compute (no Spark, no files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from patternlake.models import ranking
from patternlake.models.metrics import ranker_ranks

LEVEL = 0.90  # one-sided: the lower (upper) bound is the 10th (90th) percentile


def per_user_ndcg(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of one held-out target per user from its 0-based rank."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def ranks_and_top10(
    model: torch.nn.Module, x: np.ndarray, target: np.ndarray, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's target rank (capped at ``metrics.RANK_CAP``) and top-10 ids under ``model``,
    counted over item chunks (``metrics.ranker_ranks``); ``x`` (n, 3, L) inputs."""
    model.eval()
    rank = ranker_ranks(
        ranking.ranker_for(model), lambda s: torch.from_numpy(np.ascontiguousarray(x[s]))
    )
    ranks, tops = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 10), dtype=np.int64)]
    for start in range(0, len(target), batch):
        s = slice(start, start + batch)
        r, top = rank(s, torch.from_numpy(target[s]), None)
        ranks.append(r.numpy())
        tops.append(top.numpy())
    return np.concatenate(ranks), np.concatenate(tops)


@dataclass(frozen=True)
class Interval:
    """A candidate's mean over its reference's mean on the same users."""

    users: int
    candidate: float  # mean per-user value
    reference: float
    ratio: float  # candidate / reference
    lower: float  # the ratio's one-sided LEVEL lower bound
    upper: float  # ... and upper bound
    wide_upper: float | None = None  # an upper bound at a higher level (``harm``'s), if asked

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def text(self) -> str:
        return (
            f"{self.ratio:.3f}x (90% bounds {self.lower:.3f}-{self.upper:.3f}, "
            f"{self.users} users: {self.candidate:.4f} vs {self.reference:.4f})"
        )


def _ratio(c: float, r: float) -> float:
    if r > 0:
        return c / r
    return 1.0 if c >= r else 0.0


def paired_bootstrap(
    candidate: np.ndarray,
    reference: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    wide_level: float | None = None,
) -> Interval:
    """The ratio of means and its one-sided 90% bounds from ``resamples`` resamples of the
    users (paired: a user's two values stay together); ``wide_level``: also the upper bound
    at that level (``wide_upper``)."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError("paired values: one candidate and one reference value per user")
    n = len(c)
    point = _ratio(float(c.mean()) if n else 0.0, float(r.mean()) if n else 0.0)
    if n == 0:
        return Interval(0, 0.0, 0.0, point, 0.0, float("inf"), float("inf"))
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    per = max(1, min(resamples, 20_000_000 // n))  # resamples per draw: bounded memory
    for start in range(0, resamples, per):
        m = min(per, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        cs, rs = c[idx].sum(1), r[idx].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[start : start + m] = np.where(rs > 0, cs / rs, np.where(cs >= rs, 1.0, 0.0))
    lo, hi = np.quantile(ratios, [1 - LEVEL, LEVEL])
    wide = float(np.quantile(ratios, wide_level)) if wide_level is not None else None
    return Interval(n, float(c.mean()), float(r.mean()), point, float(lo), float(hi), wide)


@dataclass(frozen=True)
class Decision:
    passed: bool
    interval: Interval
    reason: str


def promotion(interval: Interval, threshold: float, min_users: int) -> Decision:
    """Non-inferiority: the ratio's 90% lower bound at or above ``threshold``."""
    if interval.users < min_users:
        return Decision(False, interval, f"{interval.users} gate users < min_users {min_users}")
    if not np.isfinite(interval.candidate):
        return Decision(False, interval, "the candidate's NDCG@10 is not finite")
    if interval.reference <= 0:  # 0 / 0 would read as a ratio of 1
        return Decision(
            False, interval, "the reference ranks no gate target in its top 10: nothing to judge"
        )
    ok = interval.lower >= threshold
    sign = ">=" if ok else "<"
    return Decision(
        ok, interval, f"lower bound {interval.lower:.3f} {sign} {threshold:g}: {interval.text()}"
    )


def harm_level(segments: int) -> float:
    """The one-sided level of each segment's harm guard: 90% over all the segments together
    (Bonferroni), so that with many segments one small segment's bad draw does not send it
    back to the teacher by chance."""
    return 1 - (1 - LEVEL) / max(1, segments)


def harm(interval: Interval, floor: float, min_users: int = 0) -> Decision:
    """``passed`` False (fall back) when the candidate is significantly below ``floor`` x
    the reference: the ratio's upper bound (``wide_upper`` when computed, see
    :func:`harm_level`; else the 90% one) under ``floor``. Fewer than ``min_users`` users:
    no verdict of its own (passed)."""
    upper = interval.wide_upper if interval.wide_upper is not None else interval.upper
    if interval.users < min_users:
        return Decision(
            True, interval, f"{interval.users} gate users < min_users {min_users}: no guard"
        )
    bad = interval.users > 0 and upper < floor
    sign = "<" if bad else ">="
    return Decision(
        not bad, interval, f"upper bound {upper:.3f} {sign} {floor:g}: {interval.text()}"
    )


@torch.no_grad()
def fidelity(
    model: torch.nn.Module, reference: torch.nn.Module, x: np.ndarray, batch: int = 512
) -> dict[str, float]:
    """``model`` (int8) against ``reference`` (its fp32 model) on inputs ``x`` (n, 3, L):
    the mean share of the reference's top 10 that ``model`` also ranks in its top 10, and the
    correlation of the two models' scores on the reference's top 10 (each user's scores
    centred on their mean, so that a shift common to a user's items does not count)."""
    model.eval()
    reference.eval()
    a, b = ranking.ranker_for(model), ranking.ranker_for(reference)
    overlap, xs, ys = [], [], []
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch]))
        sa, sb = a.encode(xb), b.encode(xb)
        _, top_a = ranking.top_k(a, sa, 10)
        _, top_b = ranking.top_k(b, sb, 10)
        overlap.append((top_a.unsqueeze(2) == top_b.unsqueeze(1)).any(2).float().mean(1))
        va, vb = a.items(sa, top_b), b.items(sb, top_b)
        xs.append(va - va.mean(1, keepdim=True))
        ys.append(vb - vb.mean(1, keepdim=True))
    if not overlap:
        return {"top10_overlap": 1.0, "score_correlation": 1.0, "inputs": 0}
    u, v = torch.cat(xs).flatten().double(), torch.cat(ys).flatten().double()
    finite = torch.isfinite(u) & torch.isfinite(v)
    u, v = u[finite], v[finite]
    denom = float(u.norm() * v.norm())
    return {
        "top10_overlap": float(torch.cat(overlap).mean()),
        "score_correlation": float((u @ v) / denom) if denom > 0 else 1.0,
        "inputs": len(x),
    }
