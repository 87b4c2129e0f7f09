"""Item statistics: a plain ``DataFrame -> DataFrame`` function."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def item_stats(events: DataFrame, item_index: DataFrame, event_types: list[str]) -> DataFrame:
    """One row per item of ``item_index`` seen in ``events``: its events, distinct users,
    the share of each event type (``share_<type>``, one per ``event_types``, 0.0 when
    none) and the first and last event time.

    ``events`` needs item_id, user_id, event_type and event_time (silver_events);
    ``item_index`` item_id and item_idx. Items featurize has not indexed yet are left out.
    """
    n = F.count(F.lit(1))
    shares = [
        (F.sum((F.col("event_type") == t).cast("long")) / n).alias(f"share_{t}")
        for t in event_types
    ]
    per_item = events.groupBy("item_id").agg(
        n.alias("events"),
        F.countDistinct("user_id").alias("users"),
        *shares,
        F.min("event_time").alias("first_seen"),
        F.max("event_time").alias("last_seen"),
    )
    return item_index.select("item_id", "item_idx").join(per_item, "item_id")
