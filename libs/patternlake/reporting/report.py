"""`patternlake report [--out FILE]`: one static HTML file (plots as inline PNG) of the lake.

Reads ``validation_results``, ``segments``, ``segment_patterns``, the registered teacher's
MLflow metrics, ``model_decisions``, ``runs`` + ``user_patterns`` and ``drift``; writes
nothing to the lake. A section whose tables do not exist yet says which command makes them.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake

log = logging.getLogger(__name__)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return (
        f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def _figure(width: float = 8, height: float = 3.2, cols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, cols, figsize=(width, height))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return " -> ".join(map(str, v))
    return str(v)


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">{html.escape(what)} does not exist yet: run <code>{html.escape(command)}</code>.</p>'


def data_quality(lake: Lake) -> str:
    if not lake.exists("validation_results"):
        return _missing("validation_results", "patternlake validate")
    rows = [r.asDict() for r in lake.read("validation_results").orderBy("validated_at").collect()]
    fig, ax = _figure()
    x = range(len(rows))
    silver = [r["silver_rows"] for r in rows]
    quarantined = [r["quarantined_rows"] for r in rows]
    dups = [r["duplicate_rows"] for r in rows]
    ax.bar(x, silver, label="silver")
    ax.bar(x, quarantined, bottom=silver, label="quarantined")
    ax.bar(
        x,
        dups,
        bottom=[s + q for s, q in zip(silver, quarantined, strict=True)],
        label="duplicates",
    )
    ax.set_xticks(list(x), [r["batch_id"][-8:] for r in rows], rotation=45, fontsize=7)
    ax.set_ylabel("rows")
    ax.set_title("rows per validated batch")
    ax.legend()
    cols = [
        "batch_id",
        "status",
        "bronze_rows",
        "silver_rows",
        "quarantined_rows",
        "duplicate_rows",
        "invalid_share",
    ]
    return _png(fig) + _table(rows[-10:], cols)


def segments(lake: Lake) -> str:
    if not lake.exists("segments"):
        return _missing("segments", "patternlake segment")
    sizes = lake.read("segments").groupBy("segment_id").count().orderBy("segment_id").collect()
    fig, ax = _figure(6, 3)
    ax.bar([str(r[0]) for r in sizes], [r[1] for r in sizes])
    ax.set_xlabel("segment (0: cold start)")
    ax.set_ylabel("users")
    ax.set_title("users per segment")
    out = _png(fig)
    if lake.exists("segment_patterns"):
        from pyspark.sql import Window

        w = Window.partitionBy("segment_id").orderBy(F.desc("lift"))
        top = (
            lake.read("segment_patterns")
            .where(F.col("kind") == "sequential")
            .withColumn("_n", F.row_number().over(w))
            .where("_n <= 3")
            .orderBy("segment_id", "_n")
            .collect()
        )
        out += "<h3>strongest sequential rules per segment</h3>" + _table(
            [r.asDict() for r in top],
            ["segment_id", "antecedent", "consequent", "support", "confidence", "lift"],
        )
    else:
        out += _missing("segment_patterns", "patternlake mine")
    return out


def teacher_curve(config: Config) -> str:
    from patternlake import registry

    if not registry.registry_exists(config):
        return _missing("a registered teacher", "patternlake run train")

    version = registry.teacher_version(config)
    if version is None:
        return _missing("a registered teacher", "patternlake run train")
    c = registry.client(config)
    run_id = c.get_model_version(registry.TEACHER, version).run_id
    valid = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "valid_ndcg_at_10"))
    loss = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss"))
    fig, ax = _figure()
    ax.plot(
        [s for s, _ in valid], [v for _, v in valid], color="tab:blue", label="validation NDCG@10"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([s for s, _ in loss], [v for _, v in loss], color="tab:orange", label="training loss")
    ax2.set_ylabel("training loss", color="tab:orange")
    ax.set_title(f"teacher v{version}: training curve")
    best = max(valid, key=lambda sv: sv[1]) if valid else None
    note = f"<p>best validation NDCG@10 {best[1]:.4f} at epoch {best[0]}</p>" if best else ""
    return _png(fig) + note


def students(lake: Lake) -> str:
    if not lake.exists("model_decisions"):
        return _missing("model_decisions", "patternlake distill")
    from patternlake.decisions import report_rows

    rows = report_rows([r.asDict() for r in lake.read("model_decisions").collect()])
    fig, (ax, bx) = _figure(10, 3.4, cols=2)
    segs = [str(r["segment_id"]) for r in rows]
    width = 0.27
    for i, (key, label) in enumerate(
        [
            ("teacher_ndcg_at_10", "teacher"),
            ("student_ndcg_at_10", "student"),
            ("int8_ndcg_at_10", "int8 student"),
        ]
    ):
        ax.bar(
            [j + (i - 1) * width for j in range(len(rows))],
            [r[key] or 0 for r in rows],
            width,
            label=label,
        )
    ax.set_xticks(range(len(rows)), segs)
    ax.set_xlabel("segment")
    ax.set_ylabel("validation NDCG@10")
    ax.legend(fontsize=7)
    ax.set_title("quality per segment")
    for size, quality, label in [
        ("fp32_bytes", "student_ndcg_at_10", "fp32"),
        ("int8_bytes", "int8_ndcg_at_10", "int8"),
    ]:
        bx.scatter([r[size] or 0 for r in rows], [r[quality] or 0 for r in rows], label=label)
    bx.set_xlabel("bytes")
    bx.set_ylabel("validation NDCG@10")
    bx.set_title("size vs quality (students)")
    bx.legend(fontsize=7)
    cols = [
        "segment_id",
        "teacher_params",
        "student_params",
        "fp32_bytes",
        "int8_bytes",
        "sparsity",
        "champion",
    ]
    return _png(fig) + _table(rows, cols)


def scoring(lake: Lake) -> str:
    if not lake.exists("user_patterns"):
        return _missing("user_patterns", "patternlake score")
    rows = [
        {"run_id": r.run_id, "users": r.users, "scored_at": str(r.at)}
        for r in lake.read("user_patterns")
        .groupBy("run_id")
        .agg(F.countDistinct("user_id").alias("users"), F.max("scored_at").alias("at"))
        .orderBy("at")
        .collect()
    ]
    fig, ax = _figure(6, 3)
    ax.bar([r["run_id"][-12:] for r in rows], [r["users"] for r in rows])
    ax.set_ylabel("users scored")
    ax.set_title("users per scoring run")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    timed = []
    if lake.exists("runs"):
        timed = [
            {"run_id": r.run_id, "pipeline": r.pipeline, "seconds": r.seconds}
            for r in lake.read("runs")
            .where("step = 'score' AND status = 'succeeded'")
            .orderBy("finished_at")
            .collect()
        ]
    note = _table(timed, ["run_id", "pipeline", "seconds"]) if timed else ""
    return _png(fig) + _table(rows, ["run_id", "users", "scored_at"]) + note


def drift(lake: Lake) -> str:
    if not lake.exists("drift"):
        return _missing("drift", "patternlake monitor")
    rows = [r.asDict() for r in lake.read("drift").orderBy("checked_at").collect()]
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for r in rows:
        if r["value"] is not None and r["statistic"] in ("psi", "js"):
            series[r["check"]].append((r["checked_at"], r["value"]))
    fig, ax = _figure()
    for check, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=check)
    ax.set_ylabel("PSI / JS")
    ax.set_title("drift per check over time")
    if series:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    cols = [
        "checked_at",
        "check",
        "statistic",
        "value",
        "noise_floor",
        "n_ref",
        "n_cur",
        "status",
        "action",
    ]
    return _png(fig) + _table(rows[-20:], cols)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 6px}
th{background:#f4f4f4}.missing{color:#888}img{max-width:100%}"""


def build_report(lake: Lake, config: Config, out: str | None = None) -> dict[str, Any]:
    started = time.monotonic()
    sections = [
        ("Data quality per batch", lambda: data_quality(lake)),
        ("Segments and their top patterns", lambda: segments(lake)),
        ("Teacher training", lambda: teacher_curve(config)),
        ("Students: quality and compression per segment", lambda: students(lake)),
        ("Scoring", lambda: scoring(lake)),
        ("Drift over time", lambda: drift(lake)),
    ]
    parts, plots = [], 0
    for title, build in sections:
        body = build()
        plots += body.count("<img ")
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    now = datetime.now(UTC)
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>patternlake report</title>"
        f"<style>{CSS}</style></head><body><h1>patternlake report</h1>"
        f"<p>lake <code>{html.escape(lake.root)}</code>, {now:%Y-%m-%d %H:%M} UTC</p>"
        + "".join(parts)
        + "</body></html>"
    )
    if out is None and lake.local_path() is None:
        raise PatternlakeError(
            f"report: lake.root {lake.root} is not a local folder; give --out FILE"
        )
    path = Path(out) if out else lake.local_path() / "ops" / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    result = {"path": str(path), "sections": len(sections), "plots": plots, "bytes": len(doc)}
    log.info(
        "report: %s (%d plots, %.1f KB, %.1fs)",
        path,
        plots,
        len(doc) / 1024,
        time.monotonic() - started,
    )
    return result
