"""The ingest stage's declaration (see ``patternlake.stages``)."""

from __future__ import annotations

from typing import Any

from patternlake.config import Config
from patternlake.stages import SPARK_LAKE_CONFIG, Option, Stage

FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet")


def without_input(config: Config, options: dict[str, Any]) -> str | None:
    """In a pipeline, ingest is skipped when no ``--input`` is given."""
    return None if options.get("input") else "no --input"


STAGES = (
    Stage(
        "ingest",
        "patternlake.ingest.ingest:ingest",
        (*SPARK_LAKE_CONFIG, "input", "format", "mapping"),
        inputs=(),
        outputs=("bronze_events", "ingest_log"),
        section="ingest",
        help="read raw event files (csv, tsv, jsonl, parquet; file or folder) into bronze_events",
        options=(
            Option("path", dest="input", help="a raw events file or folder"),
            Option("--format", choices=FORMATS),
            Option(
                "--map",
                dest="mapping",
                metavar="FIELD=COLUMN,...",
                parse="patternlake.ingest.ingest:parse_mapping",
                help="source column of each field: user_id, item_id, event_time "
                "(required), event_type, event_id; names or 0-based positions; replaces "
                "ingest.mapping",
            ),
        ),
        skip_when=without_input,
        show="batch",
    ),
)
