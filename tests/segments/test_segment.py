import numpy as np
import pytest
from pyspark.sql import functions as F

from patternlake.errors import PatternlakeError
from patternlake.features.featurize import featurize
from patternlake.ingest.ingest import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from patternlake.segments.segment import COLD_START, segment_users
from patternlake.segments.transforms import fit_clusters, stable_ids
from tests.conftest import with_overrides


@pytest.fixture(scope="module")
def featurized(spark, config, small_events, tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    cfg = config.model_copy(update={"lake": config.lake.model_copy(update={"root": str(root)})})
    cfg = with_overrides(cfg, segment={"k": 3, "min_events": 10})
    lake = Lake(spark, cfg.lake)
    ingest(spark, lake, cfg, str(small_events / "events"))
    validate_pending(spark, lake, cfg)
    featurize(spark, lake, cfg)
    return cfg, lake


def assignment(lake):
    return {r.user_id: r.segment_id for r in lake.read("segments").collect()}


def test_segments_recover_the_latent_groups_and_cold_start(spark, featurized, small_events):
    import pyarrow.parquet as pq

    config, lake = featurized
    result = segment_users(spark, lake, config)
    got = assignment(lake)
    feats = {r.user_id: r.n_events for r in lake.read("user_features").collect()}
    assert set(got) == set(feats)
    assert all((got[u] == COLD_START) == (feats[u] < 10) for u in got)
    assert set(result.segments) <= {0, 1, 2, 3}
    # purity: each found segment is dominated by one latent segment
    truth = {
        r["user_id"]: r["segment"]
        for r in pq.read_table(small_events / "truth" / "users.parquet").to_pylist()
    }
    pure = 0
    warm = [u for u in got if got[u] != COLD_START]
    for s in {got[u] for u in warm}:
        members = [truth[u] for u in warm if got[u] == s]
        pure += max(members.count(k) for k in set(members))
    latent = [truth[u] for u in warm]
    chance = max(latent.count(k) for k in set(latent)) / len(warm)  # one segment for everybody
    assert pure / len(warm) > chance + 0.2


def test_segment_ids_are_stable_across_reruns(spark, featurized):
    config, lake = featurized
    first = segment_users(spark, lake, config)
    before = assignment(lake)
    segment_users(spark, lake, config)
    assert assignment(lake) == before  # same data, same seed: same ids
    # another seed: KMeans may number its clusters differently; the ids are matched to the
    # previous model's, so the same set of ids comes back
    second = segment_users(spark, lake, with_overrides(config, segment={"seed": 12345}))
    assert second.matched_previous and second.model_version == first.model_version + 2
    assert set(assignment(lake).values()) == set(before.values())
    versions = lake.read("segment_models").select("model_version").distinct().count()
    assert versions >= 2
    assert lake.read("segments").select(F.max("model_version")).first()[0] == second.model_version


def test_too_few_users_for_k_is_a_user_error(spark, featurized):
    config, lake = featurized
    with pytest.raises(PatternlakeError, match="segment.k"):
        segment_users(spark, lake, with_overrides(config, segment={"k": 3, "min_events": 10_000}))


def test_new_centroids_take_the_ids_of_the_nearest_previous_ones():
    previous = {1: np.array([0.0, 0.0]), 2: np.array([10.0, 0.0]), 3: np.array([0.0, 10.0])}
    mean, std = np.zeros(2), np.ones(2)
    # KMeans found the same clusters, numbered differently and moved a little
    centers = np.array([[0.5, 9.5], [0.2, -0.3], [9.8, 0.4]])
    relabel, matched = stable_ids(centers, previous, mean, std)
    assert matched and relabel == {0: 3, 1: 1, 2: 2}
    # one cluster more than before: it gets a new id, the others keep theirs
    grown = np.vstack([centers, [[20.0, 20.0]]])
    relabel, _ = stable_ids(grown, previous, mean, std)
    assert relabel == {0: 3, 1: 1, 2: 2, 3: 4}
    # no previous model: ids 1..k in a deterministic centroid order
    first, matched = stable_ids(centers, None, mean, std)
    assert not matched and sorted(first.values()) == [1, 2, 3]


def test_the_same_users_in_another_layout_get_the_same_clusters(spark):
    """KMeans' initialisation samples per partition: without a canonical layout the same
    user_features rows written in other files gave other segments (found when validate's
    silver layout changed)."""
    rng = np.random.default_rng(3)
    centers = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0], [6.0, 0.0]])
    points = centers[rng.integers(0, 4, 3000)] + rng.normal(0, 2.0, (3000, 2))
    rows = [(f"u{i:05d}", float(x), float(y)) for i, (x, y) in enumerate(points)]
    one = spark.createDataFrame(rows, "user_id string, a double, b double").coalesce(1)
    other = (
        spark.createDataFrame(rows[::-1], "user_id string, a double, b double")
        .repartition(7)
        .sortWithinPartitions(F.rand(1))
    )
    fits = [fit_clusters(df, ["a", "b"], 4, seed=42, max_iter=20).centers for df in (one, other)]
    np.testing.assert_array_equal(fits[0], fits[1])
