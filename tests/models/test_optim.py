"""LazyAdamW and the row-wise weight average: the same numbers as the dense AdamW and
average wherever the dense ones are defined, and untouched rows untouched."""

from __future__ import annotations

import torch
from torch import nn

from patternlake.models.optim import LazyAdamW, WeightAverage


class Net(nn.Module):
    def __init__(self, sparse: bool, n: int = 30, d: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(n, d, sparse=sparse)
        self.lin = nn.Linear(d, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.lin(self.emb(idx)) ** 2).mean()


def _batches(steps: int, n: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (size,), generator=g) for _ in range(steps)]


def test_dense_gradients_follow_torch_adamw_exactly():
    a, b = Net(False), Net(False)
    oa = torch.optim.AdamW(a.parameters(), lr=0.05, weight_decay=0.1)
    ob = LazyAdamW(b.parameters(), lr=0.05, weight_decay=0.1)
    for idx in _batches(20, 30, 8):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(idx).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sparse_rows_equal_adamw_when_every_row_is_touched_and_stay_put_otherwise():
    a, b = Net(False, n=6), Net(True, n=6)
    oa = torch.optim.AdamW(a.parameters(), lr=0.05, weight_decay=0.1)
    ob = LazyAdamW(b.parameters(), lr=0.05, weight_decay=0.1)
    every = torch.arange(6).repeat(2)
    for _ in range(10):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(every).backward()
            opt.step()
    assert b.emb.weight.grad.is_sparse
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a step that touches rows 0 and 1 changes those rows only (no decay of the others)
    before = b.emb.weight.detach().clone()
    ob.zero_grad()
    b(torch.tensor([0, 1])).backward()
    ob.step()
    changed = (b.emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [True, True, False, False, False, False]


def test_the_row_wise_average_equals_the_dense_average():
    """The same weights trained by LazyAdamW on sparse rows; the average kept row-wise
    (catching rows up when touched, and at sync) equals the dense average of them."""
    net = Net(True)
    opt = LazyAdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    lazy = WeightAverage(net, 0.9, sparse=("emb.weight",))
    dense = WeightAverage(net, 0.9)
    for idx in _batches(40, 30, 3):  # most rows untouched at each step
        opt.zero_grad()
        net(idx).backward()
        lazy.before_step(net)
        opt.step()
        lazy.update(net)
        dense.update(net)
    assert not torch.allclose(lazy.model.emb.weight, dense.model.emb.weight, atol=1e-5)  # stale
    lazy.sync(net)
    for p, q in zip(dense.model.parameters(), lazy.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a restored average is current and goes on equal
    restored = WeightAverage(net, 0.9, sparse=("emb.weight",))
    restored.load_state_dict(lazy.state_dict())
    for idx in _batches(5, 30, 3, seed=2):
        opt.zero_grad()
        net(idx).backward()
        restored.before_step(net)
        opt.step()
        restored.update(net)
        dense.update(net)
    restored.sync(net)
    torch.testing.assert_close(
        restored.model.emb.weight, dense.model.emb.weight, rtol=1e-5, atol=1e-6
    )
