"""The validate stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "validate",
        "patternlake.quality.validate:validate_pending",
        SPARK_LAKE_CONFIG,
        inputs=("bronze_events",),
        outputs=("silver_events", "quarantine_events", "validation_results"),
        section="validate",
        help="split new bronze batches into silver_events and quarantine_events",
        show="json_lines",
    ),
)
