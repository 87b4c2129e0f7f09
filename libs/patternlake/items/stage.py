"""The item_stats stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "item_stats",
        "patternlake.items.item_stats:item_stats",
        SPARK_LAKE_CONFIG,
        inputs=("silver_events", "item_index"),
        outputs=("item_stats",),
        section="validate",  # its event types: validate.allowed_event_types
        help="per-item events, users, share of each event type, first and last seen, "
        "from silver_events, to item_stats (for BI; overwritten each run)",
    ),
)
