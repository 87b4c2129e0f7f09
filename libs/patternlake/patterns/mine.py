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

The output is rewritten whole each run and records the segment model its segments came
from (``segment_model_version``). This module is the I/O shell; the transforms are in
:mod:`patternlake.patterns.transforms`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from patternlake.config import Config, MineConfig
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.patterns.transforms import (
    Rule,
    best_rules,
    cooccurrence_rules,
    item_names,
    pattern_rows,
    sequential_rules,
    training_sessions,
)

log = logging.getLogger(__name__)


@dataclass
class MineResult:
    rules: dict[int, int]  # segment -> sequential rules kept
    sessions: dict[int, int]


def mine_patterns(spark: SparkSession, lake: Lake, config: Config) -> MineResult:
    started = time.monotonic()
    segments = lake.read("segments")
    model_version = segments.agg(F.max("model_version")).first()[0]
    sessions = training_sessions(
        lake.read("user_sequences"),
        segments,
        config.features.session_gap_minutes,
        config.mine.recent_events,
    ).persist()
    segment_ids = sorted(r[0] for r in sessions.select("segment_id").distinct().collect())
    now = datetime.now(UTC)
    found: dict[int, dict[str, list[Rule]]] = {}
    kept: dict[int, int] = {}
    counts: dict[int, int] = {}
    for sid in segment_ids:
        seg = sessions.filter(F.col("segment_id") == sid).persist()
        found[sid], counts[sid] = _segment_rules(seg, config.mine)
        kept[sid] = len(found[sid]["sequential"])
        seg.unpersist()
    sessions.unpersist()
    # the names of the items the kept rules mention, looked up in Spark (not the catalogue)
    names = item_names(
        lake.read("item_index"),
        [r for by_kind in found.values() for k in by_kind.values() for r in k],
    )
    rows = [
        row
        for sid, by_kind in found.items()
        for kind, rules in by_kind.items()
        for row in pattern_rows(sid, kind, rules, names, counts[sid], model_version, now)
    ]
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


def _segment_rules(sessions: DataFrame, conf: MineConfig) -> tuple[dict[str, list[Rule]], int]:
    """The rules kept for one segment's ``sessions`` by kind (``sequential``, and
    ``cooccurrence`` when ``mine.cooccurrence`` is on and there are enough sessions), and
    the number of sessions."""
    seq_rules, n = sequential_rules(
        sessions,
        conf.min_support,
        conf.min_support_count,
        conf.max_pattern_length,
        conf.min_extension_share,
    )
    found = {"sequential": seq_rules}
    if conf.cooccurrence and n >= conf.min_support_count:
        support = max(conf.min_support, conf.min_support_count / n)
        found["cooccurrence"] = cooccurrence_rules(sessions, support, conf.min_confidence, n)
    best = {
        kind: best_rules(rules, conf.min_confidence, conf.min_lift, conf.max_rules_per_segment)
        for kind, rules in found.items()
    }
    return best, n
