"""A human-readable HTML report of one validated batch (counts, reasons, every expectation)."""

from __future__ import annotations

import html
import json
from typing import Any


def render_html(report: dict[str, Any], gx_result: dict[str, Any]) -> str:
    esc = html.escape
    status = report["status"]
    colour = "#1a7f37" if status == "passed" else "#cf222e"
    counts = "".join(
        f"<tr><td>{esc(k)}</td><td class=n>{report[k]:,}</td></tr>"
        for k in ("bronze_rows", "silver_rows", "quarantined_rows", "duplicate_rows")
    )
    reasons = (
        "".join(
            f"<tr><td><code>{esc(r)}</code></td><td class=n>{n:,}</td></tr>"
            for r, n in sorted(report["reason_counts"].items(), key=lambda kv: -kv[1])
        )
        or "<tr><td colspan=2>none</td></tr>"
    )
    rows = []
    for res in gx_result.get("results", []):
        cfg = res.get("expectation_config") or {}
        kwargs = {k: v for k, v in (cfg.get("kwargs") or {}).items() if k != "batch_id"}
        result = res.get("result") or {}
        ok = res.get("success")
        rows.append(
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td class=n>{}</td><td class=n>{}</td>"
            "<td><code>{}</code></td></tr>".format(
                "✔" if ok else "✘",
                esc(cfg.get("type", "")),
                esc(json.dumps(kwargs, default=str))[:300],
                f"{result.get('unexpected_count', 0) or 0:,}",
                f"{result.get('unexpected_percent', 0) or 0:.3f}%",
                esc(str((cfg.get("meta") or {}).get("reason", ""))),
            )
        )
    stats = gx_result.get("statistics", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Validation {esc(report["batch_id"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.n{{text-align:right}}code{{font-size:90%}}</style></head>
<body>
<h1>Batch <code>{esc(report["batch_id"])}</code>: <span style="color:{colour}">{esc(status)}</span></h1>
<p>Invalid share {report["invalid_share"]:.3%}. Great Expectations: {stats.get("successful_expectations", 0)} of
{stats.get("evaluated_expectations", 0)} expectations met. Every rejected row is in <code>quarantine_events</code>
with all its reason codes; duplicates (same <code>event_id</code>) are counted, not quarantined.</p>
<h2>Rows</h2><table>{counts}</table>
<h2>Quarantine reasons</h2><table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<h2>Expectations</h2>
<table><tr><th></th><th>expectation</th><th>arguments</th><th>unexpected</th><th>%</th><th>reason code</th></tr>
{"".join(rows)}</table>
</body></html>
"""
