"""Segmentation transforms: DataFrame and numpy functions, no lake, no conf object.

The order of :func:`patternlake.segments.segment.segment_users`: the clustering inputs
(:func:`top_categories`, :func:`feature_columns`), the split into users clustered and
cold-start users (:func:`eligible_users`, :func:`cold_start_users`), standardization and
KMeans (:func:`fit_clusters`), stable ids (:func:`previous_centroids`, :func:`stable_ids`),
then the output rows (:func:`assign_segments`, :func:`segment_rows`, :func:`model_rows`).

Invariants: segment 0 (``COLD_START``) is the users with fewer than ``min_events`` events
and has no distance; the clustered users get ids 1..k (more when k grew); distances and
the centroids compared across runs are in the standardized space of the current run, the
centroids stored (``segment_models``) in the raw feature space.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from scipy.optimize import linear_sum_assignment

from patternlake.errors import PatternlakeError

COLD_START = 0


def top_categories(features: DataFrame, n: int) -> list[str]:
    """The ``n`` categories with the most events over all users (``category_counts``),
    ties by name, sorted by name; ``[]`` when ``n`` is 0."""
    if not n:
        return []
    top = (
        features.select(F.explode("category_counts"))
        .groupBy("key")
        .agg(F.sum("value").alias("n"))
        .orderBy(F.desc("n"), "key")
        .limit(n)
        .collect()
    )
    return sorted(r["key"] for r in top)


def share_types(columns: list[str]) -> list[str]:
    """The event types a ``user_features`` table was built with: its ``share_<type>``
    columns, in column order (not conf's: the table may predate a conf change)."""
    return [c.removeprefix("share_") for c in columns if c.startswith("share_")]


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


def eligible_users(features: DataFrame, cols: dict[str, Column], min_events: int) -> DataFrame:
    """user_id and one double column per feature of ``cols`` for the users clustered: those
    with at least ``min_events`` events."""
    return features.filter(F.col("n_events") >= min_events).select(
        "user_id", *[c.cast("double").alias(n) for n, c in cols.items()]
    )


def check_enough_users(n_eligible: int, k: int, min_events: int) -> None:
    """A user error when fewer users than ``k`` can be clustered."""
    if n_eligible < k:
        raise PatternlakeError(
            f"segment: only {n_eligible} users have at least segment.min_events={min_events} events, "
            f"fewer than segment.k={k}; lower one of them"
        )


@dataclass
class Clusters:
    """A KMeans fit on standardized features."""

    model: KMeansModel
    scaled: DataFrame  # the input with ``x``, the standardized feature vector (cached)
    mean: np.ndarray  # (F,) per-feature mean of the raw features
    std: np.ndarray  # (F,) per-feature sample standard deviation; 1.0 where it is 0
    centers: np.ndarray  # (k, F) centroids in the standardized space

    @property
    def raw_centers(self) -> np.ndarray:  # (k, F) centroids in the raw feature space
        return self.centers * self.std + self.mean


# the canonical layout of the rows KMeans is fitted on (see fit_clusters); changing it
# changes which segments a given lake gets
FIT_PARTITIONS = 16


def fit_clusters(
    eligible: DataFrame,
    names: list[str],
    k: int,
    seed: int,
    max_iter: int,
    restarts: int = 1,
    init_steps: int = 2,
) -> Clusters:
    """Standardizes the columns ``names`` of ``eligible`` (mean 0, sample std 1) and fits
    KMeans with ``k`` clusters on them: ``restarts`` fits (seeds ``seed``, ``seed + 1``, ...),
    keeping the one of lowest within-cluster cost (k-means finds a local optimum that depends
    on its start; several starts are the usual remedy, as scikit-learn's ``n_init``), each
    started by k-means|| with ``init_steps`` rounds (MLlib's default is 2; on the generated
    daily data 2 rounds separated its four latent groups from 1 seed in 8, 10 rounds from 5
    seeds in 5).

    MLlib's k-means|| initialisation samples each partition with a seed derived from the
    partition's index, so its result depends on how the rows happen to be laid out (files of
    ``user_features``, upstream shuffles). The rows are put in one canonical layout first
    (``FIT_PARTITIONS`` partitions by a hash of user_id, sorted by user_id): the same users
    and features always give the same segments."""
    eligible = eligible.repartition(FIT_PARTITIONS, "user_id").sortWithinPartitions("user_id")
    vec = VectorAssembler(inputCols=names, outputCol="raw").transform(eligible)
    scaler = StandardScaler(inputCol="raw", outputCol="x", withMean=True, withStd=True).fit(vec)
    scaled = scaler.transform(vec).persist()
    best = None
    for r in range(restarts):
        fit = KMeans(
            k=k,
            seed=seed + r,
            maxIter=max_iter,
            initSteps=init_steps,
            featuresCol="x",
            predictionCol="cluster",
        ).fit(scaled)
        if best is None or fit.summary.trainingCost < best.summary.trainingCost:
            best = fit
    assert best is not None
    std = scaler.std.toArray()
    return Clusters(
        best,
        scaled,
        scaler.mean.toArray(),
        np.where(std > 0, std, 1.0),
        np.array(best.clusterCenters()),
    )


def previous_centroids(
    models: DataFrame | None, names: list[str]
) -> tuple[int, dict[int, np.ndarray] | None]:
    """Next model version, and the last model's centroids (raw feature space) by segment id
    if its features are ``names``. ``models``: ``segment_models``, None before the first."""
    if models is None:
        return 1, None
    last = models.agg(F.max("model_version")).first()[0]
    rows = models.filter(F.col("model_version") == last).collect()
    if not rows or list(rows[0]["feature_names"]) != names:
        return last + 1, None  # features changed: new ids cannot be matched to old ones
    return last + 1, {r["segment_id"]: np.array(r["centroid"]) for r in rows}


def stable_ids(
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


def assign_segments(
    predicted: DataFrame, relabel: dict[int, int], centers: np.ndarray
) -> DataFrame:
    """user_id, segment_id (``relabel`` of ``cluster``) and distance (Euclidean, from ``x``
    to its cluster's row of ``centers``) of ``predicted`` (user_id, x vector, cluster)."""
    mapping = F.create_map(
        *[x for cluster, sid in relabel.items() for x in (F.lit(cluster), F.lit(sid))]
    )
    center_arr = F.array(*[F.array(*[F.lit(float(v)) for v in c]) for c in centers])
    squared = F.zip_with(
        vector_to_array("x"),
        F.element_at(center_arr, F.col("cluster") + 1),
        lambda a, b: (a - b) * (a - b),
    )
    return predicted.select(
        "user_id",
        mapping[F.col("cluster")].alias("segment_id"),
        F.sqrt(F.aggregate(squared, F.lit(0.0), lambda acc, v: acc + v)).alias("distance"),
    )


def cold_start_users(features: DataFrame, min_events: int) -> DataFrame:
    """user_id, segment_id 0 and a null distance for the users with fewer than
    ``min_events`` events."""
    return features.filter(F.col("n_events") < min_events).select(
        "user_id",
        F.lit(COLD_START).alias("segment_id"),
        F.lit(None).cast("double").alias("distance"),
    )


def segment_rows(assigned: DataFrame, cold: DataFrame, version: int, now: datetime) -> DataFrame:
    """The ``segments`` table: clustered and cold-start users under model ``version``."""
    return assigned.unionByName(cold).select(
        "user_id",
        F.col("segment_id").cast("int"),
        (F.col("segment_id") == COLD_START).alias("is_cold_start"),
        "distance",
        F.lit(version).alias("model_version"),
        F.lit(now).alias("assigned_at"),
    )


def model_rows(
    version: int,
    relabel: dict[int, int],
    raw_centers: np.ndarray,
    names: list[str],
    counts: dict[int, int],
    now: datetime,
) -> list[tuple]:
    """The ``segment_models`` rows of model ``version``: per cluster, its segment id, raw
    centroid, the feature names and its users (``counts``, by segment id)."""
    return [
        (
            version,
            int(relabel[i]),
            [float(v) for v in raw_centers[i]],
            names,
            int(counts.get(relabel[i], 0)),
            now,
        )
        for i in range(len(raw_centers))
    ]


def users_per_segment(segments: DataFrame) -> dict[int, int]:
    """segment id -> users of a ``segments`` table, by segment id."""
    counts = {r["segment_id"]: r["count"] for r in segments.groupBy("segment_id").count().collect()}
    return dict(sorted(counts.items()))
