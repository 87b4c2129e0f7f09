"""item_stats: ``silver_events`` + ``item_index`` -> ``item_stats`` (overwritten each run)."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.items.transforms import item_stats as compute
from patternlake.lake import Lake


def item_stats(spark: SparkSession, lake: Lake, config: Config) -> dict[str, int]:
    silver_version = lake.version("silver_events")
    stats = compute(
        lake.read("silver_events", version=silver_version),
        lake.read("item_index"),
        list(config.validate_.allowed_event_types),
    ).select(
        "*",
        F.lit(silver_version).cast("long").alias("silver_version"),
        F.current_timestamp().alias("computed_at"),
    )
    version = lake.write(stats, "item_stats", mode="overwrite", overwrite_schema=True)
    items = lake.read("item_stats", version=version).count()
    return {"items": items, "silver_version": silver_version, "version": version}
