"""A real Spark standalone cluster on 127.0.0.1: a master, two workers, and the jobs sent
to it with spark-submit (featurize, then Horovod teacher training: `horovod.spark.run`,
one Spark task per process, started with mapPartitionsWithIndex)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest

from patternlake.ingest.bronze import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending

SPARK_HOME = Path(pyspark.__file__).parent
REPO = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture
def cluster(tmp_path):
    env = {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_WORKER_DIR": str(tmp_path / "work"),
        "SPARK_LOG_DIR": str(tmp_path / "logs"),
    }
    port = free_port()
    url = f"spark://127.0.0.1:{port}"
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    procs = [
        subprocess.Popen(
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--webui-port",
                str(free_port()),
            ],
            env=env,
            stdout=open(tmp_path / "master.log", "w"),  # noqa: SIM115  (closed with the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]

    def master_up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(master_up, 60, "spark master")
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    url,
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "1",
                    "--memory",
                    "1500m",
                    "--webui-port",
                    str(free_port()),
                    "--work-dir",
                    str(tmp_path / f"work{i}"),
                ],
                env=env,
                stdout=open(tmp_path / f"worker{i}.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    wait_for(
        lambda: (
            sum(
                "Successfully registered with master" in (tmp_path / f"worker{i}.log").read_text()
                for i in range(2)
            )
            == 2
        ),
        90,
        "two workers",
    )
    yield url, env
    for p in reversed(procs):
        os.killpg(p.pid, 15)
    for p in procs:
        p.wait(timeout=30)


def spark_submit(url: str, env: dict, job: str, *args: str) -> str:
    cmd = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        "--master",
        url,
        "--deploy-mode",
        "client",
        "--conf",
        f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
        "--conf",
        "spark.executor.memory=1g",
        "--conf",
        "spark.ui.enabled=false",
        str(REPO / "jobs" / job),
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, f"{job} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.mark.slow
def test_featurize_and_horovod_training_through_spark_submit_on_a_standalone_cluster(
    spark, config, small_events, cluster, tmp_path
):
    url, env = cluster
    cfg = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(tmp_path / "lake")})}
    )
    lake = Lake(spark, cfg.lake)
    ingest(spark, lake, cfg, str(small_events / "events"))
    validate_pending(spark, lake, cfg)

    common = [
        "--conf",
        "local",
        "--set",
        f"lake.root={tmp_path / 'lake'}",
        "--set",
        f"models.root={tmp_path / 'models'}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        "--set",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
    ]
    out = spark_submit(url, env, "featurize.py", *common)
    assert json.loads(out.strip().splitlines()[-1])["users_updated"] == 300
    assert lake.read("user_sequences").count() == 300

    out = spark_submit(
        url,
        env,
        "train_teacher.py",
        *common,
        "--backend",
        "horovod",
        "--set",
        "train.num_proc=2",
        "--set",
        "train.epochs=3",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["world"] == 2 and result["backend"] == "horovod"
    assert len(result["history"]) == 3 and result["best_valid_ndcg@10"] > 0
    assert Path(result["best_path"]).is_file()
    # both Horovod ranks ran as tasks on the cluster's executors, not in the driver
    executors = list((tmp_path).glob("work*/app-*/*/stderr"))
    assert len(executors) >= 2
