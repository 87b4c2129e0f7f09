"""evaluate: the protocol of docs/design.md for the registered teacher and two baselines
(popularity, first-order Markov chain), computed in the same run on the same split.

Per user, events ordered by time; users with fewer than 3 events are not evaluated; the
last event is the test target and everything before it the input; full ranking over the
whole catalogue. ``evaluate.mask_history`` removes the user's past items from the ranking
(the output says which was used).

The data is the version the registered teacher was trained on (its run's ``data.version``
and ``data.item_index.version`` tags), not the latest: a newer version may hold items the
model has never seen.

Inputs: ``user_sequences`` and ``item_index`` (those versions), ``segments`` when present
(per-segment metrics), the registry (teacher, students, champions). Output: the report
(a dict; nothing is written). This module is the I/O shell; the scorers and the report
rows are in :mod:`patternlake.evaluation.transforms`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import SparkSession

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.evaluation.transforms import (
    PerSegment,
    baseline_scorers,
    model_report,
    model_reports,
    model_sizes,
    protocol,
    scorers,
    segment_groups,
    window,
)
from patternlake.lake import Lake
from patternlake.registry import TEACHER, TEACHER_ALIAS, segment_students
from patternlake.sequence_reader import evaluation_arrays, item_id_count, read_table
from patternlake.sequence_schema import pinned_sequence_files

log = logging.getLogger(__name__)


def load_registered(
    config: Config, name: str = TEACHER, alias: str = TEACHER_ALIAS
) -> torch.nn.Module | None:
    import mlflow

    from patternlake.registry import absent, answering, require_store

    require_store(config, "evaluate")
    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    with answering(config, f"evaluate: loading {name}@{alias}"):
        try:
            model = mlflow.pytorch.load_model(f"models:/{name}@{alias}", map_location="cpu")
        except Exception as exc:
            if not absent(exc):
                raise
            log.info(
                "evaluate: no %s@%s in the registry (%s)",
                name,
                alias,
                str(exc).splitlines()[0][:120],
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


def registered_teacher(
    config: Config, data_version: int | None, item_index_version: int | None
) -> tuple[dict[str, torch.nn.Module], int | None, int | None]:
    """The models to evaluate by default ({"teacher": the registered teacher}, or none) and
    the data versions: the teacher's own unless ``data_version`` is given."""
    teacher = load_registered(config)
    if teacher is None:
        return {}, data_version, item_index_version
    if data_version is None:
        data_version, item_index_version = trained_on(config)
        if item_index_version is None:
            log.warning(
                "evaluate: the teacher's run has no data.item_index.version tag (trained "
                "before it was recorded); using the latest item_index"
            )
    return {"teacher": teacher}, data_version, item_index_version


def evaluate_models(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module] | None = None,
    data_version: int | None = None,
    item_index_version: int | None = None,
    routed: dict[str, PerSegment] | None = None,
) -> dict[str, Any]:
    """Evaluates ``models`` (default: the registered teacher, on the data versions it was
    trained on) and the baselines on ``user_sequences@data_version`` (default: latest).

    ``routed``: models that score each user with their segment's model ({name: {segment:
    (model, bytes on disk)}}; users of a segment without one get the teacher's scores).
    Default (with the registered teacher): the newest fp32 and int8 student of every
    segment (``student``, ``student_int8``) and each segment's champion (``champions``).

    ``evaluate.engine``: ``spark`` (default) ranks the users in Spark tasks and aggregates
    in Spark (:mod:`patternlake.evaluation.distributed`); ``local`` runs the same scorers
    over the whole table in this process (small data, notebooks)."""
    started = time.monotonic()
    if models is None:
        models, data_version, item_index_version = registered_teacher(
            config, data_version, item_index_version
        )
    ev = config.evaluate
    run = _evaluate_local if ev.engine == "local" else _evaluate_spark
    out = run(spark, lake, config, models, data_version, item_index_version, routed)
    log.info(
        "evaluate (%s): %d users, %d models (%.1fs)",
        ev.engine,
        out["protocol"]["users"],
        len(out["models"]),
        time.monotonic() - started,
    )
    return out


def _evaluate_local(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module],
    data_version: int | None,
    item_index_version: int | None,
    routed: dict[str, PerSegment] | None,
) -> dict[str, Any]:
    """The protocol in this process: the whole evaluated table as arrays."""
    data = _test_split(lake, config, models, data_version, item_index_version)
    segment_of = _segment_of(lake)
    groups = segment_groups(data.users, segment_of)
    routed, champions = _routed_models(config, routed, models, sorted(set(segment_of.values())))
    baselines = baseline_scorers(data.table, data.n_items, data.max_len, data.items)
    scored = scorers(baselines, models, routed, data.stacked, groups)
    ev = config.evaluate
    history = data.items if ev.mask_history else None
    reports = model_reports(
        scored, data.target, groups, data.n_items, ev.batch_size, history, routed
    )
    return _report(
        config,
        len(data.users),
        data.n_items,
        data.version,
        data.item_index_version,
        reports,
        champions,
    )


def _evaluate_spark(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module],
    data_version: int | None,
    item_index_version: int | None,
    routed: dict[str, PerSegment] | None,
) -> dict[str, Any]:
    """The protocol as a Spark job: per-user ranks in tasks, metrics aggregated in Spark."""
    from pyspark import StorageLevel

    from patternlake.evaluation import distributed as job

    ev = config.evaluate
    d = _data(lake, config, models, data_version, item_index_version)
    n_items = d.n_items
    sequences = lake.read("user_sequences", version=d.version)
    segments = (
        lake.read("segments").select("user_id", "segment_id") if lake.exists("segments") else None
    )
    segment_ids = (
        sorted(r[0] for r in segments.select("segment_id").distinct().collect())
        if segments is not None
        else []
    )
    routed, champions = _routed_models(config, routed, models, segment_ids)
    popularity, markov = job.baseline_tables(sequences, ev.markov_successors)
    counts = job.counts_vector(popularity, n_items)
    inputs = job.test_inputs(sequences, segments, markov, d.max_len, ev.sample_users)
    payload = {
        "n_items": n_items,
        "max_len": d.max_len,
        "mask_history": ev.mask_history,
        "counts": counts,
        "models": models,
        "routed": routed,
    }
    shared = spark.sparkContext.broadcast(job.pack(payload))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ev.batch_size))

    def rank(batches):
        yield from job.rank_batches(batches, job.unpack(shared.value))

    results = inputs.mapInArrow(rank, job.RESULT_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        measured = job.aggregate(results, n_items)
        speed = job.users_per_s(results)
    finally:
        results.unpersist()
        shared.unpersist()
    if not measured:
        raise PatternlakeError("evaluate: no user has the 3 events the protocol needs")
    sizes = job.baseline_sizes(markov, n_items) | model_sizes(models, routed)
    order = ["popularity", "markov", *(n for n, per in routed.items() if per), *models]
    teacher = sizes.get("teacher") if "teacher" in models else None
    reports = {}
    for name in order:
        overall, per = measured[name]
        groups = np.array([int(g) for g in per], dtype=np.int64)
        params, nbytes = sizes[name]
        reports[name] = model_report(
            overall, per, params, nbytes, groups, routed.get(name), teacher
        ) | {"users_per_s": speed[name]}
        _log_model(name, overall)
    n_users = next(iter(measured.values()))[0]["users"]
    return _report(config, n_users, n_items, d.version, d.item_index_version, reports, champions)


def _log_model(name: str, overall: dict[str, float]) -> None:
    log.info("evaluate %s: NDCG@10 %.4f HR@10 %.4f", name, overall["ndcg@10"], overall["hr@10"])


def _report(
    config: Config,
    n_users: int,
    n_items: int,
    version: int,
    item_index_version: int,
    reports: dict[str, Any],
    champions: dict[int, str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "protocol": protocol(config.evaluate.mask_history, n_users, n_items)
        | ({"sample_users": config.evaluate.sample_users} if config.evaluate.sample_users else {}),
        "data_version": version,
        "item_index_version": item_index_version,
        "models": reports,
    }
    if champions:
        out["champions"] = {str(g): c for g, c in champions.items()}
    return out


@dataclass
class EvaluationSplit:
    """The protocol's inputs: ``user_sequences@version`` as arrays for evaluable users."""

    version: int
    item_index_version: int
    table: pa.Table
    n_items: int  # item ids, padding included
    max_len: int  # width of the inputs: the widest model's window
    users: np.ndarray  # (n,) user ids
    items: np.ndarray  # (n, L) inputs: everything before the test target
    stacked: np.ndarray  # (n, 3, L) items, types, gaps
    target: np.ndarray  # (n,) the test target


@dataclass
class EvaluatedData:
    """What both engines evaluate: ``user_sequences@version`` (its files) over the items of
    ``item_index@item_index_version``, with inputs as wide as the widest model."""

    version: int
    files: list[str]
    item_index_version: int
    n_items: int  # item ids, padding included
    max_len: int


def _data(
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module],
    data_version: int | None,
    item_index_version: int | None,
) -> EvaluatedData:
    """The versions to evaluate (default: the latest of each); a pinned ``user_sequences``
    version that no longer exists fails with one clear line."""
    if data_version is None:
        version = lake.version("user_sequences")
        files = lake.files("user_sequences", version)
    else:
        version = data_version
        files = pinned_sequence_files(lake, version, "evaluate")
    if item_index_version is None:
        item_index_version = lake.version("item_index")
    # every model sees the last ``max_len`` events it was built for: the inputs are as wide
    # as the widest model, and each model takes its own tail of them
    max_len = max([config.teacher.max_len, *(window(m) for m in models.values())])
    n_items = item_id_count(lake, item_index_version)
    return EvaluatedData(version, files, item_index_version, n_items, max_len)


def _test_split(
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module],
    data_version: int | None,
    item_index_version: int | None,
) -> EvaluationSplit:
    """The test split of ``user_sequences@data_version`` (default: latest) over the items of
    ``item_index@item_index_version`` (default: latest)."""
    d = _data(lake, config, models, data_version, item_index_version)
    table = read_table(d.files)
    users, items, types, gaps, target = evaluation_arrays(table, d.max_len, "test")
    if len(users) == 0:
        raise PatternlakeError("evaluate: no user has the 3 events the protocol needs")
    stacked = np.stack([items, types, gaps], axis=1)
    return EvaluationSplit(
        d.version, d.item_index_version, table, d.n_items, d.max_len, users, items, stacked, target
    )


def _routed_models(
    config: Config,
    routed: dict[str, PerSegment] | None,
    models: dict[str, torch.nn.Module],
    segments: list[int],
) -> tuple[dict[str, PerSegment], dict[int, str]]:
    """``routed`` when given; else, with a teacher among ``models``, the registered
    students of ``segments`` and each segment's champion; else none."""
    if routed is not None or "teacher" not in models:
        return routed or {}, {}
    return segment_students(config, segments, config.compress.runtime)


def _segment_of(lake: Lake) -> dict[str, int]:
    """user id -> segment id of ``segments``; empty before the first ``segment``."""
    if not lake.exists("segments"):
        return {}
    rows = lake.read("segments").select("user_id", "segment_id").collect()
    return {r.user_id: r.segment_id for r in rows}
