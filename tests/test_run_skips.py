"""`run` says at the end which steps were skipped and why; `run --strict` turns a skip into
a failure (exit 2 naming the step and the reason), recorded in ops/runs (issue 32)."""

from __future__ import annotations

import json

import pytest

from patternlake import pipeline
from patternlake.errors import SkippedStepError
from tests.conftest import with_overrides

EVENTS = (
    "event_id,user_id,item_id,event_type,event_time\n"
    "e1,u1,i1,view,2026-03-01T10:00:00Z\n"
    "e2,u1,i2,buy,2026-03-01T11:00:00Z\n"
    "e3,u2,i1,view,2026-03-02T09:30:00Z\n"
)


def test_score_without_a_teacher_is_skipped_with_its_reason_or_fails_when_strict(config, tmp_path):
    cfg = with_overrides(config, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/none.db"})
    out, _ = pipeline.execute("score", None, cfg, {}, pipeline="daily")
    assert isinstance(out, pipeline.Skipped) and "no registered teacher yet" in out.reason
    with pytest.raises(SkippedStepError, match=r"run daily --strict: step score .*no registered"):
        pipeline.execute("score", None, cfg, {}, pipeline="daily", strict=True)
    assert not (tmp_path / "none.db").exists()


def test_run_lists_the_skipped_steps_and_strict_fails_on_one(
    spark, stage, tmp_path, capsys, monkeypatch
):
    from patternlake.cli import main

    config, lake = stage
    # a short pipeline: ingest (skipped without --input) then validate
    monkeypatch.setattr(pipeline, "pipeline_steps", lambda name: ["ingest", "validate"])
    events = tmp_path / "events.csv"
    events.write_text(EVENTS)
    root = ["--set", f"lake.root={config.lake.root}"]
    assert main([*root, "run", "daily", "--input", str(events)]) == 0
    assert "run daily: every step ran" in capsys.readouterr().out

    assert main([*root, "run", "daily"]) == 0
    out = capsys.readouterr().out
    assert "run daily: 1 step(s) skipped" in out
    assert "  ingest: skipped, no --input" in out.splitlines()
    assert main([*root, "run", "daily", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == {"ingest": "no --input"} and result["ingest"] is None

    assert main([*root, "run", "daily", "--strict"]) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("patternlake: error:")]
    assert (
        line == "patternlake: error: run daily --strict: step ingest would be skipped: no --input"
    )
    last = max(lake.read("runs").collect(), key=lambda r: r.finished_at)
    assert (last.step, last.status) == ("ingest", "failed") and "no --input" in last.error
