"""Where the seconds go: a Spark event log summarised per job, grouped by the code that ran it.

    .venv/bin/python bench/sparkprofile.py EVENT_LOG_FILE_OR_DIR [--top 40]

Benchmarks turn the event log on (``spark.eventLog.enabled``) and call ``summarise`` after
the run. Each Spark job is attributed to its call site (the line of patternlake code that
triggered it, e.g. ``count at validate.py:163``) and to the SQL execution it belongs to; the
summary gives per call site: jobs, wall seconds (job submit to end), task seconds (executor
run time, both cores), bytes read from storage, shuffle bytes written and records read.
Time outside any job (driver Python, delta-rs commits, JVM start) is what the caller's wall
clock shows beyond the jobs' sum.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Site:
    jobs: int = 0
    wall_s: float = 0.0
    task_s: float = 0.0
    read_mb: float = 0.0
    shuffle_mb: float = 0.0
    records_in: int = 0


def _metric(stage: dict, name: str) -> float:
    for acc in stage.get("Accumulables", []):
        if acc.get("Name") == name:
            try:
                return float(acc.get("Value", 0))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def _short(site: str) -> str:
    """``count at /work/main/libs/patternlake/quality/validate.py:163`` -> ``count at validate.py:163``."""
    return re.sub(r"(/[^\s:]+/)([^/\s:]+\.py)", r"\2", site or "?")


def _log_files(path: Path) -> list[Path]:
    """One application's event log: a file, a rolling log folder (``eventlog_v2_*``) or the
    event log directory (its newest application)."""
    if path.is_file():
        return [path]
    apps = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not apps:
        raise FileNotFoundError(f"no event log under {path}")
    if any(p.name.startswith("events_") for p in apps):  # a rolling log folder itself
        return sorted(
            (p for p in apps if p.name.startswith("events_")),
            key=lambda p: int(p.name.split("_")[1]),
        )
    return _log_files(max(apps, key=lambda p: p.stat().st_mtime))


def summarise(
    path: str | Path, windows: dict[str, tuple[float, float]] | None = None
) -> dict[str, Site]:
    """Per call site totals of one event log (a file, or a folder holding one). With
    ``windows`` ({"ingest": (start, end)} in epoch seconds), a job submitted inside a window
    is named ``ingest: <call site>``."""
    jobs: dict[int, dict] = {}
    stage_job: dict[int, int] = {}
    stages: dict[int, dict] = {}
    for log_file in _log_files(Path(path)):
        with log_file.open() as f:
            for line in f:
                ev = json.loads(line)
                kind = ev.get("Event")
                if kind == "SparkListenerJobStart":
                    props = ev.get("Properties") or {}
                    label = props.get("spark.job.description")
                    call = _short(props.get("callSite.short") or "")
                    site = f"{label} [{call}]" if label and call else (label or call or "?")
                    start = ev["Submission Time"]
                    for name, (lo, hi) in (windows or {}).items():
                        if lo * 1000 <= start <= hi * 1000:
                            site = f"{name}: {site}"
                            break
                    jobs[ev["Job ID"]] = {"start": start, "site": site}
                    for sid in ev.get("Stage IDs", []):
                        stage_job[sid] = ev["Job ID"]
                elif kind == "SparkListenerJobEnd":
                    if ev["Job ID"] in jobs:
                        jobs[ev["Job ID"]]["end"] = ev["Completion Time"]
                elif kind == "SparkListenerStageCompleted":
                    info = ev["Stage Info"]
                    stages[info["Stage ID"]] = info
    out: dict[str, Site] = defaultdict(Site)
    for job in jobs.values():
        s = out[job["site"]]
        s.jobs += 1
        s.wall_s += (job.get("end", job["start"]) - job["start"]) / 1000
    for sid, info in stages.items():
        job = jobs.get(stage_job.get(sid, -1))
        if job is None:
            continue
        s = out[job["site"]]
        s.task_s += _metric(info, "internal.metrics.executorRunTime") / 1000
        s.read_mb += _metric(info, "internal.metrics.input.bytesRead") / 1e6
        s.shuffle_mb += _metric(info, "internal.metrics.shuffle.write.bytesWritten") / 1e6
        s.records_in += int(_metric(info, "internal.metrics.input.recordsRead"))
    return dict(out)


def render(sites: dict[str, Site], top: int = 40) -> str:
    rows = sorted(sites.items(), key=lambda kv: -kv[1].wall_s)
    total = sum(s.wall_s for s in sites.values())
    lines = [
        f"{'job label [call site]':<70} {'jobs':>4} {'wall s':>7} {'task s':>7} {'read MB':>8} {'shuf MB':>8} {'rows in':>11}"
    ]
    for name, s in rows[:top]:
        lines.append(
            f"{name[:70]:<70} {s.jobs:>4} {s.wall_s:>7.1f} {s.task_s:>7.1f} {s.read_mb:>8.1f} "
            f"{s.shuffle_mb:>8.1f} {s.records_in:>11,}"
        )
    lines.append(f"{'all jobs':<70} {sum(s.jobs for s in sites.values()):>4} {total:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    print(render(summarise(args.log), args.top))


if __name__ == "__main__":
    main()
