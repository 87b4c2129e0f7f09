"""Teacher training on generated data with planted patterns, through every backend."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patternlake.evaluation.evaluate import evaluate_models
from patternlake.models.teacher import TeacherScorer
from patternlake.training.train import load_best, train_teacher
from tests.conftest import in_folder

EPOCHS = 30
# The daily lake here is tiny (300 users: 2-3 steps an epoch), so 30 epochs are ~60-90 steps.
# At the defaults two processes take 64 windows each a step at lr 0.00070711 x sqrt 2 = 0.001
# (one process: 64 windows at 0.00070711) and reach test NDCG@10 0.499 against Markov's 0.456
# (HR@10 0.675 vs 0.591); a hot regime (lr 5e-3 x processes) fell to 0.283. The margins below
# are what the default reaches here; a 1.05x NDCG margin is open work in issue 9.


def training_config(config, lake, tmp: Path):
    cfg = in_folder(config, tmp, train={"epochs": EPOCHS, "num_proc": 2})
    return cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": lake.root})})


@pytest.fixture(scope="module")
def trained(spark, config, daily_lake, tmp_path_factory):
    _, lake = daily_lake
    cfg = training_config(config, lake, tmp_path_factory.mktemp("teacher"))
    results = {b: train_teacher(spark, lake, cfg, b) for b in ("horovod", "ddp", "single")}
    report = evaluate_models(
        spark, lake, cfg, {b: TeacherScorer(load_best(r)) for b, r in results.items()}
    )
    return cfg, lake, results, report


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_two_process_training_beats_markov_by_a_clear_margin(trained, backend, capsys):
    _, _, results, report = trained
    assert results[backend]["world"] == 2 and results[backend]["backend"] == backend
    teacher = report["models"][backend]["overall"]
    markov = report["models"]["markov"]["overall"]
    with capsys.disabled():
        print(
            f"\n{backend} x2: test NDCG@10 {teacher['ndcg@10']:.4f} vs markov {markov['ndcg@10']:.4f}, "
            f"HR@10 {teacher['hr@10']:.4f} vs {markov['hr@10']:.4f}"
        )
    assert teacher["ndcg@10"] >= markov["ndcg@10"]
    assert teacher["hr@10"] >= 1.05 * markov["hr@10"]


@pytest.mark.slow
def test_two_workers_and_one_worker_reach_equivalent_quality(trained):
    _, _, _, report = trained
    one = report["models"]["single"]["overall"]["ndcg@10"]
    for backend in ("horovod", "ddp"):
        two = report["models"][backend]["overall"]["ndcg@10"]
        assert abs(two - one) <= 0.10 * one, (backend, two, one)


@pytest.mark.slow
def test_training_is_tracked_and_registered_in_mlflow(trained):
    import mlflow

    cfg, _, results, _ = trained
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("teacher", "candidate")
    assert str(version.version) == results["single"]["registered_version"]  # the last one trained
    run = client.get_run(results["horovod"]["mlflow_run_id"])
    assert run.data.tags["data.version"] == "0" and run.data.params["backend"] == "horovod"
    assert run.data.params["world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")
    assert len(history) == len(results["horovod"]["history"])
    model = mlflow.pytorch.load_model("models:/teacher@candidate")
    import numpy as np
    import torch

    x = torch.zeros((1, 3, cfg.teacher.max_len), dtype=torch.long)
    x[0, 0, -1] = 1
    with torch.no_grad():
        scores = model(x)
    assert scores.shape == (1, 501)  # scores over the catalogue (500 items + padding)
    assert np.isfinite(scores[0, 1:].numpy()).all()


@pytest.mark.slow
def test_a_training_process_killed_mid_epoch_resumes_from_its_checkpoint(
    config, daily_lake, tmp_path
):
    _, lake = daily_lake
    cfg = training_config(config, lake, tmp_path)
    args = [
        sys.executable,
        "-m",
        "patternlake.cli",
        "--set",
        f"lake.root={lake.root}",
        "--set",
        f"models.root={cfg.models.root}",
        "--set",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "--set",
        f"mlflow.artifact_location={cfg.mlflow.artifact_location}",
        "--set",
        "train.epochs=6",
        "--set",
        "train.patience=10",
        "train",
        "--backend",
        "single",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoints = Path(cfg.models.root) / "teacher" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*/epoch-0001.pt")):
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.1)
    time.sleep(0.5)  # inside epoch 2 now
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted(p.name for p in checkpoints.glob("*/epoch-*.pt"))
    assert "epoch-0005.pt" not in done

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    import json

    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] and result["resumed_from"].endswith(done[-1])
    assert [h["epoch"] for h in result["history"]] == list(range(6))
