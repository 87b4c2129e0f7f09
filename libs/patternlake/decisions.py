"""Reading ``model_decisions`` (what ``distill`` and ``compress`` decided per segment: one
row per gate, with the sizes and timings in ``details`` JSON): the latest decision of each
stage per segment as one report row. Shared by ``patternlake models`` (``model_report``)
and ``patternlake report``. Pure."""

from __future__ import annotations

import json
from typing import Any


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
