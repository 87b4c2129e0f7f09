"""The distill and compress stages' declarations (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "distill",
        "patternlake.students.distill:distill",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "model:teacher"),
        outputs=("model:student", "model_decisions"),
        section="students",
        help="one student per segment from the registered teacher (parallel Spark tasks), "
        "gated against the teacher and registered in MLflow",
    ),
    Stage(
        "compress",
        "patternlake.students.compress:compress",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "model:student"),
        outputs=("model:student", "model_decisions"),
        section="compress",
        help="prune, fine-tune and int8-quantize each segment's student, gated against "
        "its fp32 model",
    ),
)
