"""Evaluation transforms: scorers, per-user segments and the report rows; no lake, no
registry, no conf object.

A *scorer* is ``(rank, params, bytes)``: ``rank(users, targets, exclude)`` takes a slice of
the evaluated users and returns their targets' ranks and top-10 ids, counted over item
chunks (``models.ranking``: no (users x catalogue) matrix, whatever the catalogue); params
and bytes are what serving it costs. The order of
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
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from patternlake.errors import PatternlakeError
from patternlake.models import ranking
from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.models.metrics import RankFn, evaluate_ranks, ranker_ranks
from patternlake.sequence_reader import first_training_items, training_arrays
from patternlake.sequence_schema import MIN_EVALUATED_EVENTS

log = logging.getLogger(__name__)
NO_SEGMENT = -1

Scorer = tuple[RankFn, int, int]  # rank(users, targets, exclude) -> (ranks, top 10), params, bytes
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
        "popularity": (
            ranker_ranks(pop.ranker(), lambda s: items[s]),
            pop.num_params(),
            pop.nbytes(),
        ),
        "markov": (
            ranker_ranks(markov.ranker(), lambda s: items[s]),
            markov.num_params(),
            markov.nbytes(),
        ),
    }


def model_scorer(model: torch.nn.Module, stacked: np.ndarray) -> Scorer:
    """One network for every user; ``stacked`` (n, 3, L): items, types, gaps."""
    w = window(model)
    rank = ranker_ranks(
        ranking.ranker_for(model), lambda s: torch.from_numpy(stacked[s][:, :, -w:])
    )
    return rank, *_model_size(model)


def _model_size(model: torch.nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), model_bytes(model)


def _routed_size(per_segment: PerSegment) -> tuple[int, int]:
    """What serving every segment's model costs: their params and bytes on disk, a model
    that several segments share (the shared student) counted once, and so is the shared
    file a segment head runs on (``shared_file``: version, bytes, params)."""
    files: dict[Any, tuple[int, int]] = {}
    for m, b in per_segment.values():
        key = getattr(m, "file_version", None) or id(m)
        shared = getattr(m, "shared_file", None)
        if shared is None:
            files[key] = (m.num_params(), b)
        else:
            version, shared_bytes, shared_params = shared
            files[key] = (m.num_params() - shared_params, b)
            files[version] = (shared_params, shared_bytes)
    return sum(p for p, _ in files.values()), sum(b for _, b in files.values())


def model_sizes(
    models: dict[str, torch.nn.Module], routed: dict[str, PerSegment]
) -> dict[str, tuple[int, int]]:
    """(params, bytes) of every scorer :func:`scorers` builds from ``models`` and
    ``routed`` (the baselines aside), without building them."""
    out = {name: _routed_size(per) for name, per in routed.items() if per}
    return out | {name: _model_size(m) for name, m in models.items()}


def routed_scorer(
    per_segment: PerSegment,
    fallback: torch.nn.Module | None,
    stacked: np.ndarray,
    groups: np.ndarray,
) -> Scorer:
    """Scores each user with the model of their segment (the fallback where there is none);
    params and bytes: the total to serve every segment's model."""

    rankers = {g: ranking.ranker_for(m) for g, (m, _) in per_segment.items()}
    fallback_ranker = ranking.ranker_for(fallback) if fallback is not None else None

    def rank(
        s: slice, targets: torch.Tensor, exclude: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = stacked[s]
        g = groups[s]
        ranks = torch.empty(len(g), dtype=torch.int64)
        top: torch.Tensor | None = None
        with torch.no_grad():
            for seg in np.unique(g):
                model = per_segment.get(int(seg), (fallback, 0))[0]
                if model is None:
                    raise PatternlakeError(f"evaluate: no model for segment {seg}")
                ranker = rankers.get(int(seg), fallback_ranker)
                rows = torch.from_numpy(np.nonzero(g == seg)[0])
                state = ranker.encode(torch.from_numpy(x[rows.numpy()][:, :, -window(model) :]))
                part_exclude = exclude[rows] if exclude is not None else None
                r, t = ranking.target_ranks(ranker, state, targets[rows], part_exclude)
                if top is None:
                    top = torch.empty((len(g), t.shape[1]), dtype=torch.int64)
                ranks[rows], top[rows] = r, t
        assert top is not None
        return ranks, top

    return rank, *_routed_size(per_segment)


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
        model, own = found
        shared = getattr(model, "shared_file", None)  # a head's segment needs its base too
        return model.num_params(), own + (shared[1] if shared else 0)

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
    for name, (rank, params, nbytes) in scored.items():
        t = time.monotonic()
        overall, per = evaluate_ranks(
            rank, len(target), target, groups, n_items, batch_size, history
        )
        teacher = scored["teacher"][1:] if "teacher" in scored else None
        out[name] = model_report(overall, per, params, nbytes, groups, routed.get(name), teacher)
        seconds = time.monotonic() - t
        out[name]["users_per_s"] = round(len(target) / seconds, 1) if seconds > 0 else None
        log.info(
            "evaluate %s: NDCG@10 %.4f HR@10 %.4f (%.1fs)",
            name,
            overall["ndcg@10"],
            overall["hr@10"],
            time.monotonic() - t,
        )
    return out
