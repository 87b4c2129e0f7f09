"""Two training processes through both distributed backends (Horovod on Spark, torch DDP
through TorchDistributor) on data that used to give the ranks different numbers of
batches, stopped after one epoch and resumed for a second; and what each process of a
world of 2 builds: its batch, its learning rate, and example counts it does not count."""

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from patternlake.models import fit
from patternlake.models.teacher import TeacherConfig
from patternlake.models.train_spec import TrainSpec
from patternlake.sequence_reader import (
    ShardedSequences,
    example_counts,
    read_table,
    training_arrays,
)
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
    # train.batch_size is per process: each of the 2 ranks takes 32 windows a step
    steps = ShardedSequences(files, 0, 2, 8, 32, seed=7).batches_per_epoch()

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


class FakeComm:
    """Rank ``rank`` of a world of ``world`` without collectives: rank 0's broadcasts go into
    ``sent``, the other ranks receive them from there (build rank 0 first)."""

    def __init__(self, rank: int, world: int, sent: list[Any]):
        self.backend, self.rank, self.world, self.local_rank = "single", rank, world, 0
        self.sent = sent

    def broadcast_object(self, obj: Any) -> Any:
        if self.rank == 0:
            self.sent.append(obj)
            return obj
        return self.sent.pop(0)


def uncountable(*args, **kwargs):
    raise AssertionError("a rank counted the table's examples")


def test_each_of_two_processes_takes_batch_size_windows_at_the_sqrt_scaled_lr(tmp_path):
    files = handmade.layouts(tmp_path / "data", small_item)["one_file"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=1)
    spec.batch_size, spec.lr, spec.lr_scaling = 16, 1e-3, "sqrt"
    sent: list[Any] = []
    runs = [fit._build(spec, FakeComm(r, 2, sent)) for r in (0, 1)]
    alone = fit._build(spec, FakeComm(0, 1, []))
    for run in runs:
        batches = list(run.data.epoch(0))
        assert run.data.batch_size == 16
        assert {len(b.targets) for b in batches[:-1]} == {16}  # per process, not 16 / 2
        assert run.opt.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 2**0.5)
    # 2 processes: a global batch of 32, half the steps of one process over the epoch
    assert runs[0].data.batches_per_epoch() == runs[1].data.batches_per_epoch()
    assert runs[0].data.batches_per_epoch() == -(-alone.data.batches_per_epoch() // 2)
    assert alone.opt.param_groups[0]["initial_lr"] == pytest.approx(1e-3)


def test_ranks_take_the_example_counts_from_the_spec_and_do_not_count(tmp_path, monkeypatch):
    files = handmade.layouts(tmp_path / "data", small_item)["uneven"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=1)
    counted = example_counts(files, 8)  # what the driver puts in the spec (build_spec)
    spec.example_counts = asdict(counted)
    monkeypatch.setattr("patternlake.sequence_reader.count_examples", uncountable)
    runs = [fit._build(spec, FakeComm(r, 2, [])) for r in (0, 1)]
    # the counts are the decoded table's: each rank trains ceil(N / 2) of its N windows
    n = len(training_arrays(read_table(files, handmade.SCHEMA.names), 8)[0])
    per_rank = -(-n // 2)
    for run in runs:
        assert sum(len(b.targets) for b in run.data.epoch(0)) == per_rank
        assert run.data.batches_per_epoch() == -(-per_rank // 32)


def test_without_counts_in_the_spec_only_rank_0_counts(tmp_path, monkeypatch):
    files = handmade.layouts(tmp_path / "data", small_item)["uneven"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=1)
    spec.example_counts = asdict(example_counts(files, 4))  # another window's: not used
    sent: list[Any] = []
    first = fit._build(spec, FakeComm(0, 2, sent))
    monkeypatch.setattr("patternlake.sequence_reader.count_examples", uncountable)
    second = fit._build(spec, FakeComm(1, 2, sent))
    assert first.data.counts.tolist() == second.data.counts.tolist()
    assert first.data.batches_per_epoch() == second.data.batches_per_epoch()


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_two_workers_train_the_item_table_row_wise_under_sampled_softmax(spark, tmp_path, backend):
    """Sampled softmax: the item table's gradient is sparse on both backends (Horovod
    all-gathers it, DDP over gloo reduces it), LazyAdamW steps it and the row-wise average
    is what is validated and saved; the run resumes like the dense one."""
    files = handmade.layouts(tmp_path / "data", small_item)["one_file"]
    checkpoints = tmp_path / "checkpoints"

    def sampled(epochs: int) -> TrainSpec:
        spec = spec_for(files, backend, checkpoints, epochs)
        spec.model = {**spec.model, "sampled_softmax": 8}
        spec.ema_decay = 0.9
        return spec

    steps = ShardedSequences(files, 0, 2, 8, 32, seed=7).batches_per_epoch()
    first = run_backend(spark, sampled(1), backend, 2)
    assert first["diverged"] is None and first["history"][0]["valid_ndcg@10"] > 0
    second = run_backend(spark, sampled(2), backend, 2)
    assert second["resumed_from"].endswith("epoch-0000.pt")
    saved = torch.load(checkpoints / "epoch-0001.pt", map_location="cpu", weights_only=False)
    assert adam_steps(checkpoints / "epoch-0001.pt") == 2 * steps
    assert "amsgrad" not in saved["optimizer"]["param_groups"][0]  # LazyAdamW, not AdamW
    # the average that was saved is current in every row: finite, and not the raw weights
    avg, raw = saved["ema"]["weights"]["item_emb.weight"], saved["model"]["item_emb.weight"]
    assert torch.isfinite(avg).all() and not torch.equal(avg, raw)
