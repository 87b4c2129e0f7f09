"""Rule-mining transforms: DataFrame functions and plain rule tuples, no lake, no conf object.

The order of :func:`patternlake.patterns.mine.mine_patterns`: :func:`training_sessions`
(every user's recent training events cut into sessions, with the user's segment), then per
segment :func:`sequential_rules` (PrefixSpan) and :func:`cooccurrence_rules` (FPGrowth),
:func:`best_rules` (thresholds, ranking, cap) and :func:`pattern_rows` (the rows of
``segment_patterns``).

A rule is a tuple ``(antecedent, consequent, count, confidence, lift, support)``:
antecedent a list of item idx, consequent an item idx, count the sessions holding the
whole pattern, support ``count / sessions``, confidence ``count / sessions holding the
antecedent``, lift ``confidence / support of the consequent alone``. Sessions never hold
the protocol's validation and test targets.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pyspark.ml.fpm import FPGrowth, PrefixSpan
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

Rule = tuple[list[int], int, int, float, float, float]


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
) -> tuple[list[Rule], int]:
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
) -> list[Rule]:
    """FPGrowth on the item sets of one segment's sessions (order ignored): the association
    rules with one consequent; ``n``, the segment's sessions, turns support into a count."""
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


def best_rules(
    rules: list[Rule], min_confidence: float, min_lift: float, max_rules: int
) -> list[Rule]:
    """The rules reaching ``min_confidence`` and ``min_lift``, best first (lift, then
    confidence, then count, then the items), at most ``max_rules``."""
    good = [r for r in rules if r[3] >= min_confidence and r[4] >= min_lift]
    good.sort(key=lambda r: (-r[4], -r[3], -r[2], r[0], r[1]))
    return good[:max_rules]


def item_names(item_index: DataFrame, rules: Iterable[Rule]) -> dict[int, str]:
    """item idx -> item id of ``item_index`` for the items that ``rules`` mention: the
    catalogue is semi-joined with those idx in Spark, so what reaches the driver is bounded
    by the rules (segments x kinds x ``mine.max_rules_per_segment``), not the catalogue."""
    idx = sorted({int(i) for ante, cons, *_ in rules for i in (*ante, cons)})
    if not idx:
        return {}
    wanted = item_index.sparkSession.createDataFrame([(i,) for i in idx], "item_idx int")
    named = item_index.select("item_idx", "item_id").join(
        F.broadcast(wanted), "item_idx", "left_semi"
    )
    return {r["item_idx"]: r["item_id"] for r in named.collect()}


def pattern_rows(
    segment_id: int,
    kind: str,
    rules: list[Rule],
    names: dict[int, str],
    n_sessions: int,
    model_version: int,
    now: datetime,
) -> list[tuple]:
    """The ``segment_patterns`` rows of one segment's rules of one ``kind``, item idx
    turned into item ids with ``names``."""
    return [
        (
            int(segment_id),
            kind,
            [names[i] for i in ante],
            names[cons],
            [int(i) for i in ante],
            int(cons),
            float(support),
            int(count),
            float(confidence),
            float(lift),
            int(n_sessions),
            model_version,
            now,
        )
        for ante, cons, count, confidence, lift, support in rules
    ]
