"""Where the one training function (``models.fit.train_worker``) runs: ``train.backend``
single (this process), horovod (``horovod.spark.run``: one Spark task per process),
horovodrun (local processes) or ddp (``TorchDistributor`` on Spark barrier tasks). The
teacher's training (``training``) and the shared student's distillation (``students``) both
run through here, so the student trains with the teacher's backends."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pyspark.sql import SparkSession

from patternlake.errors import PatternlakeError
from patternlake.models.fit import train_worker
from patternlake.models.teacher import SequentialTeacher, TeacherConfig
from patternlake.models.train_spec import TrainSpec

log = logging.getLogger(__name__)


def run_backend(
    spark: SparkSession, spec: TrainSpec, backend: str, num_proc: int
) -> dict[str, Any]:
    payload = asdict(spec)
    if backend == "single":
        return train_worker(payload)
    if backend == "horovod":
        import horovod.spark

        # one Spark task per process, started with mapPartitionsWithIndex (not barrier mode,
        # so not gang-scheduled): with fewer free task slots than num_proc, the tasks that got
        # one hold it and wait up to start_timeout for the rest; then Horovod cancels the
        # Spark job and raises a timeout error
        results = horovod.spark.run(
            train_worker,
            args=(payload,),
            num_proc=num_proc,
            use_gloo=True,
            start_timeout=600,
            verbose=1,
        )
        return next(r for r in results if r is not None)
    if backend == "ddp":
        from pyspark.ml.torch.distributor import TorchDistributor

        local = spark.sparkContext.master.startswith("local")
        distributor = TorchDistributor(
            num_processes=num_proc, local_mode=local, use_gpu=tasks_have_gpu(spark)
        )
        return distributor.run(train_worker, payload)
    if backend == "horovodrun":
        with tempfile.TemporaryDirectory(prefix="pl-hvd-") as tmp:
            payload["result_path"] = str(Path(tmp) / "result.json")
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(payload))
            horovodrun = Path(sys.executable).parent / "horovodrun"
            cmd = [
                str(horovodrun),
                "-np",
                str(num_proc),
                "--gloo",
                "-H",
                f"localhost:{num_proc}",
                sys.executable,
                "-m",
                "patternlake.models.fit",
                str(spec_path),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"horovodrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
                )
            return json.loads(Path(payload["result_path"]).read_text())
    raise PatternlakeError(f"train.backend: unknown backend {backend!r}")


def tasks_have_gpu(spark: Any) -> bool:
    """Whether the training processes get a GPU, decided by where they run, not by the
    driver (a driver without a GPU may drive GPU executors): on a cluster, Spark's task GPU
    resource (``spark.task.resource.gpu.amount`` >= 1, conf/cluster.yaml), which is also
    what places one process per GPU; in local mode, this machine."""
    amount = spark.conf.get("spark.task.resource.gpu.amount", None)
    if amount is not None:
        return float(amount) >= 1  # one whole GPU per process (TorchDistributor's rule)
    if spark.sparkContext.master.startswith("local"):
        return torch.cuda.is_available()
    log.warning(
        "train: spark.task.resource.gpu.amount is not set, so the training tasks get no GPU "
        "and train on the CPU (conf/cluster.yaml shows the GPU settings)"
    )
    return False


def load_best(result: dict[str, Any]) -> SequentialTeacher:
    saved = torch.load(result["best_path"], map_location="cpu", weights_only=False)
    model = SequentialTeacher(TeacherConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    return model.eval()
