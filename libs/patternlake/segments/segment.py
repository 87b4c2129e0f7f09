"""segment: ``user_features`` (+ the last ``segment_models``) -> ``segments``, ``segment_models``
(Spark MLlib KMeans on standardized features).

* users with fewer than ``segment.min_events`` events go to the cold-start segment 0;
* the others are clustered into ``segment.k`` segments numbered 1..k;
* ids stay stable across reruns: the new centroids are matched to the previous model's
  (``segment_models``) by minimum total distance (Hungarian algorithm), so segment 3 keeps
  meaning the same kind of user after retraining.

This module is the I/O shell; the transforms are in :mod:`patternlake.segments.transforms`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark.sql import SparkSession

from patternlake.config import Config
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.segments.transforms import (
    COLD_START,
    assign_segments,
    check_enough_users,
    cold_start_users,
    eligible_users,
    feature_columns,
    fit_clusters,
    model_rows,
    previous_centroids,
    segment_rows,
    share_types,
    stable_ids,
    top_categories,
    users_per_segment,
)

__all__ = ["COLD_START", "SegmentResult", "segment_users"]

log = logging.getLogger(__name__)


@dataclass
class SegmentResult:
    model_version: int
    segments: dict[int, int]  # segment id -> users
    matched_previous: bool


def segment_users(spark: SparkSession, lake: Lake, config: Config) -> SegmentResult:
    started = time.monotonic()
    conf = config.segment
    features = lake.read("user_features")
    categories = top_categories(features, conf.top_categories)
    cols = feature_columns(share_types(features.columns), categories)
    names = list(cols)
    eligible = eligible_users(features, cols, conf.min_events).persist()
    check_enough_users(eligible.count(), conf.k, conf.min_events)
    clusters = fit_clusters(
        eligible, names, conf.k, conf.seed, conf.max_iter, conf.restarts, conf.init_steps
    )

    models = lake.read("segment_models") if lake.exists("segment_models") else None
    version, previous = previous_centroids(models, names)
    relabel, matched = stable_ids(clusters.centers, previous, clusters.mean, clusters.std)
    assigned = assign_segments(clusters.model.transform(clusters.scaled), relabel, clusters.centers)
    now = datetime.now(UTC)
    segments = segment_rows(assigned, cold_start_users(features, conf.min_events), version, now)
    lake.write(
        segments,
        "segments",
        "overwrite",
        overwrite_schema=True,
        commit_info={"patternlake.segment_model_version": str(version)},
    )
    clusters.scaled.unpersist()  # fit_clusters cached it for its restarts
    eligible.unpersist()

    counts = users_per_segment(lake.read("segments"))
    rows = model_rows(version, relabel, clusters.raw_centers, names, counts, now)
    lake.write(
        spark.createDataFrame(rows, contract("segment_models").ddl()), "segment_models", "append"
    )
    log.info(
        "segment: model version %d, %d segments + cold start, users per segment %s, matched previous=%s (%.1fs)",
        version,
        conf.k,
        counts,
        matched,
        time.monotonic() - started,
    )
    return SegmentResult(version, counts, matched)
