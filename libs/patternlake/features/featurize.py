"""featurize: ``silver_events`` -> ``item_index``, ``user_sequences``, ``user_features``.

Incremental by default: only silver batches not yet featurized (``featurize_log``) are
read for new items, and only the users they touch are recomputed (from their whole
history) and merged in. ``full=True`` rebuilds everything; both give the same tables.

``user_sequences`` records its vocabulary (event types, gap buckets, ``max_len``: see
``sequences``) with the table; when conf's differs from the recorded one (or none is
recorded), the run rebuilds everything, so that no version mixes two vocabularies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.features.nodes import new_item_index, user_features, user_histories, user_sequences
from patternlake.lake import Lake, batches_in_order
from patternlake.lake.catalog import contract
from patternlake.sequences import SequenceVocabulary, read_vocabulary
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
    if not lake.exists("silver_events"):
        raise PatternlakeError(
            "featurize: silver_events does not exist yet; run ingest and validate first"
        )
    silver_version = lake.version("silver_events")
    silver = lake.read("silver_events", version=silver_version)
    order = batches_in_order(silver)
    tables = ("item_index", "user_sequences", "user_features", "featurize_log")
    full = full or not all(lake.exists(t) for t in tables)
    conf = config.features
    types = list(config.validate_.allowed_event_types)
    vocabulary = SequenceVocabulary.from_config(config)
    if not full and (recorded := read_vocabulary(lake)) != vocabulary:
        log.info(
            "featurize: user_sequences was built with %s, conf gives %s; rebuilding everything",
            recorded or "no recorded vocabulary",
            vocabulary,
        )
        full = True
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

    touched = (
        events if full else events.join(fresh.select("user_id").distinct(), "user_id", "left_semi")
    )
    # one shuffle: every event of a touched user, grouped and sorted; both tables come from it
    histories = user_histories(touched, index, types, conf.category_property).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    seqs = vocabulary.attach(user_sequences(histories, conf.max_history))
    feats = user_features(histories, types, conf.session_gap_minutes, conf.top_categories)
    if full:
        version = lake.write(
            seqs, "user_sequences", "overwrite", overwrite_schema=True, commit_info=info
        )
        n_users = lake.commit_rows("user_sequences", version)
        lake.write(feats, "user_features", "overwrite", overwrite_schema=True, commit_info=info)
    else:
        with job_label(spark, "featurize: touched users"):
            n_users = histories.count()
        lake.merge(seqs, "user_sequences", keys=["user_id"], commit_info=info)
        lake.merge(feats, "user_features", keys=["user_id"], commit_info=info)
    histories.unpersist()

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
