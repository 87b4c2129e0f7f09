"""Choosing among trained configurations, shared by the teacher's tuning (``tune teacher``)
and the students' architecture search (``distill``): the median pruning rule on per-epoch
validation NDCG@10, the Pareto front of (NDCG@10, parameters) and the choice of one point
of it within a parameter budget. Pure: no Spark, no files; tested on hand-made values."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def best_so_far(history: Sequence[float], epochs: int) -> float:
    """The best validation NDCG@10 within the first ``epochs`` epochs (a trial that stopped
    earlier keeps its final best)."""
    return max(history[:epochs])


def should_prune(
    history: Sequence[float],
    finished: Sequence[Sequence[float]],
    prune_after: int,
    startup_trials: int,
) -> bool:
    """Median rule on the per-epoch validation NDCG@10 (``history``, one value per finished
    epoch): prune once ``prune_after`` epochs are done if the trial's best so far is below the
    median of the finished trials' best at the same epoch (with ``startup_trials`` finished).

    Optuna's MedianPruner does the same for single-objective studies only
    (``Trial.report`` refuses multi-objective ones)."""
    epochs = len(history)
    finished = [h for h in finished if h]
    if epochs < prune_after or len(finished) < startup_trials:
        return False
    median = statistics.median(best_so_far(h, epochs) for h in finished)
    return best_so_far(history, epochs) < median


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials that no other completed trial beats on both objectives (NDCG@10 at
    least as high and no more parameters, better on one), by NDCG@10 descending."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["valid_ndcg_at_10"] is not None]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ge = a["valid_ndcg_at_10"] >= b["valid_ndcg_at_10"] and a["params"] <= b["params"]
        gt = a["valid_ndcg_at_10"] > b["valid_ndcg_at_10"] or a["params"] < b["params"]
        return ge and gt

    front = [r for r in done if not any(dominates(o, r) for o in done)]
    return sorted(front, key=lambda r: (-r["valid_ndcg_at_10"], r["params"], r["trial"]))


def choose(front: Sequence[dict[str, Any]], max_params: int | None) -> dict[str, Any] | None:
    """The front's best NDCG@10 within ``max_params`` parameters; with no budget, or none
    within it, the front's best NDCG@10. None when nothing completed."""
    within = [r for r in front if max_params is None or r["params"] <= max_params]
    pool = within or list(front)
    return max(pool, key=lambda r: (r["valid_ndcg_at_10"], -r["params"])) if pool else None
