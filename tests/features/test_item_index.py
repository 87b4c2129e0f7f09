"""new_item_index numbers items in their global order without a single-partition window."""

from datetime import datetime, timedelta

import pytest

from patternlake.features.transforms import new_item_index
from patternlake.spark import sql_settings

# several partitions, none coalesced away: the numbering must carry across them
SPREAD = {
    "spark.sql.shuffle.partitions": "5",
    "spark.sql.adaptive.coalescePartitions.enabled": "false",
}


def _events(spark, n_items=40):
    """Events of ``n_items`` items over three batches, with tied times across items."""
    t0 = datetime(2026, 1, 1)
    rows = []
    for i in range(n_items):
        batch = i % 3
        when = t0 + timedelta(minutes=(i * 7) % 5)  # many items share a time
        for repeat in range(2):
            rows.append((f"item{i:03d}", when + timedelta(hours=repeat), batch))
        rows.append((f"item{i:03d}", when + timedelta(days=1), batch + 1))  # seen again later
    return spark.createDataFrame(rows, "item_id string, event_time timestamp, _batch_order int")


def _expected(events, known=(), offset=0):
    first = {}
    for r in events.collect():
        key = (r._batch_order, r.event_time)
        if r.item_id not in known and (r.item_id not in first or key < first[r.item_id]):
            first[r.item_id] = key
    order = sorted(first, key=lambda item: (*first[item], item))
    return {item: offset + i + 1 for i, item in enumerate(order)}


@pytest.mark.parametrize("with_existing", [False, True])
def test_items_are_numbered_in_order_across_partitions(spark, with_existing):
    events = _events(spark)
    existing, known, offset = None, (), 0
    if with_existing:
        existing = spark.createDataFrame(
            [("item000", 7), ("item005", 3)], "item_id string, item_idx int"
        )
        known, offset = ("item000", "item005"), 7
    with sql_settings(spark, SPREAD):
        out = new_item_index(events, existing)
        rows = out.collect()
    assert {r.item_id: r.item_idx for r in rows} == _expected(events, known, offset)
    first = {r.item_id: (r.first_batch, r.first_seen) for r in rows}
    assert first["item004"] == (1, datetime(2026, 1, 1, 0, 3))  # its earliest batch and time


def test_no_items_gives_an_empty_index(spark):
    events = _events(spark).limit(0)
    assert new_item_index(events, None).collect() == []


def test_the_numbering_plans_no_single_partition_window(spark):
    """A window with no partitionBy moves every row into one partition (Spark warns "No
    Partition Defined for Window operation!"): the item index must not plan one."""
    with sql_settings(spark, SPREAD):
        out = new_item_index(_events(spark), None)
        plan = out._jdf.queryExecution().executedPlan().toString()
    assert "SinglePartition" not in plan, plan
    assert "Window" not in plan, plan
