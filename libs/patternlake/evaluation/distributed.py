"""The evaluation protocol as a Spark job: nothing that grows with the users reaches the
driver, and no process holds a (users x catalogue) matrix.

1. :func:`test_inputs` -- per evaluable user of the pinned ``user_sequences`` version (an
   optional sample, drawn by a hash of the user id so that every run draws the same users):
   the inputs cut in Spark to the widest model's window, the test target, the segment
   (joined), and the successors of the user's last input item (joined from the Markov
   table below).
2. :func:`baseline_tables` -- the baselines fitted in Spark on the training parts:
   popularity as item counts, the first-order Markov chain as each item's
   ``markov_successors`` most frequent next items with the count of all its transitions.
3. :func:`rank_batches` -- the ``mapInArrow`` task: the scorers of
   :mod:`patternlake.evaluation.transforms` over each Arrow batch (target ranks and top 10
   counted over item chunks), one row per (user, model).
4. :func:`aggregate` -- per model, overall and per segment: the users, each per-user
   metric's mean and standard deviation, and the distinct items of the top 10s, aggregated
   in Spark (one ``rollup``); the report rows are computed from those few numbers
   (``metrics.summary_metrics``: the same formulas as the one-process path).

The popularity counts travel to the tasks with the models (a vector of catalogue length,
1/D of the teacher's item table); the Markov rows never leave Spark. A Markov row cut to
its most frequent successors keeps its total, so the probabilities it keeps are exact and
an item past the cut scores its popularity backoff only; with fewer successors than
``markov_successors`` (the test lakes) the numbers equal the one-process evaluation's.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from patternlake.evaluation.transforms import NO_SEGMENT, Scorer, scorers
from patternlake.models.baselines import Popularity, markov_ranker
from patternlake.models.metrics import PER_USER, ranker_ranks, summary_metrics
from patternlake.sequence_reader import pad_left

INPUTS = ("item_seq", "type_seq", "gap_seq")
RESULT_SCHEMA = "model string, segment_id int, rank bigint, top10 array<bigint>, seconds double"


def training_part(df: DataFrame) -> DataFrame:
    """``item_seq`` of each user's training part: the sequence less the validation and test
    targets of evaluable users (``sequence_reader.training_lengths``)."""
    n = F.size("item_seq") - F.when(F.col("valid_item").isNotNull(), 2).otherwise(0)
    return df.where(n > 0).select(F.slice("item_seq", F.lit(1), n).alias("train"))


def baseline_tables(sequences: DataFrame, successors: int) -> tuple[DataFrame, DataFrame]:
    """(popularity, markov) fitted on the training parts of ``sequences``.

    popularity: (item_idx, count), every training event counted once. markov: (last_item,
    succ_items, succ_counts, succ_total), an item's ``successors`` most frequent next items
    (ties: lower id first) and the number of all its transitions."""
    train = training_part(sequences)
    popularity = train.select(F.explode("train").alias("item_idx")).groupBy("item_idx").count()
    pairs = train.where(F.size("train") > 1).select(
        F.explode(
            F.arrays_zip(
                F.slice("train", F.lit(1), F.size("train") - 1).alias("prev"),
                F.slice("train", F.lit(2), F.size("train") - 1).alias("next"),
            )
        ).alias("p")
    )
    counts = pairs.groupBy(F.col("p.prev").alias("last_item"), F.col("p.next").alias("nxt")).count()
    order = Window.partitionBy("last_item").orderBy(F.desc("count"), "nxt")
    row = Window.partitionBy("last_item")
    markov = (
        counts.withColumn("total", F.sum("count").over(row))
        .withColumn("distinct", F.count(F.lit(1)).over(row))
        .withColumn("r", F.row_number().over(order))
        .where(F.col("r") <= successors)
        .groupBy("last_item")
        .agg(
            F.sort_array(F.collect_list(F.struct("nxt", "count"))).alias("s"),
            F.first("total").alias("succ_total"),
            F.first("distinct").alias("succ_distinct"),
        )
        .select(
            "last_item",
            F.col("s.nxt").alias("succ_items"),
            F.col("s.count").alias("succ_counts"),
            "succ_total",
            "succ_distinct",
        )
    )
    return popularity, markov


def counts_vector(popularity: DataFrame, n_items: int) -> np.ndarray:
    """The popularity baseline's parameters, (N,) float64 counts by item id, gathered through
    Arrow (8 bytes an item: the size of the fitted model, not of the data)."""
    table = popularity.toArrow()
    idx = table.column("item_idx").to_numpy().astype(np.int64)
    n = table.column("count").to_numpy().astype(np.float64)
    counts = np.zeros(n_items, dtype=np.float64)
    known = (idx > 0) & (idx < n_items)
    counts[idx[known]] = n[known]
    return counts


def baseline_sizes(markov: DataFrame, n_items: int) -> dict[str, tuple[int, int]]:
    """(params, bytes) of the fitted baselines, as ``models.baselines`` counts them: the
    Markov chain's non-zero transitions in a CSR matrix (float64 data, int32 indices) plus
    the popularity counts."""
    nnz = int(markov.agg(F.sum("succ_distinct")).first()[0] or 0)
    pop_bytes = 8 * n_items
    return {
        "popularity": (n_items, pop_bytes),
        "markov": (nnz, 12 * nnz + 4 * (n_items + 1) + pop_bytes),
    }


_WORKER: dict[str, dict[str, Any]] = {}


def pack(payload: dict[str, Any]) -> tuple[str, bytes]:
    """The job's models and settings as one blob for a broadcast variable, with its digest."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    return hashlib.sha1(blob).hexdigest(), blob


def unpack(packed: tuple[str, bytes]) -> dict[str, Any]:
    """The payload, loaded once per Python worker (Spark reuses workers across tasks)."""
    digest, blob = packed
    if digest not in _WORKER:
        _WORKER.clear()
        _WORKER[digest] = torch.load(io.BytesIO(blob), weights_only=False)
    return _WORKER[digest]


def sample_users(users: DataFrame, wanted: int, seed: int) -> DataFrame:
    """About ``wanted`` of ``users`` (0: all), kept by a hash of the user id: the same users
    on every run and every version, whatever the partitioning."""
    if wanted <= 0:
        return users
    total = users.count()
    if total <= wanted:
        return users
    share = wanted / total
    bucket = F.pmod(F.xxhash64(F.col("user_id"), F.lit(seed)), F.lit(1_000_000))
    return users.where(bucket < F.lit(int(round(share * 1_000_000))))


def test_inputs(
    sequences: DataFrame,
    segments: DataFrame | None,
    markov: DataFrame,
    max_len: int,
    sample: int = 0,
    seed: int = 0,
) -> DataFrame:
    """Per evaluable user: ``item_seq``, ``type_seq``, ``gap_seq`` (the events before the
    test target, the last ``max_len`` of them), ``target``, ``segment_id`` (NO_SEGMENT
    without one) and the Markov successors of the last input item."""
    evaluable = sample_users(sequences.where(F.col("valid_item").isNotNull()), sample, seed)
    cut = [
        F.slice(
            c, F.greatest(F.size(c) - max_len, F.lit(1)), F.least(F.size(c) - 1, F.lit(max_len))
        ).alias(c)
        for c in INPUTS
    ]
    users = evaluable.select(
        "user_id",
        *cut,
        F.col("test_item").cast("bigint").alias("target"),
        F.element_at("item_seq", -2).alias("last_item"),
    )
    if segments is not None:
        users = users.join(segments.select("user_id", "segment_id"), "user_id", "left")
    else:
        users = users.withColumn("segment_id", F.lit(None).cast("int"))
    users = users.withColumn("segment_id", F.coalesce("segment_id", F.lit(NO_SEGMENT)))
    return users.join(markov, "last_item", "left")


def _successor_rows(batch: pa.RecordBatch, n_items: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """The batch's Markov rows: (B, N) transition counts and (B, 1) totals."""
    items = batch.column("succ_items")
    counts = batch.column("succ_counts")
    lengths = pc.list_value_length(items).fill_null(0).to_numpy(zero_copy_only=False)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    cols = items.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    data = counts.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    rows = sp.csr_matrix((data, cols, indptr), shape=(len(lengths), n_items))
    totals = batch.column("succ_total").fill_null(0).to_numpy(zero_copy_only=False)
    return rows, totals.astype(np.float64)[:, None]


def batch_baselines(
    batch: pa.RecordBatch, counts: np.ndarray, n_items: int, items: np.ndarray
) -> dict[str, Scorer]:
    """Popularity (from the fitted counts) and Markov (from the batch's joined successor
    rows) as scorers of the batch's users, whose inputs are ``items`` (B, L)."""
    pop = Popularity(n_items)
    pop.counts = counts
    rows, totals = _successor_rows(batch, n_items)
    share = counts / max(1.0, counts.sum())
    markov = markov_ranker(n_items, lambda idx: (rows[idx], totals[idx]), share)
    users = np.arange(batch.num_rows)
    return {
        "popularity": (ranker_ranks(pop.ranker(), lambda s: items[s]), 0, 0),
        "markov": (ranker_ranks(markov, lambda s: users[s]), 0, 0),
    }


def rank_batches(
    batches: Iterator[pa.RecordBatch], job: dict[str, Any]
) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: per user of each batch and per model, the target's rank
    (0-based, ties against the target) and the top-10 ids (RESULT_SCHEMA)."""
    torch.set_num_threads(1)  # one task per core
    n_items, L = job["n_items"], job["max_len"]
    for batch in batches:
        if batch.num_rows == 0:
            continue
        stacked = np.stack([pad_left(batch.column(c), L) for c in INPUTS], axis=1)
        items = stacked[:, 0]
        # a copy: Arrow's buffer is read-only, which torch.from_numpy warns about
        targets = torch.tensor(batch.column("target").to_numpy(zero_copy_only=False))
        groups = batch.column("segment_id").to_numpy(zero_copy_only=False).astype(np.int64)
        base = batch_baselines(batch, job["counts"], n_items, items)
        scored = scorers(base, job["models"], job["routed"], stacked, groups)
        exclude = torch.from_numpy(items) if job["mask_history"] else None
        whole = slice(0, batch.num_rows)
        for name, (rank, _, _) in scored.items():
            started = time.perf_counter()
            ranks, top = rank(whole, targets, exclude)
            each = (time.perf_counter() - started) / batch.num_rows  # the batch's time, per user
            yield pa.RecordBatch.from_pydict(
                {
                    "model": pa.array([name] * batch.num_rows, pa.string()),
                    "segment_id": pa.array(groups, pa.int32()),
                    "rank": pa.array(ranks.cpu().numpy().astype(np.int64)),
                    "top10": pa.array(list(top.cpu().numpy().astype(np.int64))),
                    "seconds": pa.array(np.full(batch.num_rows, each)),
                }
            )


def users_per_s(results: DataFrame) -> dict[str, float]:
    """model -> users ranked per second of one task's thread (target rank and top 10 over
    the catalogue; the time of each batch spread over its users)."""
    rows = results.groupBy("model").agg(F.count(F.lit(1)).alias("n"), F.sum("seconds").alias("s"))
    return {r.model: round(r.n / r.s, 1) if r.s else None for r in rows.collect()}


def per_user_metrics(results: DataFrame) -> DataFrame:
    """Each result row's per-user metrics (``metrics.PER_USER``) from its rank."""
    r = F.col("rank")
    cols = {}
    for k in (10, 20):
        cols[f"hr@{k}"] = F.when(r < k, 1.0).otherwise(0.0)
        cols[f"ndcg@{k}"] = F.when(r < k, 1.0 / F.log2(r + 2)).otherwise(0.0)
    cols["mrr@10"] = F.when(r < 10, 1.0 / (r + 1)).otherwise(0.0)
    return results.select("model", "segment_id", *(c.alias(m) for m, c in cols.items()))


def aggregate(
    results: DataFrame, n_items: int
) -> dict[str, tuple[dict[str, float], dict[str, dict[str, float]]]]:
    """model -> (overall metrics, {segment: metrics}), aggregated in Spark: the driver gets
    a few numbers per (model, segment)."""
    metrics = per_user_metrics(results)
    aggs = [F.count(F.lit(1)).alias("n")]
    for m in PER_USER:
        aggs += [
            F.avg(F.col(f"`{m}`")).alias(f"mean_{m}"),
            F.stddev_samp(F.col(f"`{m}`")).alias(f"sd_{m}"),
        ]
    moments = metrics.rollup("model", "segment_id").agg(*aggs).where(F.col("model").isNotNull())
    covered = (
        results.select("model", "segment_id", F.explode("top10").alias("item"))
        .where(F.col("item") > 0)
        .rollup("model", "segment_id")
        .agg(F.countDistinct("item").alias("covered"))
        .where(F.col("model").isNotNull())
    )
    # rollup's subtotal rows have a null segment_id; a join on it would drop them
    rows = (
        moments.alias("m")
        .join(
            covered.alias("c"),
            (F.col("m.model") == F.col("c.model"))
            & F.col("m.segment_id").eqNullSafe(F.col("c.segment_id")),
            "left",
        )
        .select("m.*", F.coalesce(F.col("c.covered"), F.lit(0)).alias("covered"))
    )
    out: dict[str, tuple[dict[str, float], dict[str, dict[str, float]]]] = {}
    for row in rows.collect():
        d = row.asDict()
        means = {m: d[f"mean_{m}"] for m in PER_USER}
        sds = {m: d[f"sd_{m}"] or 0.0 for m in PER_USER}
        report = summary_metrics(int(d["n"]), means, sds, int(d["covered"]), n_items)
        overall, per = out.setdefault(d["model"], ({}, {}))
        if d["segment_id"] is None:
            overall.update(report)
        else:
            per[str(d["segment_id"])] = report
    return {
        name: (overall, dict(sorted(per.items(), key=lambda kv: int(kv[0]))))
        for name, (overall, per) in out.items()
    }
