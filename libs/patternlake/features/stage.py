"""The featurize stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Option, Stage

STAGES = (
    Stage(
        "featurize",
        "patternlake.features.featurize:featurize",
        (*SPARK_LAKE_CONFIG, "full"),
        inputs=("silver_events",),
        outputs=("item_index", "user_sequences", "user_features", "featurize_log"),
        section="features",
        help="build item_index, user_sequences and user_features from silver_events",
        options=(
            Option(
                "--full",
                action="store_true",
                help="rebuild everything instead of only new batches",
            ),
        ),
    ),
)
