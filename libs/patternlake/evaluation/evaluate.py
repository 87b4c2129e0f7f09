"""evaluate: the protocol of DESIGN.md for the registered teacher and two baselines
(popularity, first-order Markov chain), computed in the same run on the same split.

Per user, events ordered by time; users with fewer than 3 events are not evaluated; the
last event is the test target and everything before it the input; full ranking over the
whole catalogue. ``evaluate.mask_history`` removes the user's past items from the ranking
(the output says which was used).

The data is the version the registered teacher was trained on (its run's ``data.version``
and ``data.item_index.version`` tags), not the latest: a newer version may hold items the
model has never seen.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.models.metrics import evaluate_scorer
from patternlake.registry import TEACHER, TEACHER_ALIAS, segment_students
from patternlake.sequencedata import (
    evaluation_arrays,
    first_training_items,
    item_id_count,
    read_table,
    training_arrays,
)
from patternlake.sequences import MIN_EVALUATED_EVENTS

log = logging.getLogger(__name__)
NO_SEGMENT = -1


def load_registered(
    config: Config, name: str = TEACHER, alias: str = TEACHER_ALIAS
) -> torch.nn.Module | None:
    import mlflow

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    try:
        model = mlflow.pytorch.load_model(f"models:/{name}@{alias}", map_location="cpu")
    except Exception as exc:  # not registered yet
        log.info(
            "evaluate: no %s@%s in the registry (%s)", name, alias, str(exc).splitlines()[0][:120]
        )
        return None
    return model.eval()


def trained_on(
    config: Config, name: str = TEACHER, alias: str = TEACHER_ALIAS
) -> tuple[int | None, int | None]:
    """(user_sequences version, item_index version) a registered model was trained on, from
    its run's tags; None for a tag the run lacks."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=config.mlflow.tracking_uri)
    run_id = client.get_model_version_by_alias(name, alias).run_id
    tags = client.get_run(run_id).data.tags

    def tag(key: str) -> int | None:
        return int(tags[key]) if key in tags else None

    return tag("data.version"), tag("data.item_index.version")


def _window(model: torch.nn.Module) -> int:
    """The number of past events a sequential model reads (its ``max_len``)."""
    inner = getattr(model, "teacher", model)
    return int(getattr(getattr(inner, "config", None), "max_len", 0) or 0)


def _routed_scorer(
    per_segment: dict[int, tuple[torch.nn.Module, int]],
    fallback: torch.nn.Module | None,
    stacked: np.ndarray,
    groups: np.ndarray,
) -> tuple[Any, int, int]:
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
                parts[int(seg)] = (rows, model(torch.from_numpy(x[rows][:, :, -_window(model) :])))
        n = next(iter(parts.values()))[1].shape[1]
        out = torch.empty((len(g), n))
        for rows, scores in parts.values():
            out[torch.from_numpy(rows)] = scores.float()
        return out

    params = sum(m.num_params() for m, _ in per_segment.values())
    nbytes = sum(b for _, b in per_segment.values())
    return score, params, nbytes


def model_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def evaluate_models(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module] | None = None,
    data_version: int | None = None,
    item_index_version: int | None = None,
    routed: dict[str, dict[int, tuple[torch.nn.Module, int]]] | None = None,
) -> dict[str, Any]:
    """Evaluates ``models`` (default: the registered teacher, on the data versions it was
    trained on) and the baselines on ``user_sequences@data_version`` (default: latest).

    ``routed``: models that score each user with their segment's model ({name: {segment:
    (model, bytes on disk)}}; users of a segment without one get the teacher's scores).
    Default (with the registered teacher): the newest fp32 and int8 student of every
    segment (``student``, ``student_int8``) and each segment's champion (``champions``)."""
    started = time.monotonic()
    if not lake.exists("user_sequences"):
        raise PatternlakeError(
            "evaluate: user_sequences does not exist yet; run `patternlake run daily` first"
        )
    if models is None:
        teacher = load_registered(config)
        models = {"teacher": teacher} if teacher is not None else {}
        if teacher is not None and data_version is None:
            data_version, item_index_version = trained_on(config)
            if item_index_version is None:
                log.warning(
                    "evaluate: the teacher's run has no data.item_index.version tag (trained "
                    "before it was recorded); using the latest item_index"
                )
    version = lake.version("user_sequences") if data_version is None else data_version
    table = read_table(lake.files("user_sequences", version))
    # every model sees the last ``max_len`` events it was built for: the arrays are as wide
    # as the widest model, and each model takes its own tail of them
    max_len = max([config.teacher.max_len, *(_window(m) for m in (models or {}).values())])
    if item_index_version is None:
        item_index_version = lake.version("item_index")
    n_items = item_id_count(lake, item_index_version)
    users, items, types, gaps, target = evaluation_arrays(table, max_len, "test")
    if len(users) == 0:
        raise PatternlakeError("evaluate: no user has the 3 events the protocol needs")
    seg_of: dict[str, int] = {}
    if lake.exists("segments"):
        seg_of = {
            r.user_id: r.segment_id
            for r in lake.read("segments").select("user_id", "segment_id").collect()
        }
    groups = np.array([seg_of.get(u, NO_SEGMENT) for u in users])
    history = items if config.evaluate.mask_history else None
    train_in, _, _, train_out = training_arrays(table, max_len)

    scorers: dict[str, tuple[Any, int, int]] = {}
    firsts = first_training_items(table)
    pop = Popularity(n_items).fit(train_in, train_out, firsts)
    markov = MarkovChain(n_items).fit(train_in, train_out, firsts)
    scorers["popularity"] = (lambda s: pop.scores(items[s]), pop.num_params(), pop.nbytes())
    scorers["markov"] = (lambda s: markov.scores(items[s]), markov.num_params(), markov.nbytes())
    stacked = np.stack([items, types, gaps], axis=1)  # (n, 3, L)
    champions: dict[int, str] = {}
    if routed is None and "teacher" in models:
        routed, champions = segment_students(
            config, sorted(set(groups.tolist())), config.compress.runtime
        )
    for name, per_segment in (routed or {}).items():
        if per_segment:
            scorers[name] = _routed_scorer(per_segment, models.get("teacher"), stacked, groups)
    for name, model in models.items():

        def score(s: slice, m: torch.nn.Module = model, w: int = _window(model)) -> torch.Tensor:
            with torch.no_grad():
                return m(torch.from_numpy(stacked[s][:, :, -w:]))

        params = sum(p.numel() for p in model.parameters())
        scorers[name] = (score, params, model_bytes(model))

    out: dict[str, Any] = {
        "protocol": {
            "split": "leave-last-out test",
            "min_events": MIN_EVALUATED_EVENTS,
            "ranking": "full catalogue",
            "mask_history": config.evaluate.mask_history,
            "users": int(len(users)),
            "items": int(n_items - 1),
        },
        "data_version": version,
        "item_index_version": item_index_version,
        "models": {},
    }
    if champions:
        out["champions"] = {str(g): c for g, c in champions.items()}
    for name, (score, params, nbytes) in scorers.items():
        t = time.monotonic()
        overall, per = evaluate_scorer(
            score, len(users), target, groups, n_items, config.evaluate.batch_size, history
        )
        sizes = (routed or {}).get(name, {})

        def size(
            g: Any, name: str = name, params: int = params, nbytes: int = nbytes, sizes=sizes
        ) -> tuple[int, int]:
            if name not in (routed or {}):
                return int(params), int(nbytes)
            found = sizes.get(int(g)) if str(g).lstrip("-").isdigit() else None
            if found is None:  # served by the teacher
                return scorers["teacher"][1], scorers["teacher"][2]
            return found[0].num_params(), found[1]

        out["models"][name] = {
            "params": int(params),
            "bytes": int(nbytes),
            "overall": overall,
            "segments": {
                g: {**m, "params": size(g)[0], "bytes": size(g)[1]} for g, m in per.items()
            },
        }
        if name in (routed or {}):
            out["models"][name]["teacher_segments"] = sorted(
                int(g) for g in set(groups.tolist()) if int(g) not in sizes
            )
        log.info(
            "evaluate %s: NDCG@10 %.4f HR@10 %.4f (%.1fs)",
            name,
            overall["ndcg@10"],
            overall["hr@10"],
            time.monotonic() - t,
        )
    log.info(
        "evaluate: %d users, %d models (%.1fs)",
        len(users),
        len(scorers),
        time.monotonic() - started,
    )
    return out
