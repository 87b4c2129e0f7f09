"""The students' gates and distillation data without Spark: the paired bootstrap, the harm
guard, int8 fidelity, the stored top-K laid out on the training windows, the distillation
loss over the stored top-K."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from patternlake.models.student import Student, from_bytes, quantized_bytes
from patternlake.models.teacher import SequentialTeacher, TeacherConfig, TeacherEnsemble
from patternlake.sequence_reader import soft_arrays, training_arrays
from patternlake.students import gates
from patternlake.students.topk import topk_columns


def _hits(n: int, rate: float, seed: int) -> np.ndarray:
    """Per-user NDCG@10 of a model that ranks the target at a random rank < 10 for ``rate``
    of the users."""
    rng = np.random.default_rng(seed)
    ranks = np.where(rng.random(n) < rate, rng.integers(0, 10, n), 50)
    return gates.per_user_ndcg(ranks)


def test_the_gate_accepts_an_exact_copy():
    teacher = _hits(400, 0.3, 0)
    interval = gates.paired_bootstrap(teacher.copy(), teacher, 1000, 0)
    assert interval.ratio == interval.lower == interval.upper == 1.0
    assert gates.promotion(interval, 0.90, 20).passed


def test_the_gate_refuses_a_student_planted_worse_by_a_known_margin():
    teacher = _hits(600, 0.3, 1)
    rng = np.random.default_rng(2)
    # the student loses 20% of the teacher's hits, chosen at random: a true ratio of 0.8
    student = np.where(rng.random(600) < 0.2, 0.0, teacher)
    interval = gates.paired_bootstrap(student, teacher, 2000, 0)
    assert 0.7 < interval.ratio < 0.9
    assert interval.lower < interval.ratio < interval.upper
    decision = gates.promotion(interval, 0.90, 20)
    assert not decision.passed and "lower bound" in decision.reason
    # a point estimate above the threshold is not enough when the interval is wide
    few = gates.paired_bootstrap(student[:40], teacher[:40], 2000, 0)
    assert not gates.promotion(few, min(0.99, few.ratio), 20).passed
    assert not gates.promotion(interval, 0.5, 1000).passed  # too few users to tell


def test_pairing_narrows_the_interval():
    """The same two models resampled as pairs: what the users share cancels out."""
    teacher = _hits(500, 0.3, 3)
    rng = np.random.default_rng(4)
    student = np.where(rng.random(500) < 0.05, 0.0, teacher)
    paired = gates.paired_bootstrap(student, teacher, 2000, 0)
    unpaired = gates.paired_bootstrap(student, rng.permutation(teacher), 2000, 0)
    assert paired.upper - paired.lower < 0.5 * (unpaired.upper - unpaired.lower)


def test_the_harm_guard_falls_back_only_when_significantly_below_the_floor():
    teacher = _hits(300, 0.3, 5)
    assert not gates.harm(gates.paired_bootstrap(teacher * 0.5, teacher), 0.8).passed
    assert gates.harm(gates.paired_bootstrap(teacher * 0.95, teacher), 0.8).passed
    assert gates.harm(gates.paired_bootstrap(np.zeros(0), np.zeros(0)), 0.8).passed
    # a small segment whose 90% upper bound is just under the floor: with 8 segments judged
    # at once its bound is taken at 98.75% (Bonferroni), which a bad draw does not cross
    assert gates.harm_level(8) == pytest.approx(0.9875) and gates.harm_level(1) == 0.9
    small = teacher[:40]
    rng = np.random.default_rng(6)
    mixed = np.where(rng.random(40) < 0.3, 0.0, small) + np.where(rng.random(40) < 0.1, 0.5, 0)
    plain = gates.paired_bootstrap(mixed, small, 2000, 0)
    wide = gates.paired_bootstrap(mixed, small, 2000, 0, wide_level=gates.harm_level(8))
    assert wide.upper == plain.upper < wide.wide_upper
    floor = (plain.upper + wide.wide_upper) / 2
    assert not gates.harm(plain, floor).passed  # at 90%: back to the teacher
    assert gates.harm(wide, floor).passed  # corrected for 8 segments: not significant
    assert gates.harm(plain, floor, min_users=50).passed  # too few users for a verdict


def _inputs(n_items: int, n: int = 64, L: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, n_items, (n, L))
    items[: n // 2, :4] = 0
    return np.stack([items, (items > 0).astype(np.int64), (items > 0).astype(np.int64)], 1)


def test_fidelity_is_perfect_for_the_same_model_and_measures_int8():
    torch.manual_seed(0)
    c = TeacherConfig(n_items=200, n_types=3, max_len=12, d_model=16, n_heads=2, n_layers=1)
    fp32 = Student(c, 200, None).eval()
    x = _inputs(200)
    same = gates.fidelity(fp32, fp32, x)
    assert same["top10_overlap"] == 1.0 and same["score_correlation"] == pytest.approx(1.0)
    int8 = from_bytes(quantized_bytes(fp32))
    close = gates.fidelity(int8, fp32, x)
    assert 0.8 <= close["top10_overlap"] <= 1.0 and close["score_correlation"] > 0.99
    other = gates.fidelity(Student(c, 200, None).eval(), fp32, x)
    assert other["top10_overlap"] < 0.3


def _sequences(n_users: int, n_items: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, n_users)
    seqs = [rng.integers(1, n_items, n).tolist() for n in lengths]
    evaluable = lengths >= 3
    return pa.table(
        {
            "user_id": [f"u{i}" for i in range(n_users)],
            "item_seq": pa.array(seqs, pa.list_(pa.int32())),
            "type_seq": pa.array([[1] * len(s) for s in seqs], pa.list_(pa.int32())),
            "gap_seq": pa.array([[2] * len(s) for s in seqs], pa.list_(pa.int32())),
            "valid_item": pa.array(
                [s[-2] if e else None for s, e in zip(seqs, evaluable, strict=True)], pa.int32()
            ),
            "test_item": pa.array(
                [s[-1] if e else None for s, e in zip(seqs, evaluable, strict=True)], pa.int32()
            ),
        }
    )


def _seen_teacher(n_items: int, max_len: int, weight: float, seed: int) -> SequentialTeacher:
    """A small teacher with the seen term at ``weight`` (eval mode)."""
    torch.manual_seed(seed)
    c = TeacherConfig(
        n_items=n_items,
        n_types=3,
        max_len=max_len,
        d_model=16,
        n_heads=2,
        n_layers=1,
        seen_bias=True,
    )
    model = SequentialTeacher(c).eval()
    with torch.no_grad():
        model.seen_weight.fill_(weight)
    return model


@pytest.mark.parametrize("stride,members", [(None, 1), (4, 1), (4, 2)])
def test_the_stored_top_k_lines_up_with_every_training_target(stride, members):
    """Stored per user (k values per training target, in order) and read back per window:
    position t of a window gets the teacher's top-k of that window's input up to t, which is
    what the student sees there. Checked against the teacher run on the windows directly
    (an ensemble's mean log-probabilities too, found over item chunks as well)."""
    nets = [_seen_teacher(60, 10, 0.7, seed=s) for s in range(members)]
    teacher = nets[0] if members == 1 else TeacherEnsemble(nets).eval()
    table = _sequences(30, 60)
    ids, logits = topk_columns(teacher, table, 5, stride)
    table = table.append_column("topk_items", ids).append_column("topk_logits", logits)
    items, types, gaps, targets = training_arrays(table, 10, stride)
    soft_items, soft_logits = soft_arrays(table, 10, 5, stride)
    assert soft_items.shape == (len(items), 10, 5)
    has = targets > 0
    assert (soft_items[~has] == 0).all() and np.isneginf(soft_logits[~has].astype(float)).all()
    with torch.no_grad():
        dense = teacher.position_scores(
            torch.from_numpy(items),
            torch.from_numpy(types),
            torch.from_numpy(gaps),
            torch.from_numpy(has),
        )
    dense[:, 0] = float("-inf")
    top = dense.topk(5, dim=1)
    assert (soft_items[has] == top.indices.numpy()).all()
    assert np.allclose(soft_logits[has].astype(np.float32), top.values.numpy(), atol=2e-2)


def test_the_distillation_loss_reads_only_the_stored_top_k():
    torch.manual_seed(0)
    c = TeacherConfig(n_items=50, n_types=3, max_len=8, d_model=16, n_heads=2, n_layers=1)
    model = SequentialTeacher(c).eval()  # no dropout: the same states in both losses
    items = torch.randint(1, 50, (4, 8))
    targets = torch.randint(1, 50, (4, 8))
    targets[:, :3] = 0
    soft_items = torch.randint(1, 50, (4, 8, 6))
    soft_logits = torch.randn(4, 8, 6)
    soft_logits[..., -1] = float("-inf")  # fewer than k stored: ignored
    types = gaps = (items > 0).long()
    model.distill = (0.0, 2.0)
    assert torch.allclose(
        model(items, types, gaps, targets, soft_items, soft_logits),
        model.loss(items, types, gaps, targets),
    )
    model.distill = (1.0, 2.0)
    with torch.no_grad():  # the student's own scores as the teacher's: KL 0
        h = model.encode(items, types, gaps)
        own = torch.einsum("bld,blkd->blk", h, model.item_emb(soft_items))
        own[..., -1] = float("-inf")
    with torch.no_grad():
        same = float(model(items, types, gaps, targets, soft_items, own))
        other = float(model(items, types, gaps, targets, soft_items, soft_logits))
    assert same == pytest.approx(0, abs=1e-5) and other > 0.01


def test_a_gate_on_users_the_reference_never_ranks_is_refused():
    zeros = np.zeros(300)
    interval = gates.paired_bootstrap(zeros, zeros)
    assert interval.ratio == 1.0  # 0 / 0 reads as a tie...
    decision = gates.promotion(interval, 0.9, 20)
    assert not decision.passed and "nothing to judge" in decision.reason  # ...but is no win


def test_every_segment_gets_a_verdict_even_without_gate_users():
    """A segment whose users are all in the tune half (or not evaluable) still has its
    champion alias decided by the pooled gate: no verdict of its own, never a stale alias."""
    from types import SimpleNamespace

    from patternlake.config import load_config
    from patternlake.students.distill import SHARED, segment_guards

    config = load_config("local", [])
    judged = SimpleNamespace(
        segment=np.array([1] * 30 + [2] * 30 + [SHARED] * 5), segment_ids=[0, 1, 2, 3]
    )
    teacher = _hits(65, 0.3, 7)
    guards = segment_guards(config, judged, teacher.copy(), teacher)
    assert sorted(guards) == [0, 1, 2, 3]
    assert all(g.passed for g in guards.values())
    assert guards[0].interval.users == 0 and "no guard" in guards[0].reason


def test_the_distillation_loss_counts_the_seen_term_of_each_position_prefix():
    model = _seen_teacher(30, 8, 1.5, seed=1)
    items = torch.randint(1, 30, (5, 8))
    types = gaps = torch.ones_like(items)
    targets = torch.randint(1, 30, (5, 8))
    soft_items = torch.randint(1, 30, (5, 8, 7))
    soft_items[..., :3] = items.unsqueeze(2)  # items of the window: seen up to some positions
    soft_logits = torch.randn(5, 8, 7)
    model.distill = (1.0, 1.0)
    with torch.no_grad():
        got = model(items, types, gaps, targets, soft_items, soft_logits)
        mask = targets > 0
        dense = model.position_scores(items, types, gaps, mask)  # the seen term, densely
        student = dense.gather(1, soft_items[mask])
        t = torch.softmax(soft_logits[mask], -1)
        kl = (t * (t.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    assert torch.allclose(got, kl, atol=1e-5)
