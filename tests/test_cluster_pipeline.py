"""The `all` pipeline through spark-submit on a standalone cluster (master + 2 workers on
127.0.0.1), and featurize surviving the loss of one worker with the same tables."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from pyspark.sql.types import TimestampType

from patternlake.lake import Lake
from tests.cluster import REPO, spark_submit, submit_command
from tests.conftest import comparable


def _data_only(field) -> bool:
    """Not when-it-ran columns (timestamps, batch ids)."""
    return not isinstance(field.dataType, TimestampType) and "batch" not in field.name


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_all_pipeline_on_a_cluster_and_featurize_survives_a_killed_worker(
    spark, config, small_events, cluster, tmp_path
):
    url, env, procs = cluster
    events = str(small_events / "events")

    def common(name: str) -> list[str]:
        return [
            "--conf", "local",
            "--set", f"lake.root={tmp_path / name / 'lake'}",
            "--set", f"models.root={tmp_path / name / 'models'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / name}/mlruns.db",
            "--set", f"mlflow.artifact_location={tmp_path / name / 'artifacts'}",
        ]  # fmt: skip

    # 1. everything, one spark-submit: ingest ... Horovod x2 teacher ... students ... score
    small = [
        "--set", "train.epochs=2", "--set", "students.epochs=2",
        "--set", "compress.sparsity=[0.5]", "--set", "score.explain_events=3",
    ]  # fmt: skip
    out = spark_submit(url, env, "run_pipeline.py", "all", *common("a"), *small, "--input", events)
    assert "score" in out
    lake_a = Lake(spark, config.lake.model_copy(update={"root": str(tmp_path / "a" / "lake")}))
    runs = lake_a.read("runs").orderBy("position").collect()
    assert [r.step for r in runs] == [
        "ingest", "validate", "featurize", "segment", "mine", "train", "distill",
        "compress", "heads", "evaluate", "score",
    ]  # fmt: skip
    assert {r.status for r in runs} == {"succeeded"}
    assert lake_a.read("user_patterns").select("user_id").distinct().count() == 300

    # 2. the same events into a second lake; featurize on the cluster loses a worker mid-run
    for job in ("ingest.py", "validate.py"):
        spark_submit(url, env, job, *common("b"), *([events] if job == "ingest.py" else []))
    driver = subprocess.Popen(
        submit_command(url, "featurize.py", *common("b")),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    apps_before = {p.name for p in (tmp_path / "work1").glob("app-*")}
    deadline, killed_while_running = time.time() + 300, False
    while time.time() < deadline and driver.poll() is None:
        # featurize's executor on worker 1 (a new application folder) has started a task
        logs = [
            p for p in (tmp_path / "work1").glob("app-*/*/stderr")
            if p.parent.parent.name not in apps_before
        ]  # fmt: skip
        if any("Running task" in p.read_text(errors="replace") for p in logs):
            os.killpg(procs[2].pid, signal.SIGKILL)  # worker 1 and its executor
            killed_while_running = driver.poll() is None
            break
        time.sleep(0.2)
    stdout, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, stderr[-5000:]
    assert killed_while_running, "featurize ended before a worker could be killed"
    lake_b = Lake(spark, config.lake.model_copy(update={"root": str(tmp_path / "b" / "lake")}))
    for table in ("item_index", "user_sequences", "user_features"):
        a = comparable(lake_a.read(table), _data_only)
        b = comparable(lake_b.read(table), _data_only)
        assert a.count() == b.count() > 0, table
        assert a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0, table
    shutil.rmtree(tmp_path / "a" / "models", ignore_errors=True)
