"""Students without Spark: the model file format (no pickle), int8 packing, the catalogue,
the size budget, pruning masks, the gate and the distillation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patternlake.models import store
from patternlake.models.student import (
    Int8Student,
    Student,
    count_params,
    from_bytes,
    large_tensors,
    quantized_bytes,
)
from patternlake.models.teacher import TeacherConfig
from patternlake.students.transforms import magnitude_masks, student_config


def _inputs(n_global: int, n: int = 64, L: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_global, (n, L), generator=g)
    items[: n // 2, :3] = 0  # left padding
    types = (items > 0).long()
    gaps = torch.randint(0, 8, (n, L), generator=g) * (items > 0)
    return torch.stack([items, types, gaps], dim=1)


@pytest.mark.parametrize(
    "d,layers,heads,rank,head",
    [(8, 1, 1, 0, 0), (16, 2, 2, 0, 0), (64, 2, 2, 16, 0), (16, 1, 2, 4, 3)],
)
def test_count_params_matches_the_built_model(d, layers, heads, rank, head):
    c = TeacherConfig(n_items=301, n_types=7, max_len=20, d_model=d, n_layers=layers, n_heads=heads,
                      item_rank=rank, item_bias=head > 0, adapter_rank=head)  # fmt: skip
    assert count_params(c) == Student(c, 301, None).num_params()


def test_store_round_trip_needs_no_pickle(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int8)}
    size = store.save(tmp_path / "m.safetensors", tensors, {"kind": "x", "config": {"d": 4}})
    data = (tmp_path / "m.safetensors").read_bytes()
    assert size == len(data)
    assert b"\x80\x04" not in data[:2]  # not a pickle stream
    back, meta = store.load(tmp_path / "m.safetensors")
    assert meta == {"kind": "x", "config": {"d": 4}}
    np.testing.assert_array_equal(back["a"], tensors["a"])
    np.testing.assert_array_equal(back["b"], tensors["b"])
    with pytest.raises(ValueError):
        store.loads(data[: len(data) // 2 - 3])
    with pytest.raises(ValueError):
        store.loads(b"\x00" * 4)
    packed = store.dumps_packed(tensors, {"kind": "x"})
    back, meta = store.loads(packed)
    assert meta == {"kind": "x"} and set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"], tensors["a"])


def test_pack_int8_keeps_zeros_and_packs_sparse_tensors():
    w = torch.randn(40, 16)
    w[w.abs() < 0.7] = 0  # about half zero
    p = store.pack_int8(w)
    assert "mask" in p
    q, scale = store.unpack_int8(p)
    assert ((q == 0) == (w.numpy() == 0)).all()
    back = store.dequantize(p)
    assert torch.allclose(back, w, atol=float(w.abs().max()) / 127 * 0.51 + 1e-3)
    dense = store.pack_int8(torch.randn(40, 16) + 3)
    assert "mask" not in dense


def test_student_config_is_the_widest_whose_int8_file_fits_the_byte_budget():
    t = TeacherConfig(n_items=1001, n_types=7, max_len=50, d_model=64, n_layers=2, n_heads=2)
    teacher_file = len(Student(t, 1001, None).to_bytes())
    budget = teacher_file // 10
    c, size = student_config(t, budget, [64, 48, 32, 24, 16, 8], 1, 2, 0.1)
    assert size <= budget and c.d_model == 32 and c.n_items == 1001  # the whole catalogue
    # the served file's bytes, estimated on initial weights: another draw differs by < 1%
    assert abs(size - len(quantized_bytes(Student(c, 1001, None)))) < 0.01 * size
    wider = student_config(t, 10**9, [48], 1, 2, 0.1)[0]
    assert len(quantized_bytes(Student(wider, 1001, None))) > budget
    assert (c.max_len, c.n_types, c.seen_bias) == (t.max_len, t.n_types, t.seen_bias)
    assert student_config(t, 100, [8], 1, 1, 0.1) is None
    # a low-rank item table spends the bytes it saves on a wider encoder, within the budget
    low, low_size = student_config(t, budget, [64, 48, 32, 24, 16, 8], 1, 2, 0.1, item_share=0.25)
    assert low_size <= budget and low.d_model > c.d_model
    assert low.item_rank == round(low.d_model * 0.25)
    net = Student(low, 1001, None).net
    assert tuple(net.item_emb.weight.shape) == (1001, low.item_rank)


def test_a_low_rank_item_table_ties_input_and_output_through_one_projection():
    t = TeacherConfig(n_items=50, n_types=3, max_len=6, d_model=8, n_layers=1, n_heads=2,
                      item_rank=3, seen_bias=True)  # fmt: skip
    torch.manual_seed(0)
    s = Student(t, 50, None).eval()
    x = _inputs(50, 5, L=6)
    with torch.no_grad():
        h = s.net.ln(s.net.encode_body(x[:, 0], x[:, 1], x[:, 2])[:, -1])  # (B, D)
        full_table = s.net.item_proj(s.net.item_emb.weight)  # (N, D): each item's input vector
        want = h @ full_table.T + s.net.seen_weight * s.net.window(x[:, 0], 50)
        got = s(x)
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-5)


def test_a_catalogue_student_scores_only_its_items_in_global_ids():
    cat = np.array([3, 5, 8])
    c = TeacherConfig(n_items=5, n_types=2, max_len=10, d_model=8, n_layers=1, n_heads=1)
    s = Student(c, 12, cat).eval()
    out = s(_inputs(12, 4))
    assert out.shape == (4, 12)
    finite = torch.isfinite(out)
    assert finite[:, cat].all() and finite.sum(1).eq(3).all()


def test_student_file_round_trip_is_exact():
    c = TeacherConfig(n_items=51, n_types=3, max_len=10, d_model=16, n_layers=1, n_heads=2)
    s = Student(c, 51, None).eval()
    x = _inputs(51)
    back = from_bytes(s.to_bytes(segment=2))
    assert torch.equal(s(x), back(x))


def test_int8_file_scores_close_to_fp32():
    """fp32 student -> int8 file -> scores within the weights' rounding, same top item for
    >= 95% of users (the same top-10 is checked on a distilled student, in test_distill)."""
    torch.manual_seed(0)
    c = TeacherConfig(n_items=401, n_types=2, max_len=10, d_model=32, n_layers=1, n_heads=2)
    s = Student(c, 401, None).eval()
    with torch.no_grad():
        s.net.item_emb.weight.normal_(0, 1.0)
    x = _inputs(401, n=200)
    data = quantized_bytes(s)
    assert len(data) < len(s.to_bytes()) / 3
    for runtime in ("dequant", "dynamic"):
        q = from_bytes(data, runtime)
        assert isinstance(q, Int8Student)
        with torch.no_grad():
            a, b = s(x), q(x)
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        spread = float(a[finite].std())
        assert float((a[finite] - b[finite]).abs().max()) < 0.1 * spread
        assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    with pytest.raises(ValueError, match="runtime"):
        from_bytes(data, "onnx")


def test_pruned_int8_is_four_times_smaller():
    torch.manual_seed(0)
    c = TeacherConfig(n_items=2001, n_types=2, max_len=10, d_model=16, n_layers=1, n_heads=1)
    s = Student(c, 2001, None)
    params = dict(s.named_parameters())
    masks = magnitude_masks({k: params[k] for k in large_tensors(s)}, 0.5)
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(m)
            assert abs(float(m.float().mean()) - 0.5) < 0.01
    assert len(s.to_bytes()) / len(quantized_bytes(s)) >= 4


@pytest.mark.parametrize("catalogue", [None, np.array([3, 5, 8, 9, 20])])
def test_a_student_with_the_seen_term_shifts_its_window_items_in_every_runtime(catalogue):
    """seen_bias students (distilled from a seen_bias teacher) add the learned shift to the
    items of the window, in fp32 and in both int8 runtimes, and count the weight."""
    n_local = 31 if catalogue is None else len(catalogue) + 2
    c = TeacherConfig(
        n_items=n_local, n_types=2, max_len=10, d_model=8, n_layers=1, n_heads=1, seen_bias=True
    )
    assert count_params(c) == Student(c, 31, catalogue).num_params()
    torch.manual_seed(0)
    s = Student(c, 31, catalogue).eval()
    x = _inputs(31, n=16)
    with torch.no_grad():
        before = s(x)
        s.net.seen_weight.fill_(-3.0)
        after = s(x)
    window = torch.zeros(16, 31, dtype=torch.bool).scatter_(1, x[:, 0], True)
    window[:, 0] = False
    finite = torch.isfinite(before)
    shifted = window & finite
    assert torch.allclose((before - after)[shifted], torch.tensor(3.0))
    assert torch.equal(
        (before - after)[finite & ~window], torch.zeros(int((finite & ~window).sum()))
    )
    for runtime in ("dequant", "dynamic"):
        q = from_bytes(quantized_bytes(s), runtime)
        with torch.no_grad():
            out = q(x)
        assert q.shell.net.seen_weight.item() == -3.0
        assert (out[shifted] < before[shifted] - 2.0).float().mean() > 0.9
