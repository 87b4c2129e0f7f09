"""`patternlake models`: one row per segment from the latest ``model_decisions`` (segment -1:
the shared student's pooled gate; validation numbers on the gate users, as the gates saw
them, with the 90% bounds of student / teacher), written to ``model_report``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from patternlake.config import Config
from patternlake.decisions import report_rows
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract

# (key, title, width, format)
COLUMNS = [
    ("segment_id", "segment", 7, "d"),
    ("valid_users", "users", 6, "d"),
    ("teacher_params", "teacher_p", 10, "d"),
    ("student_params", "student_p", 10, "d"),
    ("fp32_bytes", "fp32_B", 9, "d"),
    ("int8_bytes", "int8_B", 9, "d"),
    ("sparsity", "sparsity", 8, ".2f"),
    ("teacher_ndcg_at_10", "ndcg_teach", 10, ".4f"),
    ("student_ndcg_at_10", "ndcg_stud", 10, ".4f"),
    ("int8_ndcg_at_10", "ndcg_int8", 10, ".4f"),
    ("student_retention_pct", "stud/teach%", 11, ".1f"),
    ("student_ratio_lower_90", "low90", 6, ".3f"),
    ("student_ratio_upper_90", "up90", 6, ".3f"),
    ("int8_retention_pct", "int8/stud%", 10, ".1f"),
    ("head_ratio", "head/stud", 9, ".3f"),
    ("head_ratio_lower_90", "low90", 6, ".3f"),
    ("champion", "champion", 18, "s"),
]


def model_report(lake: Lake, config: Config) -> list[dict[str, Any]]:
    from patternlake.registry import require_store

    require_store(config, "models")
    if not lake.exists("model_decisions"):
        raise PatternlakeError(
            "models: model_decisions does not exist yet; run `patternlake distill` first"
        )
    decisions = [r.asDict() for r in lake.read("model_decisions").collect()]
    rows = report_rows(decisions)
    now = datetime.now(UTC)
    table = contract("model_report")
    data = [tuple(now if c == "reported_at" else r.get(c) for c in table.names) for r in rows]
    df = lake.spark.createDataFrame(data, table.ddl())
    lake.write(df, "model_report", "append", merge_schema=True)
    return rows
