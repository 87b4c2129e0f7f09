"""The distill and compress stages' declarations (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Stage

STAGES = (
    Stage(
        "distill",
        "patternlake.students.distill:distill",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "model:teacher"),
        outputs=("teacher_topk", "model:student", "model_decisions"),
        section="students",
        help="one shared student for every user, distilled from the registered teacher's "
        "stored top-K by the teacher's training backend, gated against the teacher (paired "
        "bootstrap) and registered in MLflow",
    ),
    Stage(
        "compress",
        "patternlake.students.compress:compress",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "model:student"),
        outputs=("model:student", "model_decisions"),
        section="compress",
        help="prune and int8-quantize the shared student, gated by its fidelity to its fp32 model",
    ),
    Stage(
        "heads",
        "patternlake.students.heads:heads",
        SPARK_LAKE_CONFIG,
        inputs=("user_sequences", "segments", "model:student"),
        outputs=("teacher_topk", "model:student", "model_decisions"),
        section="heads",
        help="per segment, a small head on the shared student (item bias, final norm, "
        "an adapter of small rank) trained as parallel Spark tasks, kept only where a paired test "
        "on the segment's held-out users says it beats the shared student",
    ),
)
