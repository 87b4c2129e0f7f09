"""`patternlake models`: one row per segment from the latest ``model_decisions`` of the
current teacher (validation numbers, as the gates saw them), written to ``model_report``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from patternlake.config import Config
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
    ("int8_retention_pct", "int8/stud%", 10, ".1f"),
    ("teacher_ms_per_1000", "ms_teach", 9, ".1f"),
    ("student_ms_per_1000", "ms_stud", 8, ".1f"),
    ("int8_ms_per_1000", "ms_int8", 8, ".1f"),
    ("champion", "champion", 18, "s"),
]


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(100 * a / b, 2)


def report_rows(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latest distill and compress decision per segment -> report rows (pure)."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for d in sorted(decisions, key=lambda d: d["decided_at"]):
        latest[(d["segment_id"], d["stage"])] = d
    rows = []
    for g in sorted({k[0] for k in latest}):
        di, co = latest.get((g, "distill")), latest.get((g, "compress"))
        dd = json.loads(di["details"]) if di else {}
        cd = json.loads(co["details"]) if co else {}
        teacher = di["reference_ndcg_at_10"] if di else None
        student = di["model_ndcg_at_10"] if di else None
        int8 = co["model_ndcg_at_10"] if co else None
        champion = (co or di)["champion"]
        rows.append(
            {
                "segment_id": g,
                "valid_users": (di or co)["valid_users"],
                "teacher_params": dd.get("teacher_params"),
                "student_params": dd.get("params"),
                "fp32_bytes": dd.get("bytes"),
                "int8_bytes": cd.get("int8_bytes"),
                "sparsity": cd.get("sparsity_reached"),
                "teacher_ndcg_at_10": teacher,
                "student_ndcg_at_10": student,
                "int8_ndcg_at_10": int8,
                "student_retention_pct": _pct(student, teacher),
                "int8_retention_pct": _pct(int8, co["reference_ndcg_at_10"] if co else None),
                "teacher_ms_per_1000": dd.get("teacher_ms_per_1000_users"),
                "student_ms_per_1000": dd.get("ms_per_1000_users"),
                "int8_ms_per_1000": cd.get("int8_ms_per_1000_users"),
                "champion": champion,
            }
        )
    return rows


def model_report(lake: Lake, config: Config) -> list[dict[str, Any]]:
    if not lake.exists("model_decisions"):
        raise PatternlakeError(
            "models: model_decisions does not exist yet; run `patternlake distill` first"
        )
    decisions = [r.asDict() for r in lake.read("model_decisions").collect()]
    rows = report_rows(decisions)
    now = datetime.now(UTC)
    table = contract("model_report")
    data = [tuple(now if c == "reported_at" else r.get(c) for c in table.names) for r in rows]
    lake.write(lake.spark.createDataFrame(data, table.ddl()), "model_report", "append")
    return rows
