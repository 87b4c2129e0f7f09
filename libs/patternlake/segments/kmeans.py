"""segment: ``user_features`` -> ``segments`` (Spark MLlib KMeans on standardized features).

* users with fewer than ``segment.min_events`` events go to the cold-start segment 0;
* the others are clustered into ``segment.k`` segments numbered 1..k;
* ids stay stable across reruns: the new centroids are matched to the previous model's
  (``segment_models``) by minimum total distance (Hungarian algorithm), so segment 3 keeps
  meaning the same kind of user after retraining.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pyspark.ml.clustering import KMeans
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from scipy.optimize import linear_sum_assignment

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract

log = logging.getLogger(__name__)

COLD_START = 0


@dataclass
class SegmentResult:
    model_version: int
    segments: dict[int, int]  # segment id -> users
    matched_previous: bool


def feature_columns(event_types: list[str], categories: list[str]) -> dict[str, Column]:
    """Named numeric inputs of the clustering (activity, sessions, mix, category shares)."""
    cols: dict[str, Column] = {
        "log_events": F.log1p("n_events"),
        "log_items": F.log1p("n_items"),
        "diversity": F.col("diversity"),
        "log_sessions": F.log1p("n_sessions"),
        "log_events_per_session": F.log1p("events_per_session"),
        "log_mean_gap_hours": F.log1p("mean_gap_hours"),
        "log_active_days": F.log1p("active_days"),
    }
    for t in event_types:
        cols[f"share_{t}"] = F.col(f"share_{t}")
    total = F.aggregate(
        F.map_values("category_counts"), F.lit(0).cast("bigint"), lambda a, v: a + v
    )
    for c in categories:
        cols[f"cat_{c}"] = F.coalesce(
            F.col("category_counts")[c] / F.greatest(total, F.lit(1)), F.lit(0.0)
        )
    return cols


def segment_users(spark: SparkSession, lake: Lake, config: Config) -> SegmentResult:
    started = time.monotonic()
    conf = config.segment
    if not lake.exists("user_features"):
        raise PatternlakeError("segment: user_features does not exist yet; run featurize first")
    features = lake.read("user_features")
    top = (
        (
            features.select(F.explode("category_counts"))
            .groupBy("key")
            .agg(F.sum("value").alias("n"))
            .orderBy(F.desc("n"), "key")
            .limit(conf.top_categories)
            .collect()
        )
        if conf.top_categories
        else []
    )
    categories = sorted(r["key"] for r in top)
    # the event types user_features was built with (its share_<type> columns), not conf's
    types = [c.removeprefix("share_") for c in features.columns if c.startswith("share_")]
    cols = feature_columns(types, categories)
    names = list(cols)
    eligible = (
        features.filter(F.col("n_events") >= conf.min_events)
        .select("user_id", *[c.cast("double").alias(n) for n, c in cols.items()])
        .persist()
    )
    n_eligible = eligible.count()
    if n_eligible < conf.k:
        raise PatternlakeError(
            f"segment: only {n_eligible} users have at least segment.min_events={conf.min_events} events, "
            f"fewer than segment.k={conf.k}; lower one of them"
        )
    vec = VectorAssembler(inputCols=names, outputCol="raw").transform(eligible)
    scaler = StandardScaler(inputCol="raw", outputCol="x", withMean=True, withStd=True).fit(vec)
    scaled = scaler.transform(vec)
    kmeans = KMeans(
        k=conf.k, seed=conf.seed, maxIter=conf.max_iter, featuresCol="x", predictionCol="cluster"
    ).fit(scaled)
    mean, std = scaler.mean.toArray(), scaler.std.toArray()
    safe_std = np.where(std > 0, std, 1.0)
    centers = np.array(kmeans.clusterCenters())  # standardized space
    raw_centers = centers * safe_std + mean

    version, previous = _previous_model(lake, names)
    relabel, matched = _stable_ids(centers, previous, mean, safe_std)
    mapping = F.create_map(
        *[x for cluster, sid in relabel.items() for x in (F.lit(cluster), F.lit(sid))]
    )

    center_arr = F.array(*[F.array(*[F.lit(float(v)) for v in c]) for c in centers])
    assigned = kmeans.transform(scaled).select(
        "user_id",
        mapping[F.col("cluster")].alias("segment_id"),
        F.sqrt(
            F.aggregate(
                F.zip_with(
                    vector_to_array("x"),
                    F.element_at(center_arr, F.col("cluster") + 1),
                    lambda a, b: (a - b) * (a - b),
                ),
                F.lit(0.0),
                lambda acc, v: acc + v,
            )
        ).alias("distance"),
    )
    now = datetime.now(UTC)
    cold = features.filter(F.col("n_events") < conf.min_events).select(
        "user_id",
        F.lit(COLD_START).alias("segment_id"),
        F.lit(None).cast("double").alias("distance"),
    )
    segments = assigned.unionByName(cold).select(
        "user_id",
        F.col("segment_id").cast("int"),
        (F.col("segment_id") == COLD_START).alias("is_cold_start"),
        "distance",
        F.lit(version).alias("model_version"),
        F.lit(now).alias("assigned_at"),
    )
    lake.write(
        segments,
        "segments",
        "overwrite",
        overwrite_schema=True,
        commit_info={"patternlake.segment_model_version": str(version)},
    )
    eligible.unpersist()

    counts = {
        r["segment_id"]: r["count"]
        for r in lake.read("segments").groupBy("segment_id").count().collect()
    }
    model_rows = [
        (
            version,
            int(relabel[i]),
            [float(v) for v in raw_centers[i]],
            names,
            int(counts.get(relabel[i], 0)),
            now,
        )
        for i in range(len(centers))
    ]
    lake.write(
        spark.createDataFrame(model_rows, contract("segment_models").ddl()),
        "segment_models",
        "append",
    )
    log.info(
        "segment: model version %d, %d segments + cold start, users per segment %s, matched previous=%s (%.1fs)",
        version,
        conf.k,
        dict(sorted(counts.items())),
        matched,
        time.monotonic() - started,
    )
    return SegmentResult(version, dict(sorted(counts.items())), matched)


def _previous_model(lake: Lake, names: list[str]) -> tuple[int, dict[int, np.ndarray] | None]:
    """Next model version, and the previous centroids (raw feature space) if comparable."""
    if not lake.exists("segment_models"):
        return 1, None
    models = lake.read("segment_models")
    last = models.agg(F.max("model_version")).first()[0]
    rows = models.filter(F.col("model_version") == last).collect()
    if not rows or list(rows[0]["feature_names"]) != names:
        return last + 1, None  # features changed: new ids cannot be matched to old ones
    return last + 1, {r["segment_id"]: np.array(r["centroid"]) for r in rows}


def _stable_ids(
    centers: np.ndarray, previous: dict[int, np.ndarray] | None, mean: np.ndarray, std: np.ndarray
) -> tuple[dict[int, int], bool]:
    """cluster index -> segment id (1..k): the id of the nearest previous centroid under a
    one-to-one matching; otherwise ordered by cluster size-independent centroid order."""
    k = len(centers)
    if not previous:
        order = sorted(range(k), key=lambda i: tuple(np.round(centers[i], 6)))
        return {cluster: rank + 1 for rank, cluster in enumerate(order)}, False
    prev_ids = sorted(previous)
    prev = np.array(
        [(previous[s] - mean) / std for s in prev_ids]
    )  # into the new standardized space
    cost = np.linalg.norm(centers[:, None, :] - prev[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    relabel = {int(r): int(prev_ids[c]) for r, c in zip(rows, cols, strict=True)}
    next_id = max(prev_ids) + 1
    for cluster in range(k):  # k grew: new segments get new ids
        if cluster not in relabel:
            relabel[cluster] = next_id
            next_id += 1
    return relabel, True
