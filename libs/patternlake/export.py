"""``patternlake export``: a pipeline as one ``spark-submit`` per step, or as a Databricks
Asset Bundle job (one wheel task per step, dependencies from what each step reads and
writes; the cluster side from ``conf/templates/databricks_job.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from patternlake.config import default_conf_dir, packaged_dir
from patternlake.pipeline import STAGES, pipeline_steps

DATABRICKS_TEMPLATE = Path("templates") / "databricks_job.yaml"


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


def databricks_template() -> dict[str, Any]:
    """The cluster side of the bundle: ``conf/templates/databricks_job.yaml`` of the conf dir
    in use, else the one that comes with the code."""
    for conf in (default_conf_dir(), packaged_dir("conf")):
        path = conf / DATABRICKS_TEMPLATE
        if path.is_file():
            return yaml.safe_load(path.read_text())
    raise FileNotFoundError(DATABRICKS_TEMPLATE)


def export_databricks(name: str, env: str) -> str:
    """A Databricks Asset Bundle resource file with one job for pipeline ``name``: a Python
    wheel task per step (the package's ``patternlake`` entry point), dependencies from what
    each step reads and writes."""
    steps = pipeline_steps(name)
    deps = dependencies(steps)
    template = databricks_template()
    cluster = template["job_cluster"]
    tasks = []
    for step in steps:
        params = [*STAGES[step].command, "--conf", env]
        if step == "ingest":
            params.append("{{job.parameters.input}}")
        task: dict[str, Any] = {"task_key": step}
        if deps[step]:
            task["depends_on"] = [{"task_key": d} for d in deps[step]]
        task |= {
            "job_cluster_key": cluster["job_cluster_key"],
            "python_wheel_task": {
                "package_name": "patternlake",
                "entry_point": "patternlake",
                "parameters": params,
            },
            "libraries": [dict(lib) for lib in template["libraries"]],
        }
        tasks.append(task)
    job: dict[str, Any] = {"name": f"patternlake-{name}", "tasks": tasks, "job_clusters": [cluster]}
    if "ingest" in steps:
        job["parameters"] = [{"name": "input", "default": template["input_default"]}]
    bundle = {
        "variables": template["variables"],
        "resources": {"jobs": {f"patternlake_{name}": job}},
    }
    header = (
        f"# patternlake pipeline {name} as a Databricks Asset Bundle job "
        "(patternlake export databricks); include it from databricks.yml\n"
    )
    return header + yaml.safe_dump(bundle, sort_keys=False)
