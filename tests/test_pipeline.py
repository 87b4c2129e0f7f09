"""Stage declarations, input checks, run records with --resume, exports."""

from __future__ import annotations

import pytest
import yaml

from patternlake.pipeline import (
    STAGES,
    STEPS,
    dependencies,
    export_databricks,
    export_spark_submit,
    pipeline_steps,
)


def test_every_stage_is_declared_once_with_its_job_and_command():
    from pathlib import Path

    from patternlake.cli import build_parser

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    assert set(STEPS) == set(STAGES)
    parser = build_parser()
    for stage in STAGES.values():
        assert (jobs / f"{stage.job}.py").is_file(), stage
        assert f'main(["{stage.command[0]}"' in (jobs / f"{stage.job}.py").read_text()
        parser.parse_args([*stage.command, *(["x"] if stage.name == "ingest" else [])])
    for name in ("daily", "train", "all"):
        assert all(s in STAGES for s in pipeline_steps(name))


def test_pipelines_next_to_the_conf_dir_come_first_then_the_packaged_ones(tmp_path, monkeypatch):
    from patternlake.config import CONF_DIR_ENV
    from patternlake.errors import ConfigError

    monkeypatch.setenv(CONF_DIR_ENV, str(tmp_path / "conf"))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "daily.yaml").write_text("steps: [validate, featurize]\n")
    (tmp_path / "pipelines" / "nightly.yaml").write_text("steps: [mine]\n")
    assert pipeline_steps("daily") == ["validate", "featurize"]
    assert pipeline_steps("nightly") == ["mine"]
    assert pipeline_steps("train")[0] == "train_teacher"  # not there: the package's
    with pytest.raises(ConfigError, match=r"known: all, daily, nightly, train\)"):
        pipeline_steps("weekly")


def test_dependencies_follow_what_steps_read_and_write():
    deps = dependencies(pipeline_steps("all"))
    assert deps["ingest"] == [] and deps["validate"] == ["ingest"]
    assert set(deps["mine"]) == {"featurize", "segment"}
    assert "train_teacher" in deps["distill"] and "segment" in deps["distill"]
    assert "compress" in deps["score"] and "mine" in deps["score"]  # the newest champions
    assert deps["segment"] == ["featurize"]


def test_exports_name_every_step_in_order():
    steps = pipeline_steps("all")
    script = export_spark_submit("all", "cluster", "spark://h:7077")
    submits = [line for line in script.splitlines() if line.startswith("spark-submit")]
    assert [line.split()[3] for line in submits] == [f"jobs/{STAGES[s].job}.py" for s in steps]
    assert 'jobs/ingest.py --conf cluster "$INPUT"' in script
    bundle = yaml.safe_load(export_databricks("all", "databricks"))
    tasks = bundle["resources"]["jobs"]["patternlake_all"]["tasks"]
    assert [t["task_key"] for t in tasks] == steps
    by = {t["task_key"]: t for t in tasks}
    assert {d["task_key"] for d in by["distill"]["depends_on"]} == set(
        dependencies(steps)["distill"]
    )
    assert by["train_teacher"]["python_wheel_task"]["parameters"] == [
        "train",
        "--conf",
        "databricks",
    ]


def test_a_missing_input_is_refused_before_anything_runs(stage, capsys):
    from patternlake.cli import main

    config, lake = stage
    assert main(["--set", f"lake.root={config.lake.root}", "run", "daily"]) == 2
    err = capsys.readouterr().err
    assert "step validate reads bronze_events" in err and "--input" in err
    assert not lake.exists("runs")  # nothing ran, nothing recorded


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_resume_continues_from_the_failed_step(
    stage, small_events, capsys
):
    from patternlake.cli import main

    config, lake = stage
    root = [
        "--set",
        f"lake.root={config.lake.root}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{config.lake.root}/ml.db",
    ]
    bad = ["--set", "segment.k=5000"]  # more segments than users: segment fails
    assert main([*root, *bad, "run", "daily", "--input", str(small_events / "events")]) == 2
    runs = lake.read("runs").orderBy("position").collect()
    assert [(r.step, r.status) for r in runs] == [
        ("ingest", "succeeded"), ("validate", "succeeded"), ("featurize", "succeeded"),
        ("segment", "failed"),
    ]  # fmt: skip
    assert "segment.k=5000" in runs[-1].error
    silver_version = lake.version("silver_events")

    assert main([*root, "run", "daily", "--resume"]) == 0
    resumed = [
        r for r in lake.read("runs").orderBy("position").collect() if r.run_id != runs[0].run_id
    ]
    assert {r.resumed_from for r in resumed} == {runs[0].run_id}
    assert [(r.step, r.status) for r in resumed] == [
        ("ingest", "skipped"), ("validate", "skipped"), ("featurize", "skipped"),
        ("segment", "succeeded"), ("mine", "succeeded"), ("score", "succeeded"),
    ]  # fmt: skip
    assert lake.version("silver_events") == silver_version  # done steps did not run again
    assert lake.exists("segment_patterns")
    capsys.readouterr()
    assert main([*root, "run", "daily", "--resume"]) == 2  # the last run succeeded
    assert "nothing to resume" in capsys.readouterr().err
