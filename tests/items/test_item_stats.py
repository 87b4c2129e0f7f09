"""The item_stats node on a tiny hand-made frame; the stage on a lake without its input."""

from __future__ import annotations

from datetime import datetime

from patternlake.items.transforms import item_stats


def test_item_stats_counts_events_users_type_shares_and_first_last_seen(spark):
    t = [datetime(2026, 1, d) for d in (1, 2, 3, 4)]
    events = spark.createDataFrame(
        [
            ("u1", "a", "view", t[1]),
            ("u1", "a", "buy", t[3]),
            ("u2", "a", "view", t[0]),
            ("u2", "a", "view", t[2]),
            ("u2", "b", "click", t[2]),
            ("u3", "c", "view", t[0]),  # not in item_index yet: left out
        ],
        "user_id string, item_id string, event_type string, event_time timestamp",
    )
    index = spark.createDataFrame([("a", 1), ("b", 2)], "item_id string, item_idx int")
    rows = {r.item_id: r for r in item_stats(events, index, ["view", "click", "buy"]).collect()}
    assert set(rows) == {"a", "b"}
    a, b = rows["a"], rows["b"]
    assert (a.item_idx, a.events, a.users) == (1, 4, 2)
    assert (a.share_view, a.share_click, a.share_buy) == (0.75, 0.0, 0.25)
    assert (a.first_seen, a.last_seen) == (t[0], t[3])
    assert (b.item_idx, b.events, b.users, b.share_click) == (2, 1, 1, 1.0)
    assert b.first_seen == b.last_seen == t[2]


def test_item_stats_before_silver_events_exists_says_run_validate_first(stage, capsys):
    from patternlake.cli import main

    config, lake = stage
    assert main(["--set", f"lake.root={config.lake.root}", "item", "stats"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "patternlake: error: item stats: silver_events does not exist yet; "
        "run `patternlake validate` first"
    ), err
    assert not lake.exists("item_stats")


def test_the_stage_writes_item_stats_through_its_contract(spark, stage):
    from patternlake.lake.catalog import contract
    from patternlake.pipeline import run_stage

    config, lake = stage
    t = datetime(2026, 1, 1)
    silver = contract("silver_events").ddl(
        "event_id", "user_id", "item_id", "event_type", "event_time", "_batch_id"
    )
    rows = [("e1", "u1", "a", "view", t, "b1"), ("e2", "u2", "a", "buy", t, "b1")]
    lake.write(spark.createDataFrame(rows, silver), "silver_events")
    index = contract("item_index").ddl("item_id", "item_idx")
    lake.write(spark.createDataFrame([("a", 1)], index), "item_index")
    assert run_stage("item_stats", lake, config, {})["items"] == 1
    (row,) = lake.read("item_stats").collect()
    assert (row.item_id, row.events, row.users, row.share_view, row.share_buy) == (
        "a",
        2,
        2,
        0.5,
        0.5,
    )
    assert row.silver_version == lake.version("silver_events")
