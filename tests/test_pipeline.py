"""Stage declarations, input checks, run records with --resume, exports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from patternlake.export import dependencies, export_databricks, export_spark_submit
from patternlake.pipeline import STAGES, STEPS, pipeline_steps
from patternlake.stages import resolve

JOBS = Path(__file__).resolve().parents[1] / "jobs"
NOT_STAGES = {"generate", "run_pipeline", "report", "monitor", "forget_user"}  # jobs/ too


def _job_words(path: Path) -> list[str]:
    """The CLI words ``jobs/<x>.py`` passes: ``main(["tune", "teacher", *sys.argv[1:]])``."""
    (call,) = [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"
    ]
    (argv,) = call.args
    *words, rest = argv.elts
    assert isinstance(rest, ast.Starred) and ast.unparse(rest) == "*sys.argv[1:]", path
    return [w.value for w in words]


def test_every_stage_is_declared_once_and_its_job_cli_and_help_come_from_it(capsys):
    from patternlake.cli import SHOW, build_parser, cmd_stage, main
    from patternlake.config import Config

    sections = {f.alias or n for n, f in Config.model_fields.items()}
    assert set(STEPS) == set(STAGES)
    parser = build_parser()
    for name, stage in STAGES.items():
        assert stage.name == name == stage.job == "_".join(stage.command)
        assert _job_words(JOBS / f"{name}.py") == list(stage.command), stage
        positionals = [o.flag for o in stage.options if not o.flag.startswith("-")]
        args = parser.parse_args([*stage.command, *positionals])
        assert (args.func, args.stage) == (cmd_stage, name)
        with pytest.raises(SystemExit) as code:
            main([*stage.command, "--help"])
        assert code.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())
        assert f"usage: patternlake {' '.join(stage.command)} " in shown
        assert " ".join(stage.help.split()) in shown
        assert f"conf section: {stage.section} " in shown and stage.section in sections
        for option in stage.options:
            assert option.flag in shown
        # the call takes what the declaration gives it, in that order
        keys = {"spark", "lake", "config", *(o.key for o in stage.options)}
        assert set(stage.args) <= keys, stage
        inspect.signature(resolve(stage.call)).bind(*stage.args)
        assert stage.show in SHOW
        assert set(stage.optional) <= set(stage.inputs)
    # every other job runs a command that is not a stage; no job under an old stage name
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for path in JOBS.glob("*.py"):
        assert path.stem in STAGES or path.stem in NOT_STAGES, path
        assert _job_words(path)[0] in commands, path


def test_run_steps_are_the_declared_stages(tmp_path):
    from patternlake.cli import build_parser
    from patternlake.errors import ConfigError

    assert list(STEPS) == list(STAGES)
    for name in ("daily", "train", "all"):
        assert all(s in STAGES for s in pipeline_steps(name))
    # `all` is every stage in declaration order but the optional ones: the architecture
    # search and item_stats (a table for BI that no stage reads)
    optional = {"tune_teacher", "item_stats"}
    assert pipeline_steps("all") == [s for s in STAGES if s not in optional]
    with pytest.raises(ConfigError, match=rf"known: {', '.join(STAGES)}\)"):
        pipeline_steps("bad", _pipelines(tmp_path, bad=["segment", "mine_patterns"]))
    # what `run` passes its steps: the keys of the stages' own options
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    run = {a.dest for a in commands["run"]._actions} - {"help", "conf", "overrides", "verbose"}
    keys = {o.key for s in STAGES.values() for o in s.options}
    assert run - {"pipeline", "json", "resume", "strict"} <= keys


def test_an_old_step_name_in_a_pipeline_file_works_with_a_warning(tmp_path, caplog):
    directory = _pipelines(tmp_path, models=["train_teacher", "distill"])
    assert pipeline_steps("models", directory) == ["train", "distill"]
    assert "step train_teacher is called train now" in caplog.text


def _pipelines(directory: Path, **pipelines: list[str]) -> Path:
    for name, steps in pipelines.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"steps": steps}))
    return directory


def test_pipelines_next_to_the_conf_dir_come_first_then_the_packaged_ones(tmp_path, monkeypatch):
    from patternlake.config import CONF_DIR_ENV
    from patternlake.errors import ConfigError

    monkeypatch.setenv(CONF_DIR_ENV, str(tmp_path / "conf"))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "daily.yaml").write_text("steps: [validate, featurize]\n")
    (tmp_path / "pipelines" / "nightly.yaml").write_text("steps: [mine]\n")
    assert pipeline_steps("daily") == ["validate", "featurize"]
    assert pipeline_steps("nightly") == ["mine"]
    assert pipeline_steps("train")[0] == "train"  # not there: the package's
    with pytest.raises(ConfigError, match=r"known: all, daily, nightly, train\)"):
        pipeline_steps("weekly")


def test_dependencies_follow_what_steps_read_and_write():
    deps = dependencies(pipeline_steps("all"))
    assert deps["ingest"] == [] and deps["validate"] == ["ingest"]
    assert set(deps["mine"]) == {"featurize", "segment"}
    assert "train" in deps["distill"] and "segment" in deps["distill"]
    # the newest champions: heads moves them last
    assert "heads" in deps["score"] and "mine" in deps["score"]
    assert "compress" in deps["heads"] and "distill" in deps["compress"]
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
    assert by["train"]["python_wheel_task"]["parameters"] == [
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


def test_a_stage_run_on_its_own_before_its_input_exists_says_what_to_run_first(stage, capsys):
    from patternlake.cli import main

    config, lake = stage
    root = ["--set", f"lake.root={config.lake.root}"]
    for argv, text in [
        (["validate"], "validate: bronze_events does not exist yet; run `patternlake ingest PATH` first"),
        (["segment"], "segment: user_features does not exist yet; run `patternlake featurize` first"),
        (["tune", "teacher"], "tune teacher: user_sequences does not exist yet; run `patternlake featurize` first"),
        (["score"], "score: user_sequences does not exist yet; run `patternlake featurize` first"),
    ]:  # fmt: skip
        assert main([*root, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"patternlake: error: {text}", err
    assert not any(lake.exists(t) for t in config.lake.tables)  # nothing ran


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


def touch_tables(lake, tables: str) -> list[bool]:
    """A stage body for the scope test: asks whether each of ``tables`` (comma-separated)
    exists, as any stage reading them would first."""
    return [lake.exists(t) for t in tables.split(",")]


def test_a_stage_that_touches_a_table_it_does_not_declare_fails(stage):
    from patternlake.errors import UndeclaredTableError
    from patternlake.stages import Option, Stage

    config, lake = stage

    def declared(inputs: tuple[str, ...], outputs: tuple[str, ...] = ()) -> Stage:
        return Stage(
            "probe",
            "tests.test_pipeline:touch_tables",
            ("lake", "tables"),
            inputs=inputs,
            outputs=outputs,
            section="score",
            help="probe",
            options=(Option("--tables"),),
        )

    # what it declares, inputs and outputs, it may touch
    probe = declared(("user_sequences",), ("user_patterns",))
    assert probe.run(lake, config, {"tables": "user_sequences,user_patterns"}) == [False, False]
    # item_index is in the lake's catalogue but not in the declaration: refused, named
    with pytest.raises(UndeclaredTableError, match=r"stage probe used table item_index"):
        probe.run(lake, config, {"tables": "user_sequences,item_index"})
    assert declared(("user_sequences", "item_index")).run(
        lake, config, {"tables": "item_index"}
    ) == [False]
    # the lake the runner holds is not narrowed by the stage's view of it
    assert lake.exists("item_index") is False


def test_every_stage_declares_only_tables_the_lake_knows(config):
    for stage in STAGES.values():
        assert stage.tables <= set(config.lake.tables), stage.name
        assert set(stage.optional) <= set(stage.inputs), stage.name
