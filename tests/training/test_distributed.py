"""Two training processes through both distributed backends (Horovod on Spark, torch DDP
through TorchDistributor) on data that used to give the ranks different numbers of
batches, stopped after one epoch and resumed for a second."""

from pathlib import Path

import pytest
import torch

from patternlake.models.fit import per_process_batch
from patternlake.models.teacher import TeacherConfig
from patternlake.models.train_spec import TrainSpec
from patternlake.sequence_reader import ShardedSequences
from patternlake.training.train import run_backend
from tests.training import handmade

N_ITEMS = 60


def small_item(u: int, j: int) -> int:
    return 1 + (3 * u + j) % (N_ITEMS - 1)


def spec_for(files: list[str], backend: str, checkpoints: Path, epochs: int) -> TrainSpec:
    model = TeacherConfig(
        n_items=N_ITEMS, n_types=3, max_len=8, d_model=16, n_heads=2, n_layers=1, dropout=0.0
    )
    return TrainSpec(
        files=files,
        data_version=0,
        model=model.to_dict(),
        backend=backend,
        epochs=epochs,
        batch_size=32,
        lr=1e-3,
        warmup_steps=1,
        patience=10,
        valid_users=200,
        checkpoint_dir=str(checkpoints),
    )


def adam_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("layout", ["one_file", "uneven"])
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_two_workers_train_in_step_and_resume_with_the_optimizer_state(
    spark, tmp_path, backend, layout
):
    files = handmade.layouts(tmp_path / "data", small_item)[layout]
    checkpoints = tmp_path / "checkpoints"
    # train.batch_size is global: each of the 2 ranks takes half of it
    steps = ShardedSequences(files, 0, 2, 8, per_process_batch(32, 2), seed=7).batches_per_epoch()

    first = run_backend(spark, spec_for(files, backend, checkpoints, epochs=1), backend, 2)
    assert first["world"] == 2 and first["diverged"] is None
    assert [h["steps"] for h in first["history"]] == [steps]

    second = run_backend(spark, spec_for(files, backend, checkpoints, epochs=2), backend, 2)
    assert second["resumed_from"].endswith("epoch-0000.pt")
    assert [h["steps"] for h in second["history"]] == [steps, steps]
    # Adam's state went on from the checkpoint: its step count grew by one epoch's steps
    # (a fresh optimizer would have counted this epoch's steps only)
    before, after = (
        adam_steps(checkpoints / "epoch-0000.pt"),
        adam_steps(checkpoints / "epoch-0001.pt"),
    )
    assert after == before + steps, (before, after, steps)


def test_the_global_batch_is_split_across_processes():
    assert [per_process_batch(128, w) for w in (1, 2, 3, 256)] == [128, 64, 43, 1]
