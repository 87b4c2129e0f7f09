"""Pipelines: named, ordered lists of job steps (``pipelines/<name>.yaml``, shipped in the
package) run in one session."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from patternlake.config import Config, default_conf_dir, packaged_dir
from patternlake.errors import ConfigError, PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract

log = logging.getLogger(__name__)


def _ingest(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.ingest.bronze import ingest

    if not options.get("input"):
        log.info("ingest: skipped (no --input)")
        return None
    return ingest(
        lake.spark, lake, config, options["input"], options.get("format"), options.get("mapping")
    )


def _validate(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.quality.validate import validate_pending

    return validate_pending(lake.spark, lake, config)


def _featurize(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.features.featurize import featurize

    return featurize(lake.spark, lake, config, full=bool(options.get("full")))


def _segment(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.segments.kmeans import segment_users

    return segment_users(lake.spark, lake, config)


def _mine(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.patterns.mine import mine_patterns

    return mine_patterns(lake.spark, lake, config)


def _train_teacher(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.training.teacher_job import train_teacher

    return train_teacher(
        lake.spark, lake, config, options.get("backend"), bool(options.get("fresh"))
    )


def _tune_teacher(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.tuning.teacher_study import tune_teacher

    return tune_teacher(lake, config)


def _distill(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.students.distill import distill

    return distill(lake.spark, lake, config)


def _compress(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.students.compress import compress

    return compress(lake.spark, lake, config)


def _score(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.scoring.score import score_users
    from patternlake.students.registry import teacher_version

    if options.get("step_optional") and teacher_version(config) is None:
        log.info("score: skipped (no registered teacher yet; `patternlake run train` makes one)")
        return None
    return score_users(lake.spark, lake, config, options.get("run_id"))


def _evaluate(lake: Lake, config: Config, options: dict[str, Any]) -> Any:
    from patternlake.models.evaluate import evaluate_models

    return evaluate_models(lake.spark, lake, config)


@dataclass(frozen=True)
class Stage:
    """One declaration per stage: what it reads and writes (lake tables; ``model:x`` for a
    registered model), its job file in ``jobs/`` and its CLI words. The runner's checks, the
    timing log, the run records and the exports come from these."""

    name: str
    run: Callable[[Lake, Config, dict[str, Any]], Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    job: str
    command: tuple[str, ...]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("ingest", _ingest, (), ("bronze_events", "ingest_log"), "ingest", ("ingest",)),
        Stage(
            "validate",
            _validate,
            ("bronze_events",),
            ("silver_events", "quarantine_events", "validation_results"),
            "validate",
            ("validate",),
        ),
        Stage(
            "featurize",
            _featurize,
            ("silver_events",),
            ("item_index", "user_sequences", "user_features", "featurize_log"),
            "featurize",
            ("featurize",),
        ),
        Stage(
            "segment",
            _segment,
            ("user_features",),
            ("segments", "segment_models"),
            "segment",
            ("segment",),
        ),
        Stage(
            "mine",
            _mine,
            ("user_sequences", "segments"),
            ("segment_patterns",),
            "mine_patterns",
            ("mine",),
        ),
        Stage(
            "tune_teacher",
            _tune_teacher,
            ("user_sequences",),
            ("teacher_tuning",),
            "tune_teacher",
            ("tune", "teacher"),
        ),
        Stage(
            "train_teacher",
            _train_teacher,
            ("user_sequences", "item_index"),
            ("model:teacher",),
            "train_teacher",
            ("train",),
        ),
        Stage(
            "distill",
            _distill,
            ("user_sequences", "segments", "model:teacher"),
            ("model:student", "model_decisions"),
            "distill",
            ("distill",),
        ),
        Stage(
            "compress",
            _compress,
            ("user_sequences", "segments", "model:student"),
            ("model:student", "model_decisions"),
            "compress",
            ("compress",),
        ),
        Stage(
            "evaluate",
            _evaluate,
            ("user_sequences", "segments", "model:teacher", "model:student"),
            (),
            "evaluate",
            ("evaluate",),
        ),
        Stage(
            "score",
            _score,
            ("user_sequences", "segments", "segment_patterns", "model:teacher", "model:student"),
            ("user_patterns",),
            "score",
            ("score",),
        ),
    )
}
STEPS: dict[str, Callable[[Lake, Config, dict[str, Any]], Any]] = {
    n: s.run for n, s in STAGES.items()
}
RUNS_TABLE = "runs"


def pipeline_steps(name: str, directory: Path | None = None) -> list[str]:
    """The steps of pipeline ``name``: from ``directory`` if given, else from the
    ``pipelines/`` next to the conf dir in use, else from the package's own."""
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
    steps = spec.get("steps") or []
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ConfigError(
            f"{path}: steps {unknown or '(none)'} are not jobs (known: {', '.join(STEPS)})"
        )
    return steps


def check_inputs(name: str, steps: list[str], lake: Lake, options: dict[str, Any]) -> None:
    """Before anything runs: every table a step reads exists or an earlier step writes it
    (``model:`` inputs are checked by the stages themselves: score waits for a teacher)."""
    made: set[str] = set()
    for step in steps:
        stage = STAGES[step]
        for table in stage.inputs:
            if table.startswith("model:") or table in made or lake.exists(table):
                continue
            writers = [s.name for s in STAGES.values() if table in s.outputs]
            hint = (
                "give --input to ingest raw events"
                if writers == ["ingest"]
                else f"run {' or '.join(writers)} first"
            )
            raise PatternlakeError(
                f"run {name}: step {step} reads {table}, which does not exist yet and no "
                f"earlier step of {name} writes it; {hint}"
            )
        if step != "ingest" or options.get("input"):
            made.update(stage.outputs)


def run_pipeline(
    name: str, lake: Lake, config: Config, options: dict[str, Any], resume: bool = False
) -> dict[str, Any]:
    """Run the steps of ``pipelines/<name>.yaml`` in order, recording each in ``ops/runs``;
    ``resume``: start at the step where the last run of ``name`` failed."""
    steps = pipeline_steps(name)
    run_id, resumed_from, done = uuid.uuid4().hex[:12], None, set()
    if resume:
        resumed_from, done = _resume_point(lake, name, steps)
    todo = [s for s in steps if s not in done]
    check_inputs(name, todo, lake, options)
    results: dict[str, Any] = {"run_id": run_id, "seconds": {}}
    for position, step in enumerate(steps):
        if step in done:
            _record(lake, run_id, name, position, step, "skipped", None, 0.0, None, resumed_from)
            continue
        started, at = time.monotonic(), datetime.now(UTC)
        try:
            # in a pipeline, scoring before any model exists is skipped (the first daily run)
            out = STEPS[step](lake, config, {**options, "step_optional": True})
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
        seconds = time.monotonic() - started
        results[step] = _plain(out)
        results["seconds"][step] = round(seconds, 1)
        _record(lake, run_id, name, position, step, "succeeded", at, seconds, None, resumed_from)
        log.info("run %s: step %s done (%.1fs)", name, step, seconds)
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
    done = {r.step for r in run if r.status in ("succeeded", "skipped")}
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


def export_spark_submit(name: str, env: str, master: str) -> str:
    """The shell commands that run pipeline ``name`` as one ``spark-submit`` per step."""
    steps = pipeline_steps(name)
    lines = [
        "#!/usr/bin/env bash",
        f"# patternlake pipeline {name}: one spark-submit per step (patternlake export spark-submit)",
        "set -euo pipefail",
        f'MASTER="${{MASTER:-{master}}}"',
    ]
    if "ingest" in steps:
        lines.append('INPUT="${INPUT:?set INPUT to the raw events (file or folder)}"')
    for step in steps:
        stage = STAGES[step]
        extra = ' "$INPUT"' if step == "ingest" else ""
        reads = ", ".join(stage.inputs) or "raw files"
        writes = ", ".join(stage.outputs) or "(report)"
        lines.append(f"# {step}: {reads} -> {writes}")
        lines.append(f'spark-submit --master "$MASTER" jobs/{stage.job}.py --conf {env}{extra}')
    return "\n".join(lines) + "\n"


def dependencies(steps: list[str]) -> dict[str, list[str]]:
    """Each step's upstream steps: the latest earlier step writing each thing it reads (so
    independent branches run in parallel on Databricks)."""
    deps: dict[str, list[str]] = {}
    for i, step in enumerate(steps):
        ups: list[str] = []
        for thing in STAGES[step].inputs:
            writer = next((s for s in reversed(steps[:i]) if thing in STAGES[s].outputs), None)
            if writer and writer not in ups:
                ups.append(writer)
        deps[step] = ups
    return deps


def export_databricks(name: str, env: str) -> str:
    """A Databricks Asset Bundle resource file with one job for pipeline ``name``: a Python
    wheel task per step (the package's ``patternlake`` entry point), dependencies from what
    each step reads and writes."""
    steps = pipeline_steps(name)
    deps = dependencies(steps)
    tasks = []
    for step in steps:
        stage = STAGES[step]
        params = [*stage.command, "--conf", env]
        if step == "ingest":
            params.append("{{job.parameters.input}}")
        task: dict[str, Any] = {"task_key": step}
        if deps[step]:
            task["depends_on"] = [{"task_key": d} for d in deps[step]]
        task |= {
            "job_cluster_key": "patternlake",
            "python_wheel_task": {
                "package_name": "patternlake",
                "entry_point": "patternlake",
                "parameters": params,
            },
            "libraries": [{"whl": "../dist/*.whl"}],
        }
        tasks.append(task)
    job: dict[str, Any] = {
        "name": f"patternlake-{name}",
        "tasks": tasks,
        "job_clusters": [
            {
                "job_cluster_key": "patternlake",
                "new_cluster": {
                    "spark_version": "16.4.x-scala2.13",
                    "node_type_id": "${var.node_type_id}",
                    "num_workers": 2,
                },
            }
        ],
    }
    if "ingest" in steps:
        job["parameters"] = [{"name": "input", "default": "/Volumes/main/raw/events"}]
    bundle = {
        "variables": {"node_type_id": {"default": "i3.xlarge"}},
        "resources": {"jobs": {f"patternlake_{name}": job}},
    }
    header = (
        f"# patternlake pipeline {name} as a Databricks Asset Bundle job "
        "(patternlake export databricks); include it from databricks.yml\n"
    )
    return header + yaml.safe_dump(bundle, sort_keys=False)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
