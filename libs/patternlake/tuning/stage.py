"""The tune_teacher stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import Stage

STAGES = (
    Stage(
        "tune_teacher",
        "patternlake.tuning.tune_teacher:tune_teacher",
        ("lake", "config"),
        inputs=("user_sequences", "item_index"),
        outputs=("teacher_tuning",),
        section="tune",
        help="multi-objective study of the teacher (validation NDCG@10 vs parameters) in "
        "tune.parallel processes; trials to teacher_tuning, the front to MLflow "
        "(train.use_tuned uses it)",
    ),
)
