"""Reading ``model_decisions`` (what ``distill``, ``compress`` and ``heads`` decided per segment: one
row per gate, with the sizes and timings in ``details`` JSON): the latest decision of each
stage per segment as one report row. Shared by ``patternlake models`` (``model_report``)
and ``patternlake report``. Pure."""

from __future__ import annotations

import json
from typing import Any


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(100 * a / b, 2)


def report_rows(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latest distill and compress decision per segment -> report rows (pure). Segment -1 is
    the shared student's pooled gate over every gate user; a segment's row is its harm guard
    (its gate users only). ``student_ratio_*``: the one-sided 90% bounds of student /
    teacher NDCG@10 (paired bootstrap); ``head_*``: the segment head's file and its ratio to
    the shared student it specialises (with the 90% lower bound its gate reads)."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for d in sorted(decisions, key=lambda d: d["decided_at"]):
        latest[(d["segment_id"], d["stage"])] = d
    shared = latest.get((-1, "distill"))
    shared_details = json.loads(shared["details"]) if shared else {}
    shared_co = latest.get((-1, "compress"))
    tried = json.loads(shared_co["details"]).get("tried", []) if shared_co else []
    rows = []
    for g in sorted({k[0] for k in latest}):
        di, co = latest.get((g, "distill")), latest.get((g, "compress"))
        he = latest.get((g, "heads")) if g >= 0 else None
        teacher = di["reference_ndcg_at_10"] if di else None
        student = di["model_ndcg_at_10"] if di else None
        int8 = co["model_ndcg_at_10"] if co else None
        # who serves: the newest decision (a distill after heads resets every alias)
        newest = max((d for d in (di, co, he) if d), key=lambda d: d["decided_at"])
        champion = newest["champion"]
        rows.append(
            {
                "segment_id": g,
                "valid_users": (di or co)["valid_users"],
                "teacher_params": shared_details.get("teacher_params"),
                "student_params": di.get("params") if di else None,
                "fp32_bytes": di.get("bytes") if di else None,
                "int8_bytes": co.get("bytes") if co else None,
                "sparsity": tried[-1]["sparsity"] if tried else None,
                "teacher_ndcg_at_10": teacher,
                "student_ndcg_at_10": student,
                "int8_ndcg_at_10": int8,
                "student_retention_pct": _pct(student, teacher),
                "int8_retention_pct": _pct(int8, student),
                "champion": champion,
                "student_ratio_lower_90": di.get("ratio_lower_90") if di else None,
                "student_ratio_upper_90": di.get("ratio_upper_90") if di else None,
                "head_bytes": he.get("bytes") if he else None,
                "head_ratio": he.get("ratio") if he else None,
                "head_ratio_lower_90": he.get("ratio_lower_90") if he else None,
            }
        )
    return rows
