"""train_teacher: ``user_sequences`` (a pinned Delta version) -> the teacher model.

Picks the backend from ``train.backend``, runs the one training function everywhere
(``train.members`` times, from consecutive seeds, for an ensemble teacher), then logs the
run to MLflow (params, per-epoch metrics, the Delta version trained on, the model with its
signature) and registers it as ``teacher`` with alias ``candidate``.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.backends import load_best, run_backend
from patternlake.models.fit import validate_ndcg, validation_set
from patternlake.models.teacher import (
    Teacher,
    TeacherEnsemble,
    TeacherScorer,
    teacher_bytes,
)
from patternlake.models.train_spec import TrainSpec, build_spec, lr_scale
from patternlake.progress import enabled as progress_enabled
from patternlake.progress import progress
from patternlake.registry import TEACHER, TEACHER_ALIAS, use_experiment

log = logging.getLogger(__name__)


def _with_epoch_bar(spec: TrainSpec, backend: str, run: Callable[[], dict[str, Any]]) -> Any:
    """``run()``; on a terminal, with a bar of the epochs that the training processes have
    checkpointed: they train outside this process (Horovod, DDP), where no bar of theirs
    reaches the terminal. The single backend draws its own."""
    if backend == "single" or not spec.checkpoint_dir or not progress_enabled():
        return run()
    import threading

    done = threading.Event()

    def follow() -> None:
        folder = Path(spec.checkpoint_dir)
        with progress(desc="teacher", total=spec.epochs, unit="epoch") as bar:
            while not done.wait(2.0):
                bar.update(max(0, _checkpointed_epochs(folder) - bar.n))

    follower = threading.Thread(target=follow, name="teacher-epochs", daemon=True)
    follower.start()
    try:
        return run()
    finally:
        done.set()
        follower.join()


def _checkpointed_epochs(folder: Path) -> int:
    """Epochs done, by the newest ``epoch-NNNN.pt`` that training saved in ``folder``."""
    found = sorted(folder.glob("epoch-*.pt")) if folder.is_dir() else []
    try:
        return int(found[-1].stem.split("-")[1]) + 1 if found else 0
    except ValueError:
        return 0


def train_members(
    spec: TrainSpec, members: int, run: Callable[[TrainSpec], dict[str, Any]]
) -> tuple[Teacher, dict[str, Any]]:
    """``members`` trainings of ``spec`` (seeds ``seed``, ``seed + 1``, ...; each with its own
    checkpoint folder, so each resumes on its own), each stopped on its best validation
    epoch; one member is the teacher itself, more make a ``TeacherEnsemble`` whose
    validation NDCG@10 (all validation targets) is the result's ``best_valid_ndcg@10``.
    The result is the first member's (history, speed, backend) plus ``members``."""
    results = []
    for k in range(members):
        member = replace(
            spec,
            seed=spec.seed + k,
            checkpoint_dir=(
                str(Path(spec.checkpoint_dir) / f"member-{k}")
                if members > 1 and spec.checkpoint_dir
                else spec.checkpoint_dir
            ),
        )
        result = run(member)
        if result.get("diverged") or not math.isfinite(result["best_valid_ndcg@10"]):
            raise PatternlakeError(
                f"train: the teacher did not train: {result.get('diverged')}; nothing was "
                f"registered (checkpoints of the epochs before are in {member.checkpoint_dir}; "
                "rerun with --fresh to start over)"
            )
        if result["best_epoch"] < 0:
            raise PatternlakeError("train: no epoch finished, so there is no model to register")
        results.append(result)
        if members > 1:
            log.info(
                "train teacher: member %d/%d (seed %d): best validation NDCG@10 %.4f at epoch %d",
                k + 1,
                members,
                member.seed,
                result["best_valid_ndcg@10"],
                result["best_epoch"],
            )
    result = dict(results[0])
    result["members"] = [
        {
            "seed": spec.seed + k,
            "best_epoch": r["best_epoch"],
            "best_valid_ndcg@10": r["best_valid_ndcg@10"],
            "epochs": len(r["history"]),
            "train_s": round(sum(h["seconds"] for h in r["history"]), 1),
            "best_path": r["best_path"],
        }
        for k, r in enumerate(results)
    ]
    if members == 1:
        return load_best(results[0]), result
    model = TeacherEnsemble([load_best(r) for r in results]).eval()
    cfg = model.config
    result["best_valid_ndcg@10"] = validate_ndcg(
        model, validation_set(spec, cfg), cfg, torch.device("cpu")
    )
    result["params"] = model.num_params()
    result["samples_per_s"] = round(
        sum(r["samples_per_s"] for r in results) / len(results), 1
    )  # of one member's training (the members train one after the other)
    return model, result


def train_teacher(
    spark: SparkSession, lake: Lake, config: Config, backend: str | None = None, fresh: bool = False
) -> dict[str, Any]:
    started = time.monotonic()
    backend = backend or config.train.backend
    num_proc = 1 if backend == "single" else config.train.num_proc
    spec = build_spec(lake, config, backend)
    if fresh:
        shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
    log.info(
        "train teacher: backend=%s processes=%d x batch %d (global %d), lr %g x %.4g "
        "(lr_scaling %s) data=user_sequences@v%d items=%d checkpoints=%s",
        backend,
        num_proc,
        spec.batch_size,
        spec.batch_size * num_proc,
        spec.lr,
        lr_scale(spec.lr_scaling, num_proc),
        spec.lr_scaling,
        spec.data_version,
        spec.model["n_items"],
        spec.checkpoint_dir,
    )
    model, result = train_members(
        spec,
        config.train.members,
        lambda member: _with_epoch_bar(
            member, backend, lambda: run_backend(spark, member, backend, num_proc)
        ),
    )
    run_id, version = log_to_mlflow(config, spec, result, model, backend)
    result.update(
        {
            "mlflow_run_id": run_id,
            "registered_version": version,
            "data_version": spec.data_version,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    log.info(
        "train teacher: best validation NDCG@10 %.4f at epoch %d, %d params, registered %s v%s (%.1fs)",
        result["best_valid_ndcg@10"],
        result["best_epoch"],
        result["params"],
        TEACHER,
        version,
        time.monotonic() - started,
    )
    return result


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _register_teacher(client: Any, model_id: str, run_id: str) -> str:
    """A new version of ``teacher`` from the logged model ``model_id`` of run ``run_id``, as
    ``log_model(registered_model_name=...)`` registers it, without the two lines MLflow's
    fluent registration prints ("Successfully registered model", "Created version")."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(TEACHER)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    mv = client.create_model_version(
        TEACHER, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )
    return str(mv.version)


def log_to_mlflow(
    config: Config, spec: TrainSpec, result: dict[str, Any], model: Teacher, backend: str
) -> tuple[str, str]:
    import mlflow
    from mlflow.models import infer_signature

    use_experiment(config)
    with mlflow.start_run(run_name=f"teacher-{backend}") as run:
        mlflow.log_params({f"model.{k}": v for k, v in spec.model.items()})
        mlflow.log_params(
            {
                "backend": backend,
                "world_size": result["world"],
                "epochs": spec.epochs,
                "batch_size": spec.batch_size,  # per process
                "global_batch_size": spec.batch_size * result["world"],
                "lr": spec.lr,
                "lr_scaling": spec.lr_scaling,
                "lr_scaled": spec.lr * lr_scale(spec.lr_scaling, result["world"]),
                "warmup_steps": spec.warmup_steps,
                "seed": spec.seed,
                "members": len(result.get("members", [])) or 1,
                "params": result["params"],
            }
        )
        mlflow.set_tags(
            {
                "data.table": "user_sequences",
                "data.version": spec.data_version,
                "data.item_index.version": spec.item_index_version,
                "patternlake.role": "teacher",
                "device": result["device"],
            }
        )
        for h in result["history"]:
            mlflow.log_metrics(
                {
                    "train_loss": h["loss"],
                    "valid_ndcg_at_10": h["valid_ndcg@10"],
                    "epoch_seconds": h["seconds"],
                },
                step=h["epoch"],
            )
        mlflow.log_metrics(
            {
                "best_valid_ndcg_at_10": result["best_valid_ndcg@10"],
                "samples_per_s": result["samples_per_s"],
                **{
                    f"member_{k}_best_valid_ndcg_at_10": m["best_valid_ndcg@10"]
                    for k, m in enumerate(result.get("members", []))
                    if len(result["members"]) > 1
                },
            }
        )
        # the weights without pickle, for the stages that load the teacher (distill, compress,
        # score)
        with tempfile.TemporaryDirectory(prefix="pl-teacher-") as tmp:
            weights = Path(tmp) / "teacher.safetensors"
            weights.write_bytes(teacher_bytes(model))
            mlflow.log_artifact(str(weights), artifact_path="weights")
        scorer = TeacherScorer(model).eval()
        example = np.zeros((2, 3, spec.model["max_len"]), dtype=np.int64)
        example[:, 0, -1] = 1
        with torch.no_grad():
            out = scorer(torch.from_numpy(example)).numpy()
        # pickle on purpose: the logged model is for evaluate and for people (mlflow.pytorch
        # .load_model); the stages load the safetensors weights above. MLflow warns about
        # pickle at every save: that one message is dropped, its other warnings stay.
        pytorch_log = logging.getLogger("mlflow.pytorch")
        pickle_notice = _DropMessages("Saving pytorch model by Pickle")
        pytorch_log.addFilter(pickle_notice)
        try:
            info = mlflow.pytorch.log_model(
                scorer,
                name="model",
                signature=infer_signature(example, out),
                serialization_format="pickle",
                input_example=example,
            )
        finally:
            pytorch_log.removeFilter(pickle_notice)
        version = _register_teacher(mlflow.MlflowClient(), info.model_id, run.info.run_id)
        mlflow.MlflowClient().set_registered_model_alias(TEACHER, TEACHER_ALIAS, version)
        return run.info.run_id, version
