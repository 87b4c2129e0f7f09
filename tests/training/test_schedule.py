"""The training schedule: warm-up then cosine decay in optimizer steps, the learning rate
scaled by sqrt(processes) by default, and the best validation epoch is what training hands
back."""

from __future__ import annotations

import math

import pytest
import torch

from patternlake.models.fit import (
    lr_schedule,
    train_worker,
    validate_ndcg,
    validation_set,
)
from patternlake.models.train_spec import TrainSpec, lr_scale, on_one_process
from patternlake.training.train import load_best
from tests.training import handmade
from tests.training.test_distributed import spec_for


def test_warm_up_then_cosine_decay_to_the_floor():
    f = lr_schedule("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never rises again
    constant = lr_schedule("constant", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert constant(9) == 1.0 and constant(100) == 1.0


def test_the_learning_rate_scales_with_the_processes_as_asked():
    assert lr_scale("none", 4) == 1.0
    assert lr_scale("sqrt", 4) == 2.0
    assert lr_scale("linear", 4) == 4.0


def test_the_default_two_processes_train_at_lr_0_001_over_128_windows(config):
    t = config.train
    assert (t.num_proc, t.lr_scaling) == (2, "sqrt")
    assert t.num_proc * t.batch_size == 128  # the global batch
    assert t.lr * lr_scale(t.lr_scaling, t.num_proc) == pytest.approx(1e-3, rel=1e-5)
    # one process trains that run (benchmarks) at its global batch and learning rate
    one = on_one_process(
        TrainSpec.from_config(t, files=[], data_version=0, model={}, backend="horovod"), 2
    )
    assert (one.backend, one.batch_size, one.lr) == ("single", 128, pytest.approx(1e-3, rel=1e-5))


@pytest.mark.slow
def test_training_hands_back_the_best_validation_epoch_not_the_last(tmp_path):
    files = handmade.layouts(tmp_path / "data", lambda u, j: 1 + (3 * u + j) % 59)["one_file"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=12)
    spec.lr, spec.schedule, spec.patience = 3e-2, "constant", 100  # noisy: best is rarely last
    result = train_worker(vars(spec))
    history = [h["valid_ndcg@10"] for h in result["history"]]
    assert len(history) == 12
    assert result["best_epoch"] == max(range(12), key=lambda e: (history[e], -e))
    assert result["best_valid_ndcg@10"] == history[result["best_epoch"]]
    # the weights handed back score exactly the best epoch's validation NDCG@10
    best = load_best(result)
    cfg = best.config
    again = validate_ndcg(best, validation_set(spec, cfg), cfg, torch.device("cpu"))
    assert again == pytest.approx(history[result["best_epoch"]], abs=1e-9)
    last = torch.load(sorted((tmp_path / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    if result["best_epoch"] != 11:  # and they are not the last epoch's weights
        assert any(not torch.equal(last["model"][k], v) for k, v in best.state_dict().items())


def test_the_weight_average_follows_its_formula_and_copies_buffers():
    from patternlake.models.fit import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        avg.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = [
            d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)
        ]
    for e, a in zip(expected, avg.model.parameters(), strict=True):
        assert torch.allclose(e, a, atol=1e-6)
    assert torch.equal(avg.model[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in avg.model.parameters())
    again = WeightAverage(model, decay=0.9)
    again.load_state_dict(avg.state_dict())  # what a checkpoint carries for a resume
    assert again.updates == 30
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.parameters(), avg.model.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(model, decay=1.0)


@pytest.mark.slow
def test_with_a_weight_average_the_average_is_validated_kept_and_resumed(tmp_path):
    """ema_decay > 0: the validation NDCG@10 of each epoch is the average's, best.pt holds the
    average (not the raw weights), and a resumed run continues the same average."""
    files = handmade.layouts(tmp_path / "data", lambda u, j: 1 + (3 * u + j) % 59)["one_file"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=4)
    spec.ema_decay, spec.patience, spec.window_stride = 0.9, 100, 3
    result = train_worker(vars(spec))
    best = load_best(result)
    cfg = best.config
    again = validate_ndcg(best, validation_set(spec, cfg), cfg, torch.device("cpu"))
    assert again == pytest.approx(result["best_valid_ndcg@10"], abs=1e-9)
    last = torch.load(sorted((tmp_path / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    assert last["ema"]["updates"] == sum(h["steps"] for h in result["history"])
    if result["best_epoch"] == 3:  # the average, not the raw weights of that epoch
        assert any(not torch.equal(last["model"][k], v) for k, v in best.state_dict().items())
    # two more epochs from the checkpoint: the average goes on from where it was
    spec.epochs = 6
    resumed = train_worker(vars(spec))
    assert resumed["resumed_from"] and len(resumed["history"]) == 6
    final = torch.load(
        sorted((tmp_path / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False
    )
    assert final["ema"]["updates"] == sum(h["steps"] for h in resumed["history"])
