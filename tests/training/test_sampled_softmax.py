"""The sampled softmax for large catalogues: when it is chosen, what it samples from, and that
a teacher trained with it learns what the full softmax learns."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from patternlake.models import ranking
from patternlake.models.teacher import SequentialTeacher, TeacherConfig
from patternlake.models.train_spec import softmax_choice
from patternlake.sequence_reader import training_item_counts
from tests.training.handmade import sequences


def test_auto_keeps_the_full_softmax_while_a_batchs_logits_fit():
    # 64 windows x 50 positions x 1,682 items x 12 bytes = 62 MB: full
    assert softmax_choice("auto", 512, 64 * 50, 1_682, 2048) == 0
    # the same batch over a million items: 38 GB, sampled
    assert softmax_choice("auto", 512, 64 * 50, 1_000_000, 2048) == 512
    assert softmax_choice("full", 512, 64 * 50, 1_000_000, 2048) == 0
    assert softmax_choice("sampled", 512, 64 * 50, 1_682, 2048) == 512


def test_the_sampler_counts_training_items_only(tmp_path):
    # user 0: 5 events (the last two are its validation and test targets); user 1: 2 events
    table = sequences([0, 1], lambda u: 5 if u == 0 else 2, lambda u, j: [3, 4, 5, 6, 7][j] + u)
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    counts = training_item_counts([str(path)], 10)
    assert counts.tolist() == [0, 0, 0, 1, 2, 2, 0, 0, 0, 0]  # 3 4 5 (user 0), 4 5 (user 1)


def _chain_data(n_items: int, users: int, length: int, seed: int = 0):
    """Each item's successor is fixed (one random permutation for every seed); popular
    heads: a user starts at a Zipf-distributed item (``seed``). The next item is a function
    of the last one."""
    succ = np.random.default_rng(0).permutation(np.arange(1, n_items))
    rng = np.random.default_rng(seed)
    nxt = np.zeros(n_items, dtype=np.int64)
    nxt[1:] = succ
    start = np.minimum(rng.zipf(1.3, users), n_items - 1)
    seqs = np.zeros((users, length), dtype=np.int64)
    seqs[:, 0] = start
    for j in range(1, length):
        seqs[:, j] = nxt[seqs[:, j - 1]]
    return seqs


def _train(sampled: int, seqs: np.ndarray, n_items: int, steps: int) -> SequentialTeacher:
    torch.manual_seed(0)
    L = seqs.shape[1] - 1
    c = TeacherConfig(
        n_items=n_items, n_types=2, max_len=L, d_model=32, n_heads=2, n_layers=1,
        dropout=0.0, sampled_softmax=sampled, seen_bias=True,
    )  # fmt: skip
    model = SequentialTeacher(c)
    if sampled:
        model.set_sampling(np.bincount(seqs.ravel(), minlength=n_items))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(seqs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        b = x[torch.randint(0, len(x), (64,), generator=g)]
        loss = model.loss(
            b[:, :-1], torch.ones_like(b[:, :-1]), torch.zeros_like(b[:, :-1]), b[:, 1:]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _hit10(model: SequentialTeacher, seqs: np.ndarray) -> float:
    x = torch.zeros((len(seqs), 3, seqs.shape[1] - 2), dtype=torch.int64)
    x[:, 0] = torch.from_numpy(seqs[:, :-2])
    x[:, 1] = 1
    ranker = ranking.ranker_for(model)
    with torch.no_grad():
        ranks, _ = ranking.target_ranks(ranker, ranker.encode(x), torch.from_numpy(seqs[:, -2]))
    return float((ranks < 10).float().mean())


def test_a_sampled_softmax_teacher_learns_what_the_full_softmax_learns():
    n_items = 3000
    train = _chain_data(n_items, 4000, 9, seed=0)
    held_out = _chain_data(n_items, 1000, 9, seed=1)  # the same chains, other users
    full = _hit10(_train(0, train, n_items, 300), held_out)
    sampled = _hit10(_train(128, train, n_items, 300), held_out)
    assert full > 0.5, full  # the task is learnable in this budget
    assert sampled >= full - 0.05, (sampled, full)


def test_the_sampled_loss_is_the_logq_corrected_softmax_over_its_candidates():
    """Negatives forced onto item 5: the candidates are the batch's targets and 5, and each
    logit is lowered by log P(in the set) = log(1 - exp(-(M p_j + k q_j)))."""
    torch.manual_seed(0)
    c = TeacherConfig(
        n_items=12, n_types=2, max_len=4, d_model=8, n_heads=2, n_layers=1,
        dropout=0.0, sampled_softmax=3, seen_bias=False,
    )  # fmt: skip
    model = SequentialTeacher(c)
    counts = np.array([0, 5, 1, 1, 1, 1, 9, 1, 1, 1, 1, 2])
    model.set_sampling(counts)
    model.sample_q = torch.zeros(12)
    model.sample_q[5] = 1.0  # every negative is item 5
    items = torch.tensor([[0, 1, 2, 3], [4, 6, 7, 8]])
    targets = torch.tensor([[0, 2, 3, 6], [6, 7, 8, 9]])
    got = model.loss(items, torch.ones_like(items), torch.zeros_like(items), targets)

    mask = targets > 0
    h = model.encode(items, torch.ones_like(items), torch.zeros_like(items))[mask]
    y = targets[mask]
    cand = torch.tensor(sorted(set(y.tolist()) | {5}))
    expected = len(y) * model.target_p[cand] + 3 * model.sample_q[cand]
    logits = h @ model.item_emb.weight[cand].T - torch.log(1 - torch.exp(-expected))
    want = torch.nn.functional.cross_entropy(logits, torch.searchsorted(cand, y))
    assert torch.allclose(got, want, atol=1e-6)
    p = counts + 1e-3 * counts.sum() / 11
    p[0] = 0
    assert torch.allclose(model.target_p, torch.tensor(p / p.sum(), dtype=torch.float32))
