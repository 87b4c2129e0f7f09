"""The registry tells "absent" from "broken" (issue 32): a missing tracking store is refused
by the stages that only read it (and not created), a locked or unreachable one stops the
command with one line naming the tracking URI and the operation; only "does not exist"
reads as "no teacher yet"."""

from __future__ import annotations

import socket
import sqlite3

import pytest

from patternlake import registry
from patternlake.errors import RegistryError
from tests.conftest import with_overrides


def _at(config, uri: str, tmp_path):
    cfg = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(tmp_path / "lake")})}
    )
    return with_overrides(
        cfg, mlflow={"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")}
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("patternlake: error:")]


@pytest.mark.parametrize("form", ["sqlite", "file", "path"])
def test_a_missing_store_is_refused_by_readers_and_not_created(config, tmp_path, form):
    from patternlake.scoring.stage import without_teacher

    where = tmp_path / "typo"
    uri = {"sqlite": f"sqlite:///{where}.db", "file": where.as_uri(), "path": str(where)}[form]
    cfg = _at(config, uri, tmp_path)
    assert not registry.registry_exists(cfg)
    for read in (
        registry.teacher_version,
        registry.teacher_file,
        lambda c: registry.champion_version(c, 0),
        registry.student_versions,
        lambda c: registry.segment_students(c, [0]),
    ):
        with pytest.raises(RegistryError, match=uri.replace("\\", "\\\\")):
            read(cfg)
    # run daily's skip check: no store yet means no teacher, not a failure
    assert "no registered teacher yet" in without_teacher(cfg, {})
    assert not where.exists() and not (tmp_path / "typo.db").exists()


def test_read_only_commands_refuse_a_missing_store(spark, config, tmp_path, capsys):
    from patternlake.cli import main
    from patternlake.evaluation.evaluate import evaluate_models
    from patternlake.lake import Lake
    from patternlake.monitoring.monitor import _teacher
    from patternlake.scoring.score import score_users
    from patternlake.students.compress import compress
    from patternlake.students.distill import distill
    from patternlake.students.heads import heads

    uri = f"sqlite:///{tmp_path}/typo.db"
    cfg = _at(config, uri, tmp_path)
    lake = Lake(spark, cfg.lake)
    argv = ["--set", f"lake.root={tmp_path / 'lake'}", "--set", f"mlflow.tracking_uri={uri}"]
    capsys.readouterr()
    assert main([*argv, "models"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("patternlake: error: models: no MLflow tracking store at " + uri)
    for name, stage in (
        ("score", lambda: score_users(spark, lake, cfg)),
        ("distill", lambda: distill(spark, lake, cfg)),
        ("compress", lambda: compress(spark, lake, cfg)),
        ("heads", lambda: heads(spark, lake, cfg)),
        ("evaluate", lambda: evaluate_models(spark, lake, cfg)),
        ("monitor", lambda: _teacher(cfg)),
    ):
        with pytest.raises(RegistryError, match=f"^{name}: no MLflow tracking store at {uri}"):
            stage()
    assert not (tmp_path / "typo.db").exists()


@pytest.fixture
def store(config, tmp_path):
    """An existing, empty SQLite tracking store: (config, uri)."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = _at(config, uri, tmp_path)
    registry.use_experiment(cfg)
    assert registry.teacher_version(cfg) is None  # empty: absent, not broken
    assert registry.champion_version(cfg, 0) is None
    assert registry.student_versions(cfg) == []
    registry.set_champion(cfg, 0, None)
    return cfg, uri


def test_a_locked_store_is_an_error_not_an_empty_registry(spark, store, tmp_path, capsys):
    from patternlake.cli import main

    cfg, uri = store
    lock = sqlite3.connect(f"{tmp_path}/mlruns.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # MLflow waits 20 s for it, then fails
        capsys.readouterr()
        argv = ["--set", f"lake.root={tmp_path / 'lake'}", "--set", f"mlflow.tracking_uri={uri}"]
        assert main([*argv, "report", "--out", str(tmp_path / "r.html")]) == 2
        err = capsys.readouterr().err
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    (line,) = _error_lines(err)
    assert f"looking up teacher@candidate failed at tracking URI {uri}" in line
    assert "database is locked" in line and "Traceback" not in err


def test_an_unreachable_store_is_an_error(spark, config, tmp_path, capsys, monkeypatch):
    from patternlake.cli import main
    from patternlake.pipeline import execute

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = _at(config, uri, tmp_path)
    # run daily's skip check used to read this as "no registered teacher yet"
    with pytest.raises(RegistryError, match=f"teacher@candidate failed at tracking URI {uri}"):
        execute("score", None, cfg, {}, pipeline="daily")
    with pytest.raises(RegistryError, match=f"student@champion-0 failed at tracking URI {uri}"):
        registry.champion_version(cfg, 0)
    capsys.readouterr()
    argv = ["--set", f"lake.root={tmp_path / 'lake'}", "--set", f"mlflow.tracking_uri={uri}"]
    assert main([*argv, "report", "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert f"looking up teacher@candidate failed at tracking URI {uri}" in line
    assert "Traceback" not in err
