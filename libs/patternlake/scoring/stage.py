"""The score stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from typing import Any

from patternlake.config import Config
from patternlake.stages import SPARK_LAKE_CONFIG, Option, Stage


def without_teacher(config: Config, options: dict[str, Any]) -> str | None:
    """In a pipeline, score is skipped until a teacher is registered (the first daily run):
    no tracking store yet means no teacher; a store that cannot answer is an error."""
    from patternlake.registry import registry_exists, teacher_version

    if not registry_exists(config) or teacher_version(config) is None:
        return "no registered teacher yet; `patternlake run train` makes one"
    return None


STAGES = (
    Stage(
        "score",
        "patternlake.scoring.score:score_users",
        (*SPARK_LAKE_CONFIG, "run_id"),
        inputs=(
            "user_sequences",
            "item_index",
            "segments",
            "segment_patterns",
            "model:teacher",
            "model:student",
        ),
        outputs=("user_patterns",),
        section="score",
        help="write each user's top items, the rule behind each and the events that "
        "explain it to user_patterns (one partition per run id)",
        options=(Option("--run-id", help="default: the UTC time; a rerun replaces it"),),
        skip_when=without_teacher,  # the first daily run: no model yet
    ),
)
