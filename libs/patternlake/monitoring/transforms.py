"""Pure statistics of drift monitoring (numpy/scipy only; tested on hand-made counts).

PSI's usual bands (0.1 warn, 0.25 alarm) ignore sample size: two samples of the same
distribution give PSI about ``(B - 1) (1/n + 1/m)`` by chance (B bins, sizes n and m), which
crosses 0.1 with a few hundred rows. Under "no drift", ``PSI / (1/n + 1/m)`` is close to a
chi-square with ``B - 1`` degrees of freedom, so a band only counts when PSI is also above
``chi2.ppf(1 - alpha, B - 1) * (1/n + 1/m)``: the noise floor at level alpha. A small sample
cannot alarm on noise, a large one still alarms on a real shift of the banded size.
The same holds for the Jensen-Shannon divergence of item distributions (``2 n_eff JS`` is
about chi-square in nats); its floor is computed the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

EPS = 1e-4  # share given to an empty bin (PSI's log is undefined at 0)


@dataclass(frozen=True)
class Drift:
    metric: str  # psi | js
    value: float
    floor: float  # the value chance alone exceeds with probability alpha at these sizes
    p_value: float  # chi-square test of the two count vectors
    n_ref: int
    n_cur: int
    bins: int
    status: str  # ok | warn | alarm | too_small


def shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    p = counts / total if total > 0 else np.full(len(counts), 1.0 / max(len(counts), 1))
    p = np.maximum(p, EPS)
    return p / p.sum()


def psi(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins."""
    p, q = shares(ref_counts), shares(cur_counts)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats (0 .. ln 2)."""
    p, q = shares(ref_counts), shares(cur_counts)
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def chi2_p_value(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Chi-square test of homogeneity of the two count vectors (bins empty in both dropped)."""
    table = np.vstack([ref_counts, cur_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(stats.chi2_contingency(table, correction=False)[1])


def noise_floor(metric: str, bins: int, n_ref: int, n_cur: int, alpha: float) -> float:
    """The value of ``metric`` that samples of one distribution exceed with probability alpha."""
    if n_ref == 0 or n_cur == 0 or bins < 2:
        return math.inf
    crit = float(stats.chi2.ppf(1.0 - alpha, bins - 1))
    scale = 1.0 / n_ref + 1.0 / n_cur
    # PSI ~ chi2 * scale; JS (nats) ~ chi2 * scale / 8 (JS ~ chi2-distance / 8 for near shares)
    return crit * scale if metric == "psi" else crit * scale / 8.0


def judge(
    metric: str,
    ref_counts: np.ndarray,
    cur_counts: np.ndarray,
    warn: float,
    alarm: float,
    alpha: float,
    min_rows: int,
) -> Drift:
    """Drift of ``cur_counts`` from ``ref_counts``: ``alarm`` / ``warn`` when the value is at
    or above that band AND above the noise floor; ``too_small`` below ``min_rows``."""
    ref, cur = np.asarray(ref_counts), np.asarray(cur_counts)
    n_ref, n_cur = int(ref.sum()), int(cur.sum())
    value = psi(ref, cur) if metric == "psi" else js_divergence(ref, cur)
    bins = int(((ref + cur) > 0).sum())
    floor = noise_floor(metric, bins, n_ref, n_cur, alpha)
    if min(n_ref, n_cur) < min_rows:
        status = "too_small"
    elif value >= alarm and value > floor:
        status = "alarm"
    elif value >= warn and value > floor:
        status = "warn"
    else:
        status = "ok"
    return Drift(metric, value, floor, chi2_p_value(ref, cur), n_ref, n_cur, bins, status)


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's ``k / bins`` quantiles, k = 1 .. bins - 1, each the
    smallest reference value with at least that share of the reference at or below it
    (numpy's ``inverted_cdf``: what Spark's ``percentile_approx`` returns when exact); ties
    collapse (fewer bins). The in-memory statement of what ``monitor`` computes in Spark."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        return np.array([])
    qs = np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf")
    return np.unique(qs)


def binned(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` per bin ``(edges[i - 1], edges[i]]``: a value's bin is the number
    of edges below it, so an edge value falls in the bin it closes (every reference bin
    but the last holds its edge, hence is never empty)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)


def aligned_counts(
    ref: dict[str, int], cur: dict[str, int], top: int | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Two categorical count maps over one key order; with ``top``, the reference's ``top``
    most frequent keys plus the current's (ties by key), everything else in one ``(other)``
    bin. The in-memory statement of ``monitor.category_counts``."""
    keys = sorted(set(ref) | set(cur))
    if top is not None and len(keys) > top:
        first = lambda kv: (-kv[1], kv[0])  # noqa: E731
        keep = {k for k, _ in sorted(ref.items(), key=first)[:top]}
        keep |= {k for k, _ in sorted(cur.items(), key=first)[:top]}
        other_ref = sum(v for k, v in ref.items() if k not in keep)
        other_cur = sum(v for k, v in cur.items() if k not in keep)
        keys = sorted(keep)
        r = np.array([ref.get(k, 0) for k in keys] + [other_ref])
        c = np.array([cur.get(k, 0) for k in keys] + [other_cur])
        return [*keys, "(other)"], r, c
    return keys, np.array([ref.get(k, 0) for k in keys]), np.array([cur.get(k, 0) for k in keys])


def mean_half_width(values: np.ndarray, alpha: float) -> float:
    """Half-width of the normal confidence interval of the mean of ``values`` at ``alpha``
    (one value: a standard deviation of 1, the widest a gain in [0, 1] can need)."""
    n = len(values)
    return half_width(n, float(np.std(values, ddof=1)) if n > 1 else None, alpha)


def half_width(n: int, sd: float | None, alpha: float) -> float:
    """:func:`mean_half_width` from the count and sample standard deviation of the values
    (``sd`` None or ``n`` < 2: a standard deviation of 1)."""
    sd = 1.0 if n < 2 or sd is None or not math.isfinite(sd) else float(sd)
    return float(stats.norm.ppf(1 - alpha / 2)) * sd / math.sqrt(n)
