"""Stages, each declared once (``STAGES``), and pipelines: named, ordered lists of stages
(``pipelines/<name>.yaml``: the repository's top-level ``pipelines/``, which the wheel carries
as ``patternlake/pipelines/``) run in one session."""

from __future__ import annotations

import importlib
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


@dataclass(frozen=True)
class Option:
    """One CLI option of a stage, in argparse's terms. Its ``key`` names it in the stage's
    ``options`` (and ``args``): the same key ``run`` fills (``run --input``: ingest's path)."""

    flag: str  # "--backend"; without dashes a positional, shown by that name
    help: str | None = None
    dest: str | None = None  # default: from the flag
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None  # "store_true"
    default: Any = None
    metavar: str | None = None
    parse: str | None = None  # "module:function" turning the CLI's text into the value

    @property
    def key(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")

    @property
    def fallback(self) -> Any:
        """The value when not given (a ``run`` step without the flag)."""
        return False if self.action == "store_true" else self.default

    def add_to(self, parser: Any) -> None:
        kwargs = {
            "help": self.help,
            "type": self.type,
            "choices": self.choices,
            "action": self.action,
            "default": self.default,
            "metavar": self.metavar,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.flag.startswith("-"):
            parser.add_argument(self.flag, dest=self.key, **kwargs)
        else:
            parser.add_argument(self.key, **({"metavar": self.flag} | kwargs))

    def value(self, given: Any) -> Any:
        """What the CLI passes on for ``given`` (the parsed text)."""
        return _resolve(self.parse)(given) if self.parse else given


@dataclass(frozen=True)
class Stage:
    """One declaration per stage. Its ``name`` is its only name: the step in pipelines and
    ``ops/runs``, ``jobs/<name>.py``, and (split at ``_``) its CLI words. From it come the
    CLI subcommand (help, options), the runner's input check, its "run X first" errors, the
    timing log, the run records and the exports.

    ``call`` is ``module:function``, imported when the stage runs, called with ``args`` in
    order: each ``spark``, ``lake``, ``config`` or the key of one of its ``options``."""

    name: str
    call: str
    args: tuple[str, ...]
    inputs: tuple[str, ...]  # lake tables it needs (``model:x``: a registered model)
    outputs: tuple[str, ...]
    section: str  # its section of conf
    help: str
    options: tuple[Option, ...] = ()
    optional: tuple[str, ...] = ()  # inputs it reads only when they exist: not checked
    skip_when: Callable[[Config, dict[str, Any]], str | None] | None = None  # in a pipeline
    show: str = "json"  # how the CLI prints the result (``patternlake.cli.SHOW``)

    @property
    def command(self) -> tuple[str, ...]:
        return tuple(self.name.split("_"))

    @property
    def job(self) -> str:
        return self.name

    @property
    def usage(self) -> str:
        """``patternlake <words> <POSITIONALS>``, as the "run X first" errors name it."""
        positionals = [o.flag.upper() for o in self.options if not o.flag.startswith("-")]
        return " ".join(("patternlake", *self.command, *positionals))

    def run(self, lake: Lake, config: Config, options: dict[str, Any]) -> Any:
        values = {o.key: o.fallback for o in self.options} | options
        values |= {"spark": lake.spark, "lake": lake, "config": config}
        return _resolve(self.call)(*(values[a] for a in self.args))


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _without_input(config: Config, options: dict[str, Any]) -> str | None:
    return None if options.get("input") else "no --input"


def _without_teacher(config: Config, options: dict[str, Any]) -> str | None:
    from patternlake.registry import teacher_version

    if teacher_version(config) is None:
        return "no registered teacher yet; `patternlake run train` makes one"
    return None


SPARK_LAKE_CONFIG = ("spark", "lake", "config")
JSON = Option("--json", action="store_true", help="print one JSON object")
FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "ingest",
            "patternlake.ingest.ingest:ingest",
            (*SPARK_LAKE_CONFIG, "input", "format", "mapping"),
            inputs=(),
            outputs=("bronze_events", "ingest_log"),
            section="ingest",
            help="read raw event files (csv, tsv, jsonl, parquet; file or folder) into "
            "bronze_events",
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
            skip_when=_without_input,
            show="batch",
        ),
        Stage(
            "validate",
            "patternlake.quality.validate:validate_pending",
            SPARK_LAKE_CONFIG,
            inputs=("bronze_events",),
            outputs=("silver_events", "quarantine_events", "validation_results"),
            section="validate",
            help="split new bronze batches into silver_events and quarantine_events",
            show="json_lines",
        ),
        Stage(
            "featurize",
            "patternlake.features.featurize:featurize",
            (*SPARK_LAKE_CONFIG, "full"),
            inputs=("silver_events",),
            outputs=("item_index", "user_sequences", "user_features", "featurize_log"),
            section="features",
            help="build item_index, user_sequences and user_features from silver_events",
            options=(
                Option(
                    "--full",
                    action="store_true",
                    help="rebuild everything instead of only new batches",
                ),
            ),
        ),
        Stage(
            "item_stats",
            "patternlake.items.item_stats:item_stats",
            SPARK_LAKE_CONFIG,
            inputs=("silver_events", "item_index"),
            outputs=("item_stats",),
            section="validate",  # its event types: validate.allowed_event_types
            help="per-item events, users, share of each event type, first and last seen, "
            "from silver_events, to item_stats (for BI; overwritten each run)",
        ),
        Stage(
            "segment",
            "patternlake.segments.segment:segment_users",
            SPARK_LAKE_CONFIG,
            inputs=("user_features",),
            outputs=("segments", "segment_models"),
            section="segment",
            help="cluster users into segments (MLlib KMeans) with stable ids",
        ),
        Stage(
            "mine",
            "patternlake.patterns.mine:mine_patterns",
            SPARK_LAKE_CONFIG,
            inputs=("user_sequences", "segments"),
            outputs=("segment_patterns",),
            section="mine",
            help="mine sequential and co-occurrence rules per segment (PrefixSpan, FPGrowth)",
        ),
        Stage(
            "tune_teacher",
            "patternlake.tuning.tune_teacher:tune_teacher",
            ("lake", "config"),
            inputs=("user_sequences", "item_index"),
            outputs=("teacher_tuning",),
            section="tune",
            help="multi-objective study of the teacher (validation NDCG@10 vs parameters) in "
            "tune.parallel processes; trials to teacher_tuning, the front to MLflow "
            "(train.use_tuned uses it)",
        ),
        Stage(
            "train",
            "patternlake.training.train:train_teacher",
            (*SPARK_LAKE_CONFIG, "backend", "fresh"),
            inputs=("user_sequences", "item_index"),
            outputs=("model:teacher",),
            section="train",
            help="train the teacher model on user_sequences and register it in MLflow",
            options=(
                Option(
                    "--backend",
                    choices=("horovod", "horovodrun", "ddp", "single"),
                    help="default: train.backend in conf",
                ),
                Option(
                    "--fresh",
                    action="store_true",
                    help="ignore checkpoints of an earlier run of the same job",
                ),
            ),
        ),
        Stage(
            "distill",
            "patternlake.students.distill:distill",
            SPARK_LAKE_CONFIG,
            inputs=("user_sequences", "segments", "model:teacher"),
            outputs=("model:student", "model_decisions"),
            section="students",
            help="one student per segment from the registered teacher (parallel Spark tasks), "
            "gated against the teacher and registered in MLflow",
        ),
        Stage(
            "compress",
            "patternlake.students.compress:compress",
            SPARK_LAKE_CONFIG,
            inputs=("user_sequences", "segments", "model:student"),
            outputs=("model:student", "model_decisions"),
            section="compress",
            help="prune, fine-tune and int8-quantize each segment's student, gated against "
            "its fp32 model",
        ),
        Stage(
            "evaluate",
            "patternlake.evaluation.evaluate:evaluate_models",
            SPARK_LAKE_CONFIG,
            inputs=("user_sequences", "segments", "model:teacher", "model:student"),
            outputs=(),
            section="evaluate",
            help="evaluate the registered teacher and the baselines (protocol in DESIGN.md)",
            options=(JSON,),
            optional=("segments",),  # per-segment metrics when there are segments
            show="evaluation",
        ),
        Stage(
            "score",
            "patternlake.scoring.score:score_users",
            (*SPARK_LAKE_CONFIG, "run_id"),
            inputs=(
                "user_sequences",
                "item_index",
                "segments",
                "segment_patterns",
                "model:teacher",
                "model:student",
            ),
            outputs=("user_patterns",),
            section="score",
            help="write each user's top items, the rule behind each and the events that "
            "explain it to user_patterns (one partition per run id)",
            options=(Option("--run-id", help="default: the UTC time; a rerun replaces it"),),
            skip_when=_without_teacher,  # the first daily run: no model yet
        ),
    )
}
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


def execute(
    step: str,
    lake: Lake,
    config: Config,
    options: dict[str, Any],
    pipeline: str | None = None,
) -> tuple[Any, float]:
    """The one way a stage runs, in ``run`` (``pipeline``: its name; there a step may be
    skipped) and from the CLI: called, timed, logged. Returns (result, seconds)."""
    started = time.monotonic()
    reason = _skip_reason(step, config, options) if pipeline else None
    if reason:
        log.info("%s: skipped (%s)", step, reason)
        out = None
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
    name: str, lake: Lake, config: Config, options: dict[str, Any], resume: bool = False
) -> dict[str, Any]:
    """Run the steps of ``pipelines/<name>.yaml`` in order, recording each in ``ops/runs``;
    ``resume``: start at the step where the last run of ``name`` failed."""
    steps = pipeline_steps(name)
    run_id, resumed_from, done = uuid.uuid4().hex[:12], None, set()
    if resume:
        resumed_from, done = _resume_point(lake, name, steps)
    todo = [s for s in steps if s not in done]
    check_inputs(todo, lake, config, options, pipeline=name)
    results: dict[str, Any] = {"run_id": run_id, "seconds": {}}
    for position, step in enumerate(steps):
        if step in done:
            _record(lake, run_id, name, position, step, "skipped", None, 0.0, None, resumed_from)
            continue
        started, at = time.monotonic(), datetime.now(UTC)
        try:
            out, seconds = execute(step, lake, config, options, pipeline=name)
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
