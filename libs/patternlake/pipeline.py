"""Pipelines: named, ordered lists of job steps (``pipelines/<name>.yaml``) run in one session."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from patternlake.config import Config, default_conf_dir
from patternlake.errors import ConfigError
from patternlake.lake import Lake

log = logging.getLogger(__name__)
REPO_PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


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


STEPS: dict[str, Callable[[Lake, Config, dict[str, Any]], Any]] = {
    "ingest": _ingest,
    "validate": _validate,
    "featurize": _featurize,
    "segment": _segment,
    "mine": _mine,
    "tune_teacher": _tune_teacher,
    "train_teacher": _train_teacher,
    "distill": _distill,
    "compress": _compress,
    "score": _score,
    "evaluate": _evaluate,
}


def pipeline_steps(name: str, directory: Path | None = None) -> list[str]:
    candidates = (
        [directory] if directory else [default_conf_dir().parent / "pipelines", REPO_PIPELINES]
    )
    directory = next((d for d in candidates if (d / f"{name}.yaml").is_file()), candidates[0])
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ConfigError(f"run: no pipeline {name!r} (known: {', '.join(known) or 'none'})")
    spec = yaml.safe_load(path.read_text()) or {}
    steps = spec.get("steps") or []
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ConfigError(
            f"{path}: steps {unknown or '(none)'} are not jobs (known: {', '.join(STEPS)})"
        )
    return steps


def run_pipeline(name: str, lake: Lake, config: Config, options: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for step in pipeline_steps(name):
        started = time.monotonic()
        # in a pipeline, scoring before any model exists is skipped (the first daily run)
        out = STEPS[step](lake, config, {**options, "step_optional": True})
        results[step] = _plain(out)
        log.info("run %s: step %s done (%.1fs)", name, step, time.monotonic() - started)
    return results


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
