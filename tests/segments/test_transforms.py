"""The segment transforms on tiny hand-made frames and arrays, expected values worked out by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from patternlake.errors import PatternlakeError
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

FEATURES = (
    "user_id string, n_events bigint, n_items bigint, diversity double, n_sessions bigint, "
    "events_per_session double, mean_gap_hours double, active_days bigint, share_view double, "
    "category_counts map<string,bigint>"
)
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def features(spark, rows):
    """user_features rows from (user_id, n_events, category_counts); the rest fixed."""
    return spark.createDataFrame(
        [(u, n, 3, 0.5, 2, 1.5, 0.0, 1, 0.25, cats) for u, n, cats in rows], FEATURES
    )


def test_top_categories_ranks_by_events_over_users_ties_by_name(spark):
    df = features(
        spark,
        [("u1", 5, {"a": 3, "b": 1}), ("u2", 5, {"b": 2, "c": 3}), ("u3", 5, {"d": 1})],
    )
    # totals: a 3, b 3, c 3, d 1; the tie a/b/c is broken by name
    assert top_categories(df, 2) == ["a", "b"]
    assert top_categories(df, 3) == ["a", "b", "c"]
    assert top_categories(df, 10) == ["a", "b", "c", "d"]
    assert top_categories(df, 0) == []


def test_share_types_are_the_tables_share_columns_in_order():
    cols = ["user_id", "share_view", "n_events", "share_buy", "shared"]
    assert share_types(cols) == ["view", "buy"]


def test_feature_columns_log_activity_and_category_shares(spark):
    df = features(spark, [("u1", 7, {"a": 3, "b": 1}), ("u2", 1, {})])
    cols = feature_columns(["view"], ["a", "b", "z"])
    assert list(cols) == [
        "log_events",
        "log_items",
        "diversity",
        "log_sessions",
        "log_events_per_session",
        "log_mean_gap_hours",
        "log_active_days",
        "share_view",
        "cat_a",
        "cat_b",
        "cat_z",
    ]
    rows = {
        r.user_id: r for r in df.select("user_id", *[c.alias(n) for n, c in cols.items()]).collect()
    }
    u1, u2 = rows["u1"], rows["u2"]
    assert u1.log_events == pytest.approx(math.log(8))
    assert u1.log_items == pytest.approx(math.log(4))
    assert u1.log_events_per_session == pytest.approx(math.log(2.5))
    assert u1.log_mean_gap_hours == 0.0
    assert (u1.diversity, u1.share_view) == (0.5, 0.25)
    assert (u1.cat_a, u1.cat_b, u1.cat_z) == (0.75, 0.25, 0.0)  # 3 and 1 of 4 events
    assert (u2.cat_a, u2.cat_b, u2.cat_z) == (0.0, 0.0, 0.0)  # no categories: 0, not null


def test_users_below_min_events_are_cold_start_the_others_clustered(spark):
    df = features(spark, [("u2", 2, {}), ("u3", 3, {}), ("u5", 5, {})])
    cols = feature_columns([], [])
    eligible = eligible_users(df, cols, min_events=3)
    assert sorted(r.user_id for r in eligible.collect()) == ["u3", "u5"]
    assert eligible.columns == ["user_id", *cols]
    assert {t for c, t in eligible.dtypes if c != "user_id"} == {"double"}
    cold = cold_start_users(df, min_events=3).collect()
    assert [(r.user_id, r.segment_id, r.distance) for r in cold] == [("u2", COLD_START, None)]


def test_fewer_eligible_users_than_k_is_a_user_error():
    check_enough_users(3, k=3, min_events=10)  # as many as k: fine
    with pytest.raises(PatternlakeError, match=r"only 2 users .*min_events=10.*segment.k=3"):
        check_enough_users(2, k=3, min_events=10)


def test_fit_clusters_standardizes_with_the_sample_std_and_finds_the_groups(spark):
    df = spark.createDataFrame(
        [("u1", 0.0, 7.0), ("u2", 0.0, 7.0), ("u3", 10.0, 7.0), ("u4", 10.0, 7.0)],
        "user_id string, f double, g double",
    )
    clusters = fit_clusters(df, ["f", "g"], k=2, seed=1, max_iter=20)
    # f: mean 5, sample std sqrt((4 * 25) / 3); g is constant: std 0 is replaced by 1
    std_f = math.sqrt(100 / 3)
    np.testing.assert_allclose(clusters.mean, [5.0, 7.0])
    np.testing.assert_allclose(clusters.std, [std_f, 1.0])
    # the two groups, at -/+ 5 / std_f in the standardized space, back at 0 and 10 raw
    got = sorted(clusters.centers.tolist())
    np.testing.assert_allclose(got, [[-5 / std_f, 0.0], [5 / std_f, 0.0]], atol=1e-9)
    np.testing.assert_allclose(sorted(clusters.raw_centers.tolist()), [[0, 7], [10, 7]], atol=1e-9)
    predicted = {r.user_id: r.cluster for r in clusters.model.transform(clusters.scaled).collect()}
    assert predicted["u1"] == predicted["u2"] != predicted["u3"] == predicted["u4"]


def test_previous_centroids_of_the_last_version_when_the_features_match(spark):
    models = spark.createDataFrame(
        [
            (1, 1, [9.0, 9.0], ["a", "b"]),
            (2, 1, [1.0, 2.0], ["a", "b"]),
            (2, 2, [3.0, 4.0], ["a", "b"]),
        ],
        "model_version int, segment_id int, centroid array<double>, feature_names array<string>",
    )
    assert previous_centroids(None, ["a", "b"]) == (1, None)
    version, previous = previous_centroids(models, ["a", "b"])
    assert version == 3 and set(previous) == {1, 2}
    assert previous[1].tolist() == [1.0, 2.0] and previous[2].tolist() == [3.0, 4.0]
    assert previous_centroids(models, ["a", "c"]) == (3, None)  # other features: no matching


def test_stable_ids_match_in_the_new_standardized_space():
    # raw previous centroids A = (4, 0), B = (0, 1); the new scale is std (4, 1), so in the
    # new standardized space A = (1, 0) and B = (0, 1)
    previous = {5: np.array([4.0, 0.0]), 6: np.array([0.0, 1.0])}
    centers = np.array([[1.0, 0.0], [2.0, 2.0]])
    relabel, matched = stable_ids(centers, previous, np.zeros(2), np.array([4.0, 1.0]))
    # standardized: 0 -> A, 1 -> B costs 0 + sqrt(5) = 2.24, the swap sqrt(2) + sqrt(5) = 3.65;
    # matched against the raw centroids the swap would win (sqrt(2) + sqrt(8) = 4.24 < 3 + sqrt(5))
    assert matched and relabel == {0: 5, 1: 6}


def test_stable_ids_without_a_previous_model_follow_the_centroid_order():
    centers = np.array([[0.0, 5.0], [1.0, 0.0], [0.0, 1.0]])
    # sorted by coordinates: (0, 1) cluster 2, (0, 5) cluster 0, (1, 0) cluster 1
    assert stable_ids(centers, None, np.zeros(2), np.ones(2)) == ({2: 1, 0: 2, 1: 3}, False)


def test_assign_segments_relabels_and_measures_the_distance_to_the_centroid(spark):
    schema = StructType(
        [
            StructField("user_id", StringType()),
            StructField("x", VectorUDT()),
            StructField("cluster", IntegerType()),
        ]
    )
    predicted = spark.createDataFrame(
        [("u1", Vectors.dense([3.0, 4.0]), 0), ("u2", Vectors.dense([10.0, 1.0]), 1)], schema
    )
    centers = np.array([[0.0, 0.0], [10.0, 0.0]])
    rows = assign_segments(predicted, {0: 2, 1: 1}, centers).collect()
    got = {r.user_id: (r.segment_id, r.distance) for r in rows}
    assert got == {"u1": (2, 5.0), "u2": (1, 1.0)}  # |(3, 4)| = 5, |(0, 1)| = 1


def test_segment_rows_union_clustered_and_cold_start_under_one_version(spark):
    assigned = spark.createDataFrame(
        [("u1", 2, 0.5)], "user_id string, segment_id int, distance double"
    )
    cold = spark.createDataFrame(
        [("u2", 0, None)], "user_id string, segment_id int, distance double"
    )
    out = segment_rows(assigned, cold, 4, NOW)
    assert out.columns == [
        "user_id",
        "segment_id",
        "is_cold_start",
        "distance",
        "model_version",
        "assigned_at",
    ]
    assert dict(out.dtypes)["segment_id"] == "int"
    got = {
        r.user_id: (r.segment_id, r.is_cold_start, r.distance, r.model_version)
        for r in out.collect()
    }
    assert got == {"u1": (2, False, 0.5, 4), "u2": (0, True, None, 4)}


def test_model_rows_one_per_cluster_with_its_id_raw_centroid_and_users():
    rows = model_rows(
        7, {0: 2, 1: 1}, np.array([[1.0, 2.0], [3.0, 4.0]]), ["a", "b"], {1: 5, 0: 9}, NOW
    )
    assert rows == [
        (7, 2, [1.0, 2.0], ["a", "b"], 0, NOW),  # segment 2 has no users (yet)
        (7, 1, [3.0, 4.0], ["a", "b"], 5, NOW),
    ]


def test_users_per_segment_counts_by_segment_id(spark):
    segments = spark.createDataFrame(
        [("u1", 2), ("u2", 0), ("u3", 2)], "user_id string, segment_id int"
    )
    assert list(users_per_segment(segments).items()) == [(0, 1), (2, 2)]
