"""The teacher's top-K, computed once and stored: what the shared student distils from.

A batch inference job over the pinned ``user_sequences`` version: every Spark task loads the
teacher (a broadcast model file), cuts its users' training parts into the training windows
(``sequence_reader.training_arrays``, the windows the student trains on) and keeps, at every
training target, the teacher's K best items and their logits (the seen term included),
found over item chunks (``models.ranking.top_k``: no (positions x catalogue) matrix, for
one teacher or an ensemble's mean log-probabilities).
The rows go to the lake table ``teacher_topk``: the sequences as they are, plus
``topk_items`` / ``topk_logits`` (K values per training target, targets in order) and the
teacher and data versions they belong to. The student's training reads that table like
``user_sequences`` (``sequence_reader.soft_arrays``), every epoch, on every rank, without
running the teacher again. A user forgotten is deleted from it like from every lake table.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from patternlake.lake import Lake
from patternlake.models import ranking
from patternlake.models.teacher import SequentialTeacher, Teacher, teacher_from_bytes
from patternlake.sequence_reader import training_arrays, training_lengths

log = logging.getLogger(__name__)

TABLE = "teacher_topk"


@torch.no_grad()
def position_topk(
    teacher: Teacher, items: np.ndarray, types: np.ndarray, gaps: np.ndarray, targets, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's k best items and logits at every target position (``targets`` > 0) of
    the windows, in (window, position) order: (M, k) int32 ids and float32 logits (id 0 and
    -inf where the catalogue has fewer than k scorable items)."""
    teacher.eval()
    out_i, out_v = [], []
    step = 256
    for s in range(0, len(items), step):
        it, ty, ga, tg = (torch.from_numpy(a[s : s + step]) for a in (items, types, gaps, targets))
        mask = tg > 0
        if not bool(mask.any()):
            continue
        nets = [teacher] if isinstance(teacher, SequentialTeacher) else list(teacher.nets)
        window = SequentialTeacher.prefixes(it, mask)
        # each target position's state and its window up to there (the seen term's)
        states = [ranking.DotState(net.encode(it, ty, ga)[mask], window) for net in nets]
        rankers = [ranking.DotRanker(net, net.config.n_items) for net in nets]
        if len(nets) == 1:
            v, i = ranking.top_k(rankers[0], states[0], k)
        else:  # an ensemble's mean log-probabilities, over item chunks as well
            ensemble = ranking.EnsembleRanker(rankers)
            v, i = ranking.top_k(ensemble, ensemble.of_states(states), k)
        i = torch.where(torch.isfinite(v), i, torch.zeros_like(i))
        out_i.append(i.to(torch.int32).numpy())
        out_v.append(v.float().numpy())
    if not out_i:
        return np.zeros((0, k), dtype=np.int32), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(out_i), np.concatenate(out_v)


def topk_columns(
    teacher: Teacher, table: pa.Table, k: int, stride: int | None
) -> tuple[pa.Array, pa.Array]:
    """``topk_items`` and ``topk_logits`` of every row of ``table`` (user_sequences rows):
    per row, k values for each training target, targets in order."""
    max_len = teacher.config.max_len
    items, types, gaps, targets = training_arrays(table, max_len, stride)
    ids, logits = position_topk(teacher, items, types, gaps, targets, k)
    n_targets = np.maximum(training_lengths(table) - 1, 0)
    if len(ids) != int(n_targets.sum()):
        raise AssertionError("training windows and targets disagree")
    offsets = np.concatenate([[0], np.cumsum(n_targets * k)]).astype(np.int32)
    return (
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1))),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(logits.reshape(-1))),
    )


_WORKER: dict[str, Teacher] = {}


def _worker_teacher(data: bytes) -> Teacher:
    key = hashlib.sha1(data).hexdigest()
    if key not in _WORKER:
        _WORKER.clear()
        torch.set_num_threads(1)
        _WORKER[key] = teacher_from_bytes(data)
    return _WORKER[key]


def stored_version(lake: Lake, teacher_version: str, data_version: int, k: int, stride: int):
    """The version of ``teacher_topk`` that holds this teacher's top-k of this data, or
    None (the job must run)."""
    if not lake.exists(TABLE):
        return None
    row = lake.read(TABLE).select("teacher_version", "data_version", "k", "stride").first()
    if row is None:
        return None
    if (row.teacher_version, row.data_version, row.k, row.stride) == (
        teacher_version,
        data_version,
        k,
        stride,
    ):
        return lake.version(TABLE)
    return None


def store_teacher_topk(
    spark: SparkSession,
    lake: Lake,
    teacher_data: bytes,
    teacher_version: str,
    data_version: int,
    k: int,
    stride: int,
    rows_per_batch: int = 256,
) -> tuple[int, dict[str, Any]]:
    """Writes ``teacher_topk`` for this teacher and data version (skipped when the table
    already holds them); (its version, what was done)."""
    started = time.monotonic()
    found = stored_version(lake, teacher_version, data_version, k, stride)
    if found is not None:
        log.info(
            "distill: teacher v%s top-%d of user_sequences@v%d already stored (%s v%d)",
            teacher_version,
            k,
            data_version,
            TABLE,
            found,
        )
        return found, {"reused": True, "version": found}
    sequences = lake.read("user_sequences", version=data_version)
    schema = StructType(
        [
            *sequences.schema.fields,
            StructField("topk_items", ArrayType(IntegerType()), False),
            StructField("topk_logits", ArrayType(FloatType()), False),
            StructField("teacher_version", StringType(), False),
            StructField("data_version", LongType(), False),
            StructField("k", IntegerType(), False),
            StructField("stride", IntegerType(), False),
        ]
    )
    shared = spark.sparkContext.broadcast(teacher_data)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(rows_per_batch))
    window = stride or None

    def run(batches):
        teacher = _worker_teacher(shared.value)
        for batch in batches:
            table = pa.Table.from_batches([batch])
            ids, logits = topk_columns(teacher, table, k, window)
            n = table.num_rows
            out = table.append_column("topk_items", ids).append_column("topk_logits", logits)
            out = out.append_column("teacher_version", pa.array([teacher_version] * n))
            out = out.append_column("data_version", pa.array([data_version] * n, pa.int64()))
            out = out.append_column("k", pa.array([k] * n, pa.int32()))
            out = out.append_column("stride", pa.array([stride] * n, pa.int32()))
            yield from out.to_batches()

    try:
        frame = sequences.mapInArrow(run, schema)
        version = lake.write(
            frame.select(*[F.col(f.name) for f in schema.fields]),
            TABLE,
            "overwrite",
            overwrite_schema=True,
            commit_info={
                "patternlake.teacher_version": teacher_version,
                "patternlake.data_version": str(data_version),
            },
        )
    finally:
        shared.unpersist()
    seconds = round(time.monotonic() - started, 1)
    log.info(
        "distill: teacher v%s top-%d at every training target of user_sequences@v%d -> %s "
        "v%d (%.1fs)",
        teacher_version,
        k,
        data_version,
        TABLE,
        version,
        seconds,
    )
    return version, {"reused": False, "version": version, "seconds": seconds}
