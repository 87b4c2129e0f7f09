"""monitor: sample-size-aware drift checks; shifted data alarms, unshifted data does not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from patternlake.monitoring import transforms


def test_psi_bands_alone_alarm_on_small_samples_of_one_distribution_the_noise_floor_does_not():
    rng = np.random.default_rng(3)
    p = np.full(10, 0.1)
    band_hits = floor_hits = 0
    for _ in range(300):
        a, b = rng.multinomial(100, p), rng.multinomial(100, p)
        value = transforms.psi(a, b)
        band_hits += value >= 0.1
        floor_hits += transforms.judge("psi", a, b, 0.1, 0.25, 0.01, 1).status in ("warn", "alarm")
    assert band_hits / 300 > 0.5  # the convention alone: most unshifted pairs "drift"
    assert floor_hits / 300 <= 0.03  # with the floor: about alpha


def test_a_real_shift_alarms_and_small_windows_are_too_small():
    rng = np.random.default_rng(4)
    p = np.full(10, 0.1)
    q = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])
    a, b = rng.multinomial(5000, p), rng.multinomial(5000, q)
    d = transforms.judge("psi", a, b, 0.1, 0.25, 0.01, 200)
    assert d.status == "alarm" and d.value > 0.25 > d.floor and d.p_value < 1e-6
    assert (
        transforms.judge("psi", a[:3] // 100, b[:3] // 100, 0.1, 0.25, 0.01, 200).status
        == "too_small"
    )
    js = transforms.judge("js", a, b, 0.02, 0.05, 0.01, 200)
    assert js.status == "alarm" and 0 < js.floor < js.value <= np.log(2)


def test_js_noise_floor_holds_for_many_categories():
    rng = np.random.default_rng(5)
    p = 1.0 / np.arange(1, 301) ** 1.1
    p /= p.sum()
    alarms = sum(
        transforms.judge(
            "js", rng.multinomial(2000, p), rng.multinomial(2000, p), 0.0001, 0.0002, 0.01, 1
        ).status
        != "ok"
        for _ in range(100)
    )
    assert alarms <= 5


def test_helpers():
    keys, r, c = transforms.aligned_counts({"a": 5, "b": 3, "c": 1}, {"a": 1, "d": 4}, top=1)
    assert keys == ["a", "d", "(other)"] and r.tolist() == [5, 0, 4] and c.tolist() == [1, 4, 0]
    edges = transforms.quantile_edges(np.arange(100), 4)
    assert transforms.binned(np.arange(100), edges).tolist() == [25, 25, 25, 25]
    gains = np.array([1.0, 0.0] * 50)  # mean 0.5, sd ~0.503, n = 100
    assert transforms.mean_half_width(gains, 0.05) == pytest.approx(1.96 * 0.50252 / 10, rel=1e-3)
    assert transforms.mean_half_width(np.array([0.3]), 0.05) == pytest.approx(1.96, rel=1e-3)


# ---- on a real lake ----------------------------------------------------------------------


def _events(seed: int, prefix: str) -> pa.Table:
    from patternlake.config import GenerateConfig
    from patternlake.synthetic.generate import generate_events

    params = GenerateConfig(
        users=400, items=300, events=16_000, segments=3, rules_per_segment=3, rule_length=3,
        rule_strength=0.8, rule_noise=0.05, chain_rate=0.25, zipf_exponent=1.1, categories=12,
        start="2026-01-01T00:00:00Z", days=30, seed=seed, format="csv", files=1,
    )  # fmt: skip
    t = generate_events(params).events
    ids = pc.binary_join_element_wise(prefix, t["event_id"], "")
    return t.set_column(t.schema.get_field_index("event_id"), "event_id", ids)


def _ingest_validate(main, root, table: pa.Table, path) -> None:
    pacsv.write_csv(table, path)
    assert main(["--set", f"lake.root={root}", "ingest", str(path)]) == 0
    assert main(["--set", f"lake.root={root}", "validate"]) == 0


@pytest.mark.slow
def test_monitor_alarms_on_shifted_behaviour_and_not_on_the_same(stage, tmp_path):
    from patternlake import registry
    from patternlake.cli import main
    from patternlake.monitoring.monitor import monitor

    config, lake = stage
    root = config.lake.root
    config = config.model_copy(
        update={
            "mlflow": config.mlflow.model_copy(
                update={"tracking_uri": f"sqlite:///{tmp_path}/none.db"}
            )
        }
    )
    registry.use_experiment(config)  # an empty registry: monitor refuses a missing one
    base = _events(11, "a-")
    half = np.random.default_rng(0).random(base.num_rows) < 0.5
    _ingest_validate(main, root, base.filter(pa.array(half)), tmp_path / "day1.csv")
    _ingest_validate(main, root, base.filter(pa.array(~half)), tmp_path / "day2.csv")
    same = monitor(lake.spark, lake, config)
    by = {c["check"]: c for c in same["checks"]}
    assert same["status"] in ("ok", "warn"), same["checks"]
    assert {
        "event_type_mix",
        "items",
        "user.events",
        "user.distinct_items",
        "user.active_days",
    } <= set(by)
    assert by["items"]["n_ref"] > 5000 and by["items"]["n_cur"] > 5000

    # another seed: other popular items, other segment mix
    shifted = _events(12, "b-")
    _ingest_validate(main, root, shifted, tmp_path / "day3.csv")
    moved = monitor(lake.spark, lake, config)
    by = {c["check"]: c for c in moved["checks"]}
    assert moved["status"] == "alarm" and by["items"]["status"] == "alarm", moved["checks"]
    assert by["items"]["value"] > by["items"]["noise_floor"]
    assert "retrain suggested" in moved["action"]

    rows = lake.read("drift").collect()
    assert len(rows) == len(same["checks"]) + len(moved["checks"])
    assert {r.monitor_id for r in rows} == {same["monitor_id"], moved["monitor_id"]}


def _next_day(spark, trained_lake, tmp_path, hit: bool):
    """A copy of the trained lake, scored (run "served"), then one batch with each of 300
    users' next event: their served first item (``hit``) or an item never served to them."""
    from pyspark.sql import functions as F

    from patternlake.cli import main
    from patternlake.scoring.score import score_users
    from tests.conftest import copy_trained_lake

    cfg, lake, args = copy_trained_lake(
        trained_lake,
        tmp_path,
        score={"explain_events": 0},
        train={"epochs": 2, "patience": 1, "backend": "single"},
        students={"epochs": 2, "patience": 1},
        compress={"sparsity": [0.5]},
    )
    score_users(spark, lake, cfg, "served")
    served = lake.read("user_patterns").where("run_id = 'served'")
    last = {
        r.user_id: r.t
        for r in lake.read("silver_events")
        .groupBy("user_id")
        .agg(F.max("event_time").alias("t"))
        .collect()
    }
    users = sorted(last)[:300]
    if hit:
        items = {r.user_id: r.item_id for r in served.where("rank = 1").collect()}
    else:
        seen = {(r.user_id, r.item_id) for r in served.select("user_id", "item_id").collect()}
        catalogue = [r.item_id for r in lake.read("item_index").select("item_id").collect()]
        items = {u: next(i for i in catalogue if (u, i) not in seen) for u in users}
    lines = ['"user_id","item_id","event_type","event_time","event_id","category","price"']
    for i, u in enumerate(users):
        ms = int(last[u].timestamp() * 1000) + 60_000
        lines.append(f'"{u}","{items[u]}","view",{ms},"next-{i}","c01",1.0')
    path = tmp_path / "next.csv"
    path.write_text("\n".join(lines) + "\n")
    assert main([*args, "ingest", str(path)]) == 0
    assert main([*args, "validate"]) == 0
    return cfg, lake, len(users)


@pytest.mark.slow
def test_served_items_that_are_the_next_events_show_no_decay(spark, trained_lake, tmp_path):
    from patternlake.monitoring.monitor import monitor

    cfg, lake, n = _next_day(spark, trained_lake, tmp_path, hit=True)
    recent = {c["check"]: c for c in monitor(spark, lake, cfg)["checks"]}["recent_ndcg@10"]
    assert recent["status"] == "ok" and recent["n_cur"] == n and recent["value"] == 1.0
    assert recent["run_id"] == "served"


@pytest.mark.slow
def test_decay_alarms_and_auto_retrain_replaces_the_models_through_the_gates(
    spark, trained_lake, tmp_path
):
    from patternlake import registry
    from patternlake.monitoring.monitor import monitor
    from patternlake.pipeline import run_pipeline

    cfg, lake, n = _next_day(spark, trained_lake, tmp_path, hit=False)
    teacher_before = registry.teacher_version(cfg)
    decisions_before = lake.read("model_decisions").count()
    # what `patternlake monitor --auto-retrain` passes
    result = monitor(spark, lake, cfg, retrain=lambda: run_pipeline("train", lake, cfg, {}))
    recent = {c["check"]: c for c in result["checks"]}["recent_ndcg@10"]
    assert recent["status"] == "alarm" and recent["value"] == 0.0 and recent["n_cur"] == n
    assert result["action"] == "retrained" and set(result["retrain"]) >= {
        "train",
        "distill",
        "compress",
    }
    assert int(registry.teacher_version(cfg)) > int(teacher_before)
    assert lake.read("model_decisions").count() > decisions_before  # every promotion gated
    rows = lake.read("drift").where("check = 'recent_ndcg@10'").collect()
    assert [r.action for r in rows] == ["retrained"]


# ---- the statistics computed in Spark equal their in-memory statements ------------------


def _random_events(spark, rng, users: int, events: int, items: int):
    """user_id, item_id, event_time: skewed users (integer features with many ties)."""
    from datetime import UTC, datetime, timedelta

    user = rng.zipf(1.2, events) % users
    item = rng.zipf(1.3, events) % items
    day0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        (f"u{u}", f"i{i:03d}", day0 + timedelta(hours=int(h)))
        for u, i, h in zip(user, item, rng.integers(0, 24 * 20, events), strict=True)
    ]
    rows += [(f"u{u}", "i000", day0) for u in range(users)]  # every user at least once
    return spark.createDataFrame(rows, "user_id string, item_id string, event_time timestamp")


def _per_user(df) -> dict[str, np.ndarray]:
    """The per-user features, collected (the monitor keeps them in Spark)."""
    from patternlake.monitoring.monitor import USER_FEATURES

    aggs = [agg().alias(name) for name, agg in USER_FEATURES.items()]
    rows = df.groupBy("user_id").agg(*aggs).collect()
    return {f: np.array([r[f] for r in rows], dtype=np.float64) for f in USER_FEATURES}


def test_user_feature_bins_counted_in_spark_equal_numpy(spark):
    from patternlake.monitoring.monitor import user_feature_counts

    rng = np.random.default_rng(7)
    ref, cur = _random_events(spark, rng, 300, 4000, 50), _random_events(spark, rng, 200, 5000, 50)
    r, c = _per_user(ref), _per_user(cur)
    got = user_feature_counts(ref, cur, bins=10)
    for feature, (edges, ref_counts, cur_counts) in got.items():
        want = transforms.quantile_edges(r[feature], 10)
        assert edges.tolist() == want.tolist(), feature
        assert ref_counts.tolist() == transforms.binned(r[feature], want).tolist(), feature
        assert cur_counts.tolist() == transforms.binned(c[feature], want).tolist(), feature
        assert ref_counts.sum() == 300 and cur_counts.sum() == 200
        assert (ref_counts[:-1] > 0).all()  # every bin but the last holds its edge
    assert len(got["events"][0]) >= 3  # the data do spread over several bins


def test_category_counts_in_spark_equal_aligned_counts(spark):
    from patternlake.monitoring.monitor import category_counts

    rng = np.random.default_rng(8)
    ref, cur = _random_events(spark, rng, 100, 3000, 80), _random_events(spark, rng, 100, 2000, 80)

    def counts(df):
        keys, n = np.unique([r.item_id for r in df.select("item_id").collect()], return_counts=True)
        return dict(zip(keys.tolist(), n.tolist(), strict=True))

    r, c = counts(ref), counts(cur)
    for top in (None, 1, 5, 30, 1000):  # ties at the cut-off among them
        keys, ref_counts, cur_counts = category_counts(ref, cur, "item_id", top)
        want = transforms.aligned_counts(r, c, top)
        assert keys == want[0], top
        assert ref_counts.tolist() == want[1].tolist() and cur_counts.tolist() == want[2].tolist()
    # keys only in one window; an (other) bin that is empty in both
    a = spark.createDataFrame([("x",), ("x",), ("y",)], "item_id string")
    b = spark.createDataFrame([("z",), ("w",), ("w",)], "item_id string")
    keys, ra, rb = category_counts(a, b, "item_id", 2)
    assert (keys, ra.tolist(), rb.tolist()) == (
        ["w", "x", "y", "z", "(other)"],
        [0, 2, 1, 0, 0],
        [2, 0, 0, 1, 0],
    )
    assert transforms.aligned_counts({"x": 2, "y": 1}, {"z": 1, "w": 2}, 2)[0] == keys


def test_half_width_from_count_and_deviation():
    gains = np.array([1.0, 0.0, 0.5, 0.25] * 10)
    assert transforms.half_width(40, float(np.std(gains, ddof=1)), 0.05) == pytest.approx(
        transforms.mean_half_width(gains, 0.05)
    )
    assert transforms.half_width(1, None, 0.05) == transforms.mean_half_width(np.array([0.3]), 0.05)


@pytest.mark.slow
def test_monitor_keeps_users_and_items_in_spark_and_computes_the_same_statistics(
    stage, tmp_path, monkeypatch
):
    """On a lake of 2 x 400 users and 300 items, no collect brings more than the kept items
    (2 x top_items + 1) to the driver, and every drift value is the numpy statistic of the
    same per-user features and item counts."""
    from patternlake import registry
    from patternlake.cli import main
    from patternlake.lake.tables import batches_in_order
    from patternlake.monitoring.monitor import USER_FEATURES, monitor
    from tests.conftest import with_overrides

    config, lake = stage
    config = with_overrides(
        config, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/none.db"}, monitor={"top_items": 20}
    )
    registry.use_experiment(config)
    _ingest_validate(main, config.lake.root, _events(11, "a-"), tmp_path / "day1.csv")
    _ingest_validate(main, config.lake.root, _events(12, "b-"), tmp_path / "day2.csv")
    silver = lake.read("silver_events")
    first, last = batches_in_order(silver)
    ref, cur = silver.where(silver._batch_id == first), silver.where(silver._batch_id == last)

    frame = type(silver)
    collect, sizes = frame.collect, []
    monkeypatch.setattr(frame, "collect", lambda df: sizes.append(len(rows := collect(df))) or rows)
    result = monitor(lake.spark, lake, config)
    monkeypatch.undo()
    assert 0 < max(sizes) <= 2 * 20 + 1, sizes

    m, by = config.monitor, {c["check"]: c for c in result["checks"]}
    r, c = _per_user(ref), _per_user(cur)
    assert len(r["events"]) == 400 and len(c["events"]) == 400
    for feature in USER_FEATURES:
        edges = transforms.quantile_edges(r[feature], m.bins)
        want = transforms.judge(
            "psi",
            transforms.binned(r[feature], edges),
            transforms.binned(c[feature], edges),
            m.psi_warn, m.psi_alarm, m.alpha, m.min_users,
        )  # fmt: skip
        got = by[f"user.{feature}"]
        assert got["value"] == pytest.approx(want.value, rel=1e-12), feature
        assert (got["n_ref"], got["n_cur"], got["status"]) == (400, 400, want.status)

    def counts(df, column):
        return {k: v for k, v in df.groupBy(column).count().collect()}

    items = transforms.aligned_counts(counts(ref, "item_id"), counts(cur, "item_id"), 20)
    assert len(items[0]) < 300  # the rest is one bin
    want = transforms.judge("js", items[1], items[2], m.js_warn, m.js_alarm, m.alpha, m.min_rows)
    assert by["items"]["value"] == pytest.approx(want.value, rel=1e-12)
    assert by["items"]["status"] == want.status == "alarm"
    types = transforms.aligned_counts(counts(ref, "event_type"), counts(cur, "event_type"))
    want = transforms.judge("psi", types[1], types[2], m.psi_warn, m.psi_alarm, m.alpha, m.min_rows)
    assert by["event_type_mix"]["value"] == pytest.approx(want.value, rel=1e-12)
