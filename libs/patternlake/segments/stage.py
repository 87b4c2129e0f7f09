"""The segment stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "segment",
        "patternlake.segments.segment:segment_users",
        SPARK_LAKE_CONFIG,
        inputs=("user_features",),
        outputs=("segments", "segment_models"),
        section="segment",
        help="cluster users into segments (MLlib KMeans) with stable ids",
    ),
)
