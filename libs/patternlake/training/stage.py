"""The train stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from patternlake.stages import SPARK_LAKE_CONFIG, Option, Stage

STAGES = (
    Stage(
        "train",
        "patternlake.training.train:train_teacher",
        (*SPARK_LAKE_CONFIG, "backend", "fresh"),
        inputs=("user_sequences", "item_index", "teacher_tuning"),
        optional=("teacher_tuning",),  # read with train.use_tuned
        outputs=("model:teacher",),
        section="train",
        help="train the teacher model on user_sequences and register it in MLflow",
        options=(
            Option(
                "--backend",
                choices=("horovod", "horovodrun", "ddp", "single"),
                help="default: train.backend in conf",
            ),
            Option(
                "--fresh",
                action="store_true",
                help="ignore checkpoints of an earlier run of the same job",
            ),
        ),
    ),
)
