"""mine: ``user_sequences`` + ``segments`` -> ``segment_patterns``.

Per segment, the training part of every user's sequence (the protocol's validation and
test targets are left out, so mined rules never see what models are evaluated on) is cut
into sessions (gap >= ``features.session_gap_minutes``). Spark MLlib PrefixSpan finds the
frequent sequential patterns of the sessions; each pattern ``a, b, c`` gives the rule
``[a, b] -> c`` with

    support    = sessions containing the pattern / sessions of the segment
    confidence = support(pattern) / support(antecedent)
    lift       = confidence / support([c])

FPGrowth on the sessions' item sets adds co-occurrence rules (order ignored) when
``mine.cooccurrence`` is on. Rules below ``mine.min_confidence`` or ``mine.min_lift`` are
dropped; at most ``mine.max_rules_per_segment`` per segment and kind are kept (best lift).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark.ml.fpm import FPGrowth, PrefixSpan
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract

log = logging.getLogger(__name__)


@dataclass
class MineResult:
    rules: dict[int, int]  # segment -> sequential rules kept
    sessions: dict[int, int]


def training_sessions(
    sequences: DataFrame, segments: DataFrame, session_gap_minutes: int, recent_events: int = 50
) -> DataFrame:
    """segment_id, session (array<int> of item idx, in order) for sessions of >= 2 events,
    from the last ``recent_events`` events of each user's training part (patterns describe
    recent behaviour; PrefixSpan's cost grows steeply with session length)."""
    evaluable = F.col("valid_item").isNotNull()
    n = F.size("item_seq")
    end = F.when(evaluable, n - 2).otherwise(n)  # the training part is [1, end]
    start = F.greatest(end - recent_events + 1, F.lit(1))
    length = F.greatest(end - start + 1, F.lit(0))
    train_items = F.slice("item_seq", start, length)
    train_times = F.slice("time_seq", start, length)
    seqs = sequences.select(
        "user_id", F.arrays_zip(train_items.alias("item"), train_times.alias("t")).alias("ev")
    )
    exploded = seqs.select("user_id", F.posexplode("ev").alias("pos", "e"))
    w = Window.partitionBy("user_id").orderBy("pos")
    gap = F.col("e.t") - F.lag("e.t").over(w)
    exploded = exploded.withColumn("brk", F.when(gap >= session_gap_minutes * 60, 1).otherwise(0))
    exploded = exploded.withColumn(
        "session", F.sum("brk").over(w.rowsBetween(Window.unboundedPreceding, 0))
    )
    sessions = exploded.groupBy("user_id", "session").agg(
        F.transform(
            F.sort_array(F.collect_list(F.struct("pos", "e.item"))), lambda x: x["item"]
        ).alias("items")
    )
    return sessions.filter(F.size("items") >= 2).join(
        segments.select("user_id", "segment_id"), "user_id"
    )


def sequential_rules(
    sessions: DataFrame,
    min_support: float,
    min_count: int,
    max_len: int,
    min_extension_share: float,
) -> tuple[list[tuple], int]:
    """PrefixSpan on one segment's sessions; returns (antecedent, consequent, count, conf,
    lift, support) tuples and the number of sessions.

    A longer antecedent is kept only if it holds in at least ``min_extension_share`` of the
    sessions where each of its one-shorter rules holds: ``[a, x] -> b`` with ``x`` merely
    passing by between ``a`` and ``b`` is noise around ``a -> b``, while ``[a, b] -> c`` of a
    real chain holds almost whenever ``b -> c`` does."""
    n = sessions.count()
    if n < min_count:  # too few sessions for any rule to reach min_count
        return [], n
    seq = sessions.select(F.transform("items", lambda i: F.array(i)).alias("sequence"))
    min_support = max(min_support, min_count / n)
    prefix_span = PrefixSpan(
        minSupport=min_support, maxPatternLength=max_len, maxLocalProjDBSize=32_000_000
    )
    freq: dict[tuple[int, ...], int] = {}
    for row in prefix_span.findFrequentSequentialPatterns(seq).collect():
        if all(len(itemset) == 1 for itemset in row["sequence"]):
            freq[tuple(itemset[0] for itemset in row["sequence"])] = int(row["freq"])
    rules = []
    for pattern, count in freq.items():
        if len(pattern) < 2:
            continue
        ante, cons = pattern[:-1], pattern[-1]
        if ante not in freq or (cons,) not in freq:
            continue
        shorter = (
            [ante[:i] + ante[i + 1 :] + (cons,) for i in range(len(ante))] if len(ante) > 1 else []
        )
        if any(s in freq and count < min_extension_share * freq[s] for s in shorter):
            continue
        confidence = count / freq[ante]
        lift = confidence / (freq[(cons,)] / n)
        rules.append((list(ante), cons, count, confidence, lift, count / n))
    return rules, n


def cooccurrence_rules(
    sessions: DataFrame, min_support: float, min_confidence: float, n: int
) -> list[tuple]:
    baskets = sessions.select(F.array_distinct("items").alias("items")).filter(F.size("items") >= 2)
    model = FPGrowth(itemsCol="items", minSupport=min_support, minConfidence=min_confidence).fit(
        baskets
    )
    out = []
    for r in model.associationRules.collect():
        if len(r["consequent"]) == 1:
            support = float(r["support"])
            out.append(
                (
                    list(r["antecedent"]),
                    r["consequent"][0],
                    round(support * n),
                    r["confidence"],
                    r["lift"],
                    support,
                )
            )
    return out


def mine_patterns(spark: SparkSession, lake: Lake, config: Config) -> MineResult:
    started = time.monotonic()
    for table, job in (("user_sequences", "featurize"), ("segments", "segment")):
        if not lake.exists(table):
            raise PatternlakeError(f"mine: {table} does not exist yet; run {job} first")
    conf = config.mine
    segments = lake.read("segments")
    model_version = segments.agg(F.max("model_version")).first()[0]
    sessions = training_sessions(
        lake.read("user_sequences"),
        segments,
        config.features.session_gap_minutes,
        config.mine.recent_events,
    ).persist()
    names = {
        r["item_idx"]: r["item_id"]
        for r in lake.read("item_index").select("item_idx", "item_id").collect()
    }
    segment_ids = sorted(r[0] for r in sessions.select("segment_id").distinct().collect())
    now = datetime.now(UTC)
    rows: list[tuple] = []
    kept: dict[int, int] = {}
    counts: dict[int, int] = {}
    for sid in segment_ids:
        seg = sessions.filter(F.col("segment_id") == sid).persist()
        seq_rules, n = sequential_rules(
            seg,
            conf.min_support,
            conf.min_support_count,
            conf.max_pattern_length,
            conf.min_extension_share,
        )
        counts[sid] = n
        kinds = [("sequential", seq_rules)]
        if conf.cooccurrence and n >= conf.min_support_count:
            support = max(conf.min_support, conf.min_support_count / n)
            kinds.append(("cooccurrence", cooccurrence_rules(seg, support, conf.min_confidence, n)))
        for kind, found in kinds:
            good = [r for r in found if r[3] >= conf.min_confidence and r[4] >= conf.min_lift]
            good.sort(key=lambda r: (-r[4], -r[3], -r[2], r[0], r[1]))
            good = good[: conf.max_rules_per_segment]
            if kind == "sequential":
                kept[sid] = len(good)
            for ante, cons, count, confidence, lift, support in good:
                rows.append(
                    (
                        int(sid),
                        kind,
                        [names[i] for i in ante],
                        names[cons],
                        [int(i) for i in ante],
                        int(cons),
                        float(support),
                        int(count),
                        float(confidence),
                        float(lift),
                        int(n),
                        model_version,
                        now,
                    )
                )
        seg.unpersist()
    sessions.unpersist()
    lake.write(
        spark.createDataFrame(rows, contract("segment_patterns").ddl()),
        "segment_patterns",
        "overwrite",
        overwrite_schema=True,
        commit_info={"patternlake.segment_model_version": str(model_version)},
    )
    log.info(
        "mine: %d rules over %d segments (sequential per segment %s, sessions %s) (%.1fs)",
        len(rows),
        len(segment_ids),
        kept,
        counts,
        time.monotonic() - started,
    )
    return MineResult(kept, counts)
