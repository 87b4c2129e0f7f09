"""The mine stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "mine",
        "patternlake.patterns.mine:mine_patterns",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "item_index"),
        outputs=("segment_patterns",),
        section="mine",
        help="mine sequential and co-occurrence rules per segment (PrefixSpan, FPGrowth)",
    ),
)
