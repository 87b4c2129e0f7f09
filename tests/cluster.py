"""A real Spark standalone cluster on 127.0.0.1 for tests: a master and two one-core workers
started with the ``bin/spark-class`` the pip package ships, and ``spark_submit`` to it."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest

SPARK_HOME = Path(pyspark.__file__).parent
REPO = Path(__file__).parents[1]


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
    yield url, env, procs
    for p in reversed(procs):
        if p.poll() is None:  # a test may have killed one already
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
    for p in procs:
        p.wait(timeout=30)


def submit_command(url: str, job: str, *args: str) -> list[str]:
    """spark-submit as a user runs it: the Delta Lake jars (``--jars`` with the ones
    ``make setup`` fetched, as ``--packages io.delta:...`` would bring them) and Delta's SQL
    extension and catalog."""
    from patternlake.spark import DELTA_SQL, _delta_jars

    delta = ["--jars", ",".join(_delta_jars())]
    for key, value in DELTA_SQL.items():
        delta += ["--conf", f"{key}={value}"]
    return [
        str(SPARK_HOME / "bin" / "spark-submit"),
        "--master",
        url,
        "--deploy-mode",
        "client",
        *delta,
        "--conf",
        f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
        "--conf",
        "spark.executor.memory=1g",
        "--conf",
        "spark.ui.enabled=false",
        str(REPO / "jobs" / job),
        *args,
    ]


def spark_submit(url: str, env: dict, job: str, *args: str) -> str:
    cmd = submit_command(url, job, *args)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, f"{job} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout
