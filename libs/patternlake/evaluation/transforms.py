"""Evaluation transforms: scorers, per-user segments and the report rows; no lake, no
registry, no conf object.

A *scorer* is ``(score, params, bytes)``: ``score(users)`` takes a slice of the evaluated
users and returns their (b, N) scores over the whole catalogue (N = item ids, padding
included); params and bytes are what serving it costs. The order of
:func:`patternlake.evaluation.evaluate.evaluate_models`: :func:`segment_groups`, the
scorers (:func:`baseline_scorers`, :func:`routed_scorer`, :func:`model_scorer`, merged by
:func:`scorers`), then :func:`model_reports` (metrics and sizes per model and segment) next
to :func:`protocol`.

Invariants: every scorer ranks the same users on the same targets; a model reads the last
``max_len`` (:func:`window`) of the inputs, which are as wide as the widest model; a routed
model's users without a model of their segment are scored, and counted in size, as the
teacher (the fallback).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from patternlake.errors import PatternlakeError
from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.models.metrics import evaluate_scorer
from patternlake.sequence_reader import first_training_items, training_arrays
from patternlake.sequence_schema import MIN_EVALUATED_EVENTS

log = logging.getLogger(__name__)
NO_SEGMENT = -1

Scorer = tuple[Callable[[slice], torch.Tensor], int, int]  # score(users) -> (b, N), params, bytes
PerSegment = dict[int, tuple[torch.nn.Module, int]]  # segment -> (model, bytes on disk)


def window(model: torch.nn.Module) -> int:
    """The number of past events a sequential model reads (its ``max_len``); 0 (all of
    them) for a model without one."""
    inner = getattr(model, "teacher", model)
    return int(getattr(getattr(inner, "config", None), "max_len", 0) or 0)


def model_bytes(model: torch.nn.Module) -> int:
    """The size of the model's ``state_dict`` saved with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def segment_groups(users: np.ndarray, segment_of: dict[str, int]) -> np.ndarray:
    """(n,) each user's segment id, ``NO_SEGMENT`` for a user without one."""
    return np.array([segment_of.get(u, NO_SEGMENT) for u in users])


def baseline_scorers(
    table: pa.Table, n_items: int, max_len: int, items: np.ndarray
) -> dict[str, Scorer]:
    """Popularity and first-order Markov chain, fitted on the training part of ``table``
    (``user_sequences``) and scoring the users' inputs ``items`` (n, L)."""
    train_in, _, _, train_out = training_arrays(table, max_len)
    firsts = first_training_items(table)
    pop = Popularity(n_items).fit(train_in, train_out, firsts)
    markov = MarkovChain(n_items).fit(train_in, train_out, firsts)
    return {
        "popularity": (lambda s: pop.scores(items[s]), pop.num_params(), pop.nbytes()),
        "markov": (lambda s: markov.scores(items[s]), markov.num_params(), markov.nbytes()),
    }


def model_scorer(model: torch.nn.Module, stacked: np.ndarray) -> Scorer:
    """One network for every user; ``stacked`` (n, 3, L): items, types, gaps."""
    w = window(model)

    def score(s: slice) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.from_numpy(stacked[s][:, :, -w:]))

    return score, sum(p.numel() for p in model.parameters()), model_bytes(model)


def routed_scorer(
    per_segment: PerSegment,
    fallback: torch.nn.Module | None,
    stacked: np.ndarray,
    groups: np.ndarray,
) -> Scorer:
    """Scores each user with the model of their segment (the fallback where there is none);
    params and bytes: the total to serve every segment's model."""

    def score(s: slice) -> torch.Tensor:
        x = stacked[s]
        g = groups[s]
        parts: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for seg in np.unique(g):
                model = per_segment.get(int(seg), (fallback, 0))[0]
                if model is None:
                    raise PatternlakeError(f"evaluate: no model for segment {seg}")
                rows = np.nonzero(g == seg)[0]
                parts[int(seg)] = (rows, model(torch.from_numpy(x[rows][:, :, -window(model) :])))
        n = next(iter(parts.values()))[1].shape[1]
        out = torch.empty((len(g), n))
        for rows, scores in parts.values():
            out[torch.from_numpy(rows)] = scores.float()
        return out

    params = sum(m.num_params() for m, _ in per_segment.values())
    nbytes = sum(b for _, b in per_segment.values())
    return score, params, nbytes


def scorers(
    baselines: dict[str, Scorer],
    models: dict[str, torch.nn.Module],
    routed: dict[str, PerSegment],
    stacked: np.ndarray,
    groups: np.ndarray,
) -> dict[str, Scorer]:
    """Every scorer by name, in report order: the baselines, the routed models (those with
    at least one segment's model; the others' users fall back to ``models["teacher"]``),
    then ``models``."""
    out = dict(baselines)
    for name, per_segment in routed.items():
        if per_segment:
            out[name] = routed_scorer(per_segment, models.get("teacher"), stacked, groups)
    for name, model in models.items():
        out[name] = model_scorer(model, stacked)
    return out


def protocol(mask_history: bool, n_users: int, n_items: int) -> dict[str, Any]:
    """What was measured: leave-last-out test, full ranking over ``n_items - 1`` items (id 0
    is padding)."""
    return {
        "split": "leave-last-out test",
        "min_events": MIN_EVALUATED_EVENTS,
        "ranking": "full catalogue",
        "mask_history": mask_history,
        "users": int(n_users),
        "items": int(n_items - 1),
    }


def model_report(
    overall: dict[str, float],
    per: dict[str, dict[str, float]],
    params: int,
    nbytes: int,
    groups: np.ndarray,
    routed: PerSegment | None = None,
    teacher: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One model's entry: its size, overall metrics and per-segment metrics with the size
    serving that segment. For a routed model (``routed``: its models by segment) a segment
    without its own model is served by the teacher (``teacher``: its params and bytes) and
    listed in ``teacher_segments``."""

    def size(g: str) -> tuple[int, int]:
        if routed is None:
            return int(params), int(nbytes)
        found = routed.get(int(g)) if g.lstrip("-").isdigit() else None
        if found is None:  # served by the teacher
            return teacher
        return found[0].num_params(), found[1]

    report: dict[str, Any] = {
        "params": int(params),
        "bytes": int(nbytes),
        "overall": overall,
        "segments": {g: {**m, "params": size(g)[0], "bytes": size(g)[1]} for g, m in per.items()},
    }
    if routed is not None:
        report["teacher_segments"] = sorted(
            int(g) for g in set(groups.tolist()) if int(g) not in routed
        )
    return report


def model_reports(
    scored: dict[str, Scorer],
    target: np.ndarray,
    groups: np.ndarray,
    n_items: int,
    batch_size: int,
    history: np.ndarray | None,
    routed: dict[str, PerSegment],
) -> dict[str, dict[str, Any]]:
    """:func:`model_report` of every scorer on the users' ``target`` (n,); ``history`` (n,
    L): the past items to mask from the ranking, or None."""
    out = {}
    for name, (score, params, nbytes) in scored.items():
        t = time.monotonic()
        overall, per = evaluate_scorer(
            score, len(target), target, groups, n_items, batch_size, history
        )
        teacher = scored["teacher"][1:] if "teacher" in scored else None
        out[name] = model_report(overall, per, params, nbytes, groups, routed.get(name), teacher)
        log.info(
            "evaluate %s: NDCG@10 %.4f HR@10 %.4f (%.1fs)",
            name,
            overall["ndcg@10"],
            overall["hr@10"],
            time.monotonic() - t,
        )
    return out
