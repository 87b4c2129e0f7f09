"""The evaluate stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import JSON, SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "evaluate",
        "patternlake.evaluation.evaluate:evaluate_models",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "item_index", "segments", "model:teacher", "model:student"),
        outputs=(),
        section="evaluate",
        help="evaluate the registered teacher and the baselines (protocol in docs/design.md)",
        options=(JSON,),
        optional=("segments",),  # per-segment metrics when there are segments
        show="evaluation",
    ),
)
