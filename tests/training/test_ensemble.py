"""An ensemble teacher (``train.members`` > 1): members from consecutive seeds, each stopped
on its own best validation epoch; the ensemble scores the log of the members' mean
next-item probability, is validated on every validation target, and round-trips through
the model file like a single teacher."""

from __future__ import annotations

import math

import pytest
import torch

from patternlake.models.fit import train_worker, validate_ndcg, validation_set
from patternlake.models.teacher import (
    SequentialTeacher,
    TeacherConfig,
    TeacherEnsemble,
    TeacherScorer,
    teacher_bytes,
    teacher_from_bytes,
)
from patternlake.training.train import train_members
from tests.training import handmade
from tests.training.test_distributed import spec_for


def _members(k: int) -> list[SequentialTeacher]:
    config = TeacherConfig(n_items=30, n_types=3, max_len=6, d_model=8, n_heads=2, n_layers=1)
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(SequentialTeacher(config).eval())
    return out


def _inputs(b: int = 4, length: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, 30, (b, length), generator=g)
    items[0, :2] = 0  # a left-padded row
    return items, torch.ones_like(items), torch.randint(0, 8, (b, length), generator=g)


def test_the_ensemble_scores_the_log_of_the_members_mean_probability():
    members = _members(3)
    ens = TeacherEnsemble(members).eval()
    items, types, gaps = _inputs()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m.last_scores(items, types, gaps), -1) for m in members])
        expected = probs.mean(0).log()
        got = ens.last_scores(items, types, gaps)
        assert torch.allclose(got[:, 1:], expected[:, 1:], atol=1e-5)
        assert torch.isinf(got[:, 0]).all()  # padding is never recommended
        mask = items > 0
        pos = ens.position_scores(items, types, gaps, mask)
        each = torch.stack(
            [torch.log_softmax(m.position_scores(items, types, gaps, mask), -1) for m in members]
        )
        assert torch.allclose(pos, torch.logsumexp(each, 0) - math.log(3), atol=1e-5)
    assert ens.members == 3 and ens.num_params() == 3 * members[0].num_params()


def test_an_ensemble_round_trips_through_the_model_file_and_serves():
    ens = TeacherEnsemble(_members(2)).eval()
    back = teacher_from_bytes(teacher_bytes(ens))
    assert isinstance(back, TeacherEnsemble) and back.members == 2
    items, types, gaps = _inputs()
    with torch.no_grad():
        assert torch.equal(
            back.last_scores(items, types, gaps), ens.last_scores(items, types, gaps)
        )
        x = torch.stack([items, types, gaps], dim=1)
        assert torch.equal(TeacherScorer(back)(x), ens.last_scores(items, types, gaps))
    single = teacher_from_bytes(teacher_bytes(_members(1)[0]))
    assert isinstance(single, SequentialTeacher)  # one member stays a plain teacher


def test_members_must_share_a_configuration():
    other = SequentialTeacher(
        TeacherConfig(n_items=30, n_types=3, max_len=6, d_model=16, n_heads=2, n_layers=1)
    )
    with pytest.raises(ValueError, match="one configuration"):
        TeacherEnsemble([_members(1)[0], other])


@pytest.mark.slow
def test_train_members_trains_each_seed_on_its_own_and_validates_the_ensemble(tmp_path):
    files = handmade.layouts(tmp_path / "data", lambda u, j: 1 + (3 * u + j) % 59)["one_file"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=3)
    seen = []

    def run(member):
        seen.append((member.seed, member.checkpoint_dir))
        return train_worker(vars(member))

    model, result = train_members(spec, 2, run)
    assert [s for s, _ in seen] == [spec.seed, spec.seed + 1]
    assert len({d for _, d in seen}) == 2  # each member resumes from its own checkpoints
    assert isinstance(model, TeacherEnsemble) and model.members == 2
    assert [m["seed"] for m in result["members"]] == [spec.seed, spec.seed + 1]
    cfg = model.config
    full = validation_set(spec, cfg)  # the members' validation sample
    assert result["best_valid_ndcg@10"] == pytest.approx(
        validate_ndcg(model, full, cfg, torch.device("cpu")), abs=1e-12
    )
    one, alone = train_members(spec, 1, lambda m: train_worker(vars(m)))
    assert isinstance(one, SequentialTeacher) and len(alone["members"]) == 1


def test_the_seen_term_shifts_exactly_the_items_of_the_window_up_to_each_position():
    config = TeacherConfig(
        n_items=30, n_types=3, max_len=6, d_model=8, n_heads=2, n_layers=1, seen_bias=True
    )
    torch.manual_seed(0)
    model = SequentialTeacher(config).eval()
    with torch.no_grad():
        model.seen_weight.fill_(-2.5)
    items, types, gaps = _inputs()
    seen = model.seen(items)
    for b in range(items.shape[0]):
        for t in range(items.shape[1]):
            expected = set(items[b, : t + 1].tolist()) - {0}
            assert set(torch.nonzero(seen[b, t]).ravel().tolist()) == expected
    with torch.no_grad():
        plain = model.scores(model.encode(items, types, gaps))  # (B, L, N) without the term
        last = model.last_scores(items, types, gaps)
        mask = items > 0
        pos = model.position_scores(items, types, gaps, mask)
    assert torch.allclose(last[:, 1:], (plain[:, -1] - 2.5 * seen[:, -1])[:, 1:])
    assert torch.allclose(pos, plain[mask] - 2.5 * seen[mask])
    # the loss sees the same scores: cross-entropy of the shifted logits at target positions
    targets = torch.roll(items, -1, 1)
    targets[:, -1] = 0
    targets[items == 0] = 0
    keep = targets > 0
    expected_loss = torch.nn.functional.cross_entropy((plain - 2.5 * seen)[keep], targets[keep])
    model.train(False)
    assert torch.allclose(model.loss(items, types, gaps, targets), expected_loss, atol=1e-5)
    back = teacher_from_bytes(teacher_bytes(model))  # the learned weight is in the file
    assert back.seen_weight.item() == -2.5


def test_the_seen_weight_is_learned_from_data_where_items_never_repeat():
    """Targets that never repeat an input item push the weight below zero."""
    config = TeacherConfig(
        n_items=40, n_types=2, max_len=8, d_model=8, n_heads=2, n_layers=1, seen_bias=True
    )
    torch.manual_seed(1)
    model = SequentialTeacher(config)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        seq = torch.stack([torch.randperm(39, generator=g)[:9] + 1 for _ in range(16)])
        items, targets = seq[:, :-1], seq[:, 1:]
        loss = model.loss(items, torch.ones_like(items), torch.zeros_like(items), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.seen_weight.item() < -0.5


def test_sampled_softmax_checks_only_its_candidates_for_the_seen_term():
    items, _, _ = _inputs(b=5, length=6)
    mask = items > 0
    mask[1, 2] = False
    cand = torch.unique(torch.cat([items[mask], torch.tensor([3, 17, 29])]))
    config = TeacherConfig(
        n_items=30, n_types=3, max_len=6, d_model=8, n_heads=2, n_layers=1, seen_bias=True
    )
    dense = SequentialTeacher(config).seen(items)[mask][:, cand]
    assert torch.equal(SequentialTeacher.seen_columns(items, mask, cand), dense)
    model = SequentialTeacher(
        TeacherConfig(**{**config.to_dict(), "sampled_softmax": 5})
    )  # and the sampled loss runs with the term
    targets = torch.roll(items, -1, 1)
    targets[:, -1] = 0
    assert torch.isfinite(
        model.loss(items, torch.ones_like(items), torch.zeros_like(items), targets)
    )
