"""Stages, each declared once (``STAGES``), and pipelines: named, ordered lists of stages
(``pipelines/<name>.yaml``: the repository's top-level ``pipelines/``, which the wheel carries
as ``patternlake/pipelines/``) run in one session."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

import patternlake
from patternlake.config import Config, default_conf_dir, packaged_dir
from patternlake.errors import ConfigError, PatternlakeError, SkippedStepError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.stages import Stage

log = logging.getLogger(__name__)


def collect_stages() -> dict[str, Stage]:
    """Every stage package's declarations (``<package>/stage.py``: ``STAGES``), in the order
    of the flow: by how many stages lie upstream of each (what it reads that another stage
    writes), then by package name. A stage declared twice is an error."""
    found: list[Stage] = []
    root = Path(patternlake.__file__).parent
    for info in sorted(pkgutil.iter_modules([str(root)]), key=lambda m: m.name):
        if not info.ispkg or info.name in patternlake.LIBRARY | patternlake.SHELLS:
            continue
        if importlib.util.find_spec(f"patternlake.{info.name}.stage") is None:
            continue
        found += importlib.import_module(f"patternlake.{info.name}.stage").STAGES
    names = [s.name for s in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PatternlakeError(f"stages declared twice: {', '.join(twice)}")
    return {s.name: s for s in sorted(found, key=lambda s: _depth(s, found, set()))}


def _depth(stage: Stage, stages: list[Stage], seen: set[str]) -> int:
    """How many stages lie on the longest chain of writers upstream of ``stage``."""
    writers = [
        w
        for w in stages
        if w.name not in seen | {stage.name} and set(w.outputs) & set(stage.inputs)
    ]
    seen = seen | {stage.name}
    return max((1 + _depth(w, stages, seen) for w in writers), default=0)


STAGES: dict[str, Stage] = collect_stages()

# names steps had before each stage got one name; pipelines and recorded runs may use them
RENAMED = {"train_teacher": "train"}
STEPS: dict[str, Callable[[Lake, Config, dict[str, Any]], Any]] = {
    n: s.run for n, s in STAGES.items()
}
RUNS_TABLE = "runs"


def pipeline_steps(name: str, directory: Path | None = None) -> list[str]:
    """The steps of pipeline ``name``: from ``directory`` if given, else from the
    ``pipelines/`` next to the conf dir in use, else from the ``pipelines/`` that comes with
    the code (``packaged_dir``: the wheel's copy when installed, the repository's top-level
    ``pipelines/`` in a checkout or editable install)."""
    candidates = (
        [directory]
        if directory
        else [default_conf_dir().parent / "pipelines", packaged_dir("pipelines")]
    )
    directory = next((d for d in candidates if (d / f"{name}.yaml").is_file()), None)
    if directory is None:
        known = sorted({p.stem for d in candidates for p in d.glob("*.yaml")})
        raise ConfigError(f"run: no pipeline {name!r} (known: {', '.join(known) or 'none'})")
    path = directory / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text()) or {}
    steps = [_current_name(step, path) for step in spec.get("steps") or []]
    unknown = [s for s in steps if s not in STAGES]
    if unknown or not steps:
        raise ConfigError(
            f"{path}: steps {unknown or '(none)'} are not jobs (known: {', '.join(STAGES)})"
        )
    return steps


def _current_name(step: Any, path: Path) -> Any:
    if step in RENAMED:
        log.warning(
            "%s: step %s is called %s now; the old name still works but will go",
            path,
            step,
            RENAMED[step],
        )
    return RENAMED.get(step, step)


def check_inputs(
    steps: list[str],
    lake: Lake,
    config: Config,
    options: dict[str, Any],
    pipeline: str | None = None,
) -> None:
    """Before anything runs: every table a step reads exists or an earlier step (one not
    skipped) writes it (``model:`` inputs are checked by the stages themselves: score waits
    for a teacher). ``pipeline``: its name; None for one stage on its own (the CLI), whose
    error names the command to run first: "segment: user_features does not exist yet; run
    `patternlake featurize` first"."""
    for i, step in enumerate(steps):
        stage = STAGES[step]
        for table in stage.inputs:
            if table.startswith("model:") or table in stage.optional or lake.exists(table):
                continue
            if any(
                table in STAGES[s].outputs and not _skip_reason(s, config, options)
                for s in steps[:i]
            ):
                continue
            writers = [s for s in STAGES.values() if table in s.outputs]
            if pipeline is None:
                hint = " or ".join(f"`{s.usage}`" for s in writers)
                words = " ".join(stage.command)
                raise PatternlakeError(f"{words}: {table} does not exist yet; run {hint} first")
            hint = (
                "give --input to ingest raw events"
                if [s.name for s in writers] == ["ingest"]
                else f"run {' or '.join(s.name for s in writers)} first"
            )
            raise PatternlakeError(
                f"run {pipeline}: step {step} reads {table}, which does not exist yet and no "
                f"earlier step of {pipeline} writes it; {hint}"
            )


def _skip_reason(step: str, config: Config, options: dict[str, Any]) -> str | None:
    skip_when = STAGES[step].skip_when
    return skip_when(config, options) if skip_when else None


@dataclass(frozen=True)
class Skipped:
    """What ``execute`` returns for a step it skipped, and why."""

    reason: str


def execute(
    step: str,
    lake: Lake,
    config: Config,
    options: dict[str, Any],
    pipeline: str | None = None,
    strict: bool = False,
) -> tuple[Any, float]:
    """The one way a stage runs, in ``run`` (``pipeline``: its name; there a step may be
    skipped, or with ``strict`` fail instead: ``SkippedStepError``) and from the CLI: called,
    timed, logged. Returns (result or ``Skipped``, seconds)."""
    started = time.monotonic()
    reason = _skip_reason(step, config, options) if pipeline else None
    if reason and strict:
        raise SkippedStepError(f"run {pipeline} --strict: step {step} would be skipped: {reason}")
    if reason:
        log.info("%s: skipped (%s)", step, reason)
        out: Any = Skipped(reason)
    else:
        out = STAGES[step].run(lake, config, options)
    seconds = time.monotonic() - started
    where = f"run {pipeline}" if pipeline else "patternlake"
    log.info("%s: step %s done (%.1fs)", where, step, seconds)
    return out, seconds


def run_stage(step: str, lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    """One stage on its own (``patternlake <stage>``, ``jobs/<stage>.py``): the runner's
    input check, then ``execute``."""
    check_inputs([step], lake, config, options)
    return execute(step, lake, config, options)[0]


def run_pipeline(
    name: str,
    lake: Lake,
    config: Config,
    options: dict[str, Any],
    resume: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """Run the steps of ``pipelines/<name>.yaml`` in order, recording each in ``ops/runs``;
    ``resume``: start at the step where the last run of ``name`` failed; ``strict``: a step
    that would be skipped fails the run instead (``SkippedStepError``, recorded as failed).
    The result: each step's result (None for a skipped one), ``seconds`` per step and
    ``skipped``: {step: reason} for the steps skipped."""
    steps = pipeline_steps(name)
    run_id, resumed_from, done = uuid.uuid4().hex[:12], None, set()
    if resume:
        resumed_from, done = _resume_point(lake, name, steps)
    todo = [s for s in steps if s not in done]
    check_inputs(todo, lake, config, options, pipeline=name)
    results: dict[str, Any] = {"run_id": run_id, "seconds": {}, "skipped": {}}
    for position, step in enumerate(steps):
        if step in done:
            _record(lake, run_id, name, position, step, "skipped", None, 0.0, None, resumed_from)
            continue
        started, at = time.monotonic(), datetime.now(UTC)
        try:
            out, seconds = execute(step, lake, config, options, pipeline=name, strict=strict)
        except BaseException as exc:
            seconds = time.monotonic() - started
            _record(lake, run_id, name, position, step, "failed", at, seconds,
                    f"{type(exc).__name__}: {exc}"[:2000], resumed_from)  # fmt: skip
            log.error(
                "run %s (%s): step %s failed after %.1fs; `patternlake run %s --resume` "
                "continues from it",
                name,
                run_id,
                step,
                seconds,
                name,
            )
            raise
        if isinstance(out, Skipped):
            results["skipped"][step], out = out.reason, None
        results[step] = _plain(out)
        results["seconds"][step] = round(seconds, 1)
        _record(lake, run_id, name, position, step, "succeeded", at, seconds, None, resumed_from)
    return results


def _resume_point(lake: Lake, name: str, steps: list[str]) -> tuple[str, set[str]]:
    """The last run of ``name`` and the steps it (or the runs it resumed) finished."""
    if not lake.exists(RUNS_TABLE):
        raise PatternlakeError(f"run {name} --resume: no run of any pipeline is recorded yet")
    from pyspark.sql import functions as F

    rows = lake.read(RUNS_TABLE).where(F.col("pipeline") == name).collect()
    if not rows:
        raise PatternlakeError(f"run {name} --resume: {name} has never run")
    last = max(rows, key=lambda r: (r.finished_at or r.started_at or datetime.min, r.position))
    run = [r for r in rows if r.run_id == last.run_id]
    if not any(r.status == "failed" for r in run):
        raise PatternlakeError(
            f"run {name} --resume: its last run {last.run_id} did not fail; nothing to resume"
        )
    done = {RENAMED.get(r.step, r.step) for r in run if r.status in ("succeeded", "skipped")}
    return last.run_id, done & set(steps)


def _record(
    lake: Lake,
    run_id: str,
    pipeline: str,
    position: int,
    step: str,
    status: str,
    started_at: datetime | None,
    seconds: float,
    error: str | None,
    resumed_from: str | None,
) -> None:
    row = (run_id, pipeline, position, step, status, started_at, datetime.now(UTC), seconds,
           error, resumed_from)  # fmt: skip
    schema = contract(RUNS_TABLE).ddl()
    lake.write(lake.spark.createDataFrame([row], schema), RUNS_TABLE, mode="append")


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
