"""featurize: ``silver_events`` -> ``item_index``, ``user_sequences``, ``user_features``.

Incremental by default: only silver batches not yet featurized (``featurize_log``) are
read; the users they touch get the new events appended to their stored rows (a user with an
event older than the stored history is rebuilt from the whole history in silver) and are
merged in. ``full=True`` rebuilds everything; both give the same tables (tested).

``user_sequences`` records its vocabulary (event types, gap buckets, ``max_len``: see
``sequence_schema``) with the table; when conf's differs from the recorded one (or none is
recorded), the run rebuilds everything, so that no version mixes two vocabularies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.features.transforms import (
    appendable,
    appended_features,
    appended_sequences,
    new_item_index,
    stored_state,
    unseen_items,
    user_features,
    user_histories,
    user_sequences,
)
from patternlake.lake import Lake, batches_in_order
from patternlake.lake.catalog import contract
from patternlake.sequence_schema import SequenceVocabulary, read_vocabulary
from patternlake.spark import job_label

log = logging.getLogger(__name__)


@dataclass
class FeaturizeResult:
    mode: str  # full | incremental | noop
    batches: list[str]
    new_items: int
    users_updated: int
    silver_version: int | None


def featurize(
    spark: SparkSession, lake: Lake, config: Config, full: bool = False
) -> FeaturizeResult:
    started = time.monotonic()
    silver_version = lake.version("silver_events")
    silver = lake.read("silver_events", version=silver_version)
    order = batches_in_order(silver)
    vocabulary = SequenceVocabulary.from_config(config)
    full = _rebuild_all(lake, vocabulary, full)
    done = (
        set() if full else {r[0] for r in lake.read("featurize_log").select("batch_id").collect()}
    )
    pending = [b for b in order if b not in done]
    if not pending:
        log.info("featurize: nothing to do, all %d silver batches are featurized", len(order))
        return FeaturizeResult("noop", [], 0, 0, silver_version)

    rank = F.create_map(*[x for i, b in enumerate(order) for x in (F.lit(b), F.lit(i))])
    if "_line_ordinal" not in silver.columns:  # silver written before ingest kept ordinals
        silver = silver.withColumn("_line_ordinal", F.lit(None).cast("long"))
    events = silver.withColumn("_batch_order", rank[F.col("_batch_id")])
    fresh = events if full else events.filter(F.col("_batch_id").isin(pending))

    existing = None if full else lake.read("item_index")
    info = {"patternlake.silver_version": str(silver_version)}
    with job_label(spark, "featurize: new items"):
        items = new_item_index(fresh, existing)
        version = lake.write(
            items, "item_index", "overwrite" if full else "append", commit_info=info
        )
    n_new_items = lake.commit_rows("item_index", version)
    index = lake.read("item_index")

    if full:
        n_users = _write_all(lake, config, events, index, vocabulary, info)
    else:
        in_order = pending == order[len(order) - len(pending) :]
        seqs, feats, n_users, cached = _incremental(
            spark, lake, config, events, fresh, pending, index, in_order
        )
        lake.merge(vocabulary.attach(seqs), "user_sequences", keys=["user_id"], commit_info=info)
        lake.merge(feats, "user_features", keys=["user_id"], commit_info=info)
        for df in cached:
            df.unpersist()

    now = datetime.now(UTC)
    log_rows = spark.createDataFrame(
        [(b, now, "full" if full else "incremental", silver_version) for b in pending],
        contract("featurize_log").ddl(),
    )
    lake.write(log_rows, "featurize_log", "overwrite" if full else "append")
    mode = "full" if full else "incremental"
    log.info(
        "featurize (%s): %d batches, %d new items, %d users updated, silver version %d (%.1fs)",
        mode,
        len(pending),
        n_new_items,
        n_users,
        silver_version,
        time.monotonic() - started,
    )
    return FeaturizeResult(mode, pending, n_new_items, n_users, silver_version)


def _rebuild_all(lake: Lake, vocabulary: SequenceVocabulary, full: bool) -> bool:
    """Whether this run rebuilds everything: asked to, a table is missing, or conf's
    vocabulary is not the one user_sequences was built with."""
    tables = ("item_index", "user_sequences", "user_features", "featurize_log")
    if full or not all(lake.exists(t) for t in tables):
        return True
    if (recorded := read_vocabulary(lake)) != vocabulary:
        log.info(
            "featurize: user_sequences was built with %s, conf gives %s; rebuilding everything",
            recorded or "no recorded vocabulary",
            vocabulary,
        )
        return True
    return False


def _write_all(
    lake: Lake,
    config: Config,
    events: DataFrame,
    index: DataFrame,
    vocabulary: SequenceVocabulary,
    info: dict[str, str],
) -> int:
    """Both tables from every user's whole history (one shuffle); returns the users."""
    histories, seqs, feats = _from_histories(config, events, index)
    version = lake.write(
        vocabulary.attach(seqs),
        "user_sequences",
        "overwrite",
        overwrite_schema=True,
        commit_info=info,
    )
    n_users = lake.commit_rows("user_sequences", version)
    lake.write(feats, "user_features", "overwrite", overwrite_schema=True, commit_info=info)
    histories.unpersist()
    return n_users


def _from_histories(
    config: Config, events: DataFrame, index: DataFrame
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(cached histories, sequences, features) from every event of the users in ``events``:
    one shuffle by user; the caller unpersists the histories."""
    conf = config.features
    types = list(config.validate_.allowed_event_types)
    hist = user_histories(events, index, types, conf.category_property).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    feats = user_features(hist, types, conf.session_gap_minutes, conf.top_categories)
    return hist, user_sequences(hist, conf.max_history), feats


def _incremental(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    events: DataFrame,
    fresh: DataFrame,
    pending: list[str],
    index: DataFrame,
    in_order: bool,
) -> tuple[DataFrame, DataFrame, int, list[DataFrame]]:
    """The rows of every user the new batches touch, for merging: (sequences, features,
    users, frames to unpersist after the merges).

    A user whose new events all come after the stored history (the usual day) gets the new
    events appended to the stored rows: the whole history is not read again. A new user is
    built from the new events alone. A user with an event older than the stored history (late
    data), and every user when a pending batch is ordered before a featurized one, is rebuilt
    from the whole history in silver, as a full run does."""
    conf = config.features
    types = list(config.validate_.allowed_event_types)
    gap, top = conf.session_gap_minutes, conf.top_categories

    def rebuild(users: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
        return _from_histories(config, events.join(users, "user_id", "left_semi"), index)

    users = fresh.select("user_id").distinct()
    if not in_order:
        hist, seqs, feats = rebuild(F.broadcast(users))
        with job_label(spark, "featurize: touched users"):
            n_users = hist.count()
        return _cached(seqs, feats, n_users, [hist])

    new = user_histories(fresh, index, types, conf.category_property).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    with job_label(spark, "featurize: touched users"):
        n_users = new.count()
    sequences = lake.read("user_sequences", version=lake.version("user_sequences"))
    features = lake.read("user_features", version=lake.version("user_features"))
    if n_users <= BROADCAST_USERS:
        # only the touched users' stored rows are shuffled into the join, not every user's
        touched = F.broadcast(new.select("user_id"))
        sequences = sequences.join(touched, "user_id", "left_semi")
        features = features.join(touched, "user_id", "left_semi")
    stored = stored_state(sequences, features, types)
    joined = new.join(stored, "user_id", "left").persist(StorageLevel.MEMORY_AND_DISK)
    with job_label(spark, "featurize: stored rows of touched users"):
        joined.count()
    ok = appendable(joined)
    cached = [new, joined]
    # the distinct-item count of a user whose stored sequence is cut (more than max_history
    # events) needs the earlier items: look up the new (user, item) pairs in silver
    cut = joined.filter(ok & (F.col("_s_n_events") > F.size("_s_item_seq"))).select("user_id")
    unseen = None
    with job_label(spark, "featurize: cut histories"):
        any_cut = not cut.isEmpty()
    if any_cut:
        pairs = fresh.join(F.broadcast(cut), "user_id", "left_semi").select("user_id", "item_id")
        pairs = pairs.distinct().persist(StorageLevel.MEMORY_AND_DISK)
        with job_label(spark, "featurize: new (user, item) pairs"):
            n_pairs = pairs.count()
        earlier = events.filter(~F.col("_batch_id").isin(pending))
        unseen = unseen_items(pairs, earlier, broadcast=n_pairs <= BROADCAST_PAIRS)
        cached.append(pairs)
    first_seen = joined.filter(F.col("_s_n_events").isNull()).select("user_id", "events")
    seqs = appended_sequences(joined.filter(ok), conf.max_history).unionByName(
        user_sequences(first_seen, conf.max_history)
    )
    feats = appended_features(joined.filter(ok), unseen, types, gap, top).unionByName(
        user_features(first_seen, types, gap, top)
    )
    late = joined.filter(F.col("_s_n_events").isNotNull() & ~ok).select("user_id")
    with job_label(spark, "featurize: late events"):
        has_late = not late.isEmpty()
    if has_late:
        hist, late_seqs, late_feats = rebuild(late)
        seqs, feats = seqs.unionByName(late_seqs), feats.unionByName(late_feats)
        cached.append(hist)
    return _cached(seqs, feats, n_users, cached)


BROADCAST_PAIRS = 2_000_000  # new (user, item) pairs looked up without a shuffle of silver
BROADCAST_USERS = 1_000_000  # touched users whose stored rows are read without a shuffle of all


def _cached(
    seqs: DataFrame, feats: DataFrame, n_users: int, cached: list[DataFrame]
) -> tuple[DataFrame, DataFrame, int, list[DataFrame]]:
    """Each merge reads its source several times (duplicate check, file lookup, rewrite):
    the few touched users' rows are computed once."""
    seqs = seqs.persist(StorageLevel.MEMORY_AND_DISK)
    feats = feats.persist(StorageLevel.MEMORY_AND_DISK)
    return seqs, feats, n_users, [*cached, seqs, feats]
