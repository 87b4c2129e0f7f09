"""Chunked ranking equals the dense (users x catalogue) computation it replaces: top-K (ties
included), the evaluation ranks and top 10, deletions, for every kind of served model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patternlake.models import ranking
from patternlake.models.metrics import masked_scores
from patternlake.models.metrics import target_ranks as dense_ranks
from patternlake.models.store import loads
from patternlake.models.student import (
    Int8Student,
    Student,
    quantized_bytes,
    student_from_arrays,
    with_head,
)
from patternlake.models.teacher import (
    SequentialTeacher,
    TeacherConfig,
    TeacherEnsemble,
    TeacherScorer,
)


def _config(n_items: int, **kw) -> TeacherConfig:
    base = dict(n_types=3, max_len=6, d_model=8, n_heads=2, n_layers=1, seen_bias=True)
    return TeacherConfig(n_items=n_items, **(base | kw))


def _net(n_items: int, seed: int = 0, **kw) -> SequentialTeacher:
    torch.manual_seed(seed)
    net = SequentialTeacher(_config(n_items, **kw)).eval()
    with torch.no_grad():
        net.seen_weight.fill_(0.7)  # a seen term that matters
        net.item_emb.weight.mul_(50)  # spread the scores
    return net


def _inputs(n_users: int, n_items: int, L: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros((n_users, 3, L), dtype=torch.int64)
    x[:, 0] = torch.randint(1, n_items, (n_users, L), generator=g)
    x[:, 1] = torch.randint(1, 3, (n_users, L), generator=g)
    x[:, 0, :2] = torch.where(torch.arange(n_users).unsqueeze(1) % 3 == 0, 0, x[:, 0, :2])
    x[:, 1] = torch.where(x[:, 0] > 0, x[:, 1], 0)
    return x


def _models(n: int) -> dict[str, torch.nn.Module]:
    catalogue = np.arange(3, n, 2)  # a segment student scoring every other item
    seg = Student(_config(len(catalogue) + 2), n, catalogue).eval()
    whole = Student(_config(n, d_model=4, n_heads=1), n, None).eval()
    int8 = student_from_arrays(*loads(quantized_bytes(seg)), "dequant")
    head = with_head(seg, item_bias=True, adapter_rank=2)  # a segment head: bias and adapter
    with torch.no_grad():
        head.net.item_bias.normal_(0, 30, generator=torch.Generator().manual_seed(3))
        head.net.adapter[1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    lowrank = Student(_config(n, d_model=8, item_rank=3), n, None).eval()  # a low-rank table
    with torch.no_grad():
        lowrank.net.item_emb.weight.mul_(20)
    return {
        "teacher": TeacherScorer(_net(n)).eval(),
        "ensemble": TeacherScorer(TeacherEnsemble([_net(n, 1), _net(n, 2)])).eval(),
        "segment_student": seg,
        "whole_student": whole,
        "int8_student": int8,
        "headed_student": head,
        "lowrank_student": lowrank,
    }


@pytest.mark.parametrize(
    "name",
    [
        "teacher",
        "ensemble",
        "segment_student",
        "whole_student",
        "int8_student",
        "headed_student",
        "lowrank_student",
    ],
)
def test_chunked_top_k_equals_dense_top_k_for_every_served_model(name):
    n = 203
    model = _models(n)[name]
    x = _inputs(17, n)
    ranker = ranking.ranker_for(model)
    assert not isinstance(ranker, ranking.DenseRanker)
    with torch.no_grad():
        dense = model(x)
        state = ranker.encode(x)
        for exclude in (None, x[:, 0]):
            want_v, want_i = ranking.dense_top_k(dense, 10, exclude)
            got_v, got_i = ranking.top_k(ranker, state, 10, exclude, chunk=16)
            finite = torch.isfinite(want_v)
            assert torch.equal(got_i[finite], want_i[finite])
            assert torch.allclose(got_v[finite], want_v[finite], atol=1e-5)
            assert torch.equal(torch.isfinite(got_v), finite)


def test_ties_go_to_the_lower_item_id_across_chunk_borders():
    scores = torch.tensor([[0.0, 1, 5, 5, 2, 5, 5, 0, 5, 1], [0.0, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    ranker = ranking.DenseRanker(lambda x: scores)
    state = ranker.encode(torch.zeros((2, 3, 1), dtype=torch.int64))
    for chunk in (1, 2, 3, 4, 10):
        v, i = ranking.top_k(ranker, state, 4, chunk=chunk)
        assert i.tolist() == [[2, 3, 5, 6], [1, 2, 3, 4]], chunk
        assert v[0].tolist() == [5.0] * 4
    assert ranking.dense_top_k(scores, 4)[1].tolist() == [[2, 3, 5, 6], [1, 2, 3, 4]]


def test_a_row_with_fewer_scorable_items_than_k_ends_in_minus_infinity():
    scores = torch.tensor([[0.0, 1.0, float("nan"), float("-inf")]])
    ranker = ranking.DenseRanker(lambda x: scores)
    v, i = ranking.top_k(
        ranker, ranker.encode(torch.zeros((1, 3, 1), dtype=torch.int64)), 3, chunk=2
    )
    assert i[0, 0] == 1 and v[0, 0] == 1.0
    assert torch.isinf(v[0, 1:]).all()


@pytest.mark.parametrize("cap", [None, 3, 20])
@pytest.mark.parametrize(
    "name", ["teacher", "ensemble", "segment_student", "headed_student", "lowrank_student"]
)
def test_chunked_target_ranks_equal_the_dense_protocol(name, cap):
    """Counted (``cap=None``) or capped (ranks past ``cap`` returned as ``cap``, from the
    running top ``cap + 1``): equal to the dense matrix's ranks."""
    n = 151
    model = _models(n)[name]
    x = _inputs(23, n, seed=5)
    targets = torch.randint(1, n, (23,), generator=torch.Generator().manual_seed(3))
    targets[0] = x[0, 0, -1]  # a target among the past items: never masked
    ranker = ranking.ranker_for(model)
    with torch.no_grad():
        dense = model(x)
        state = ranker.encode(x)
        targets[1:4] = masked_scores(dense, targets)[1:4].argmax(1)  # rank 0: under any cap
        for exclude in (None, x[:, 0]):
            s = masked_scores(dense, targets, exclude)
            ranks, top = ranking.target_ranks(ranker, state, targets, exclude, chunk=20, cap=cap)
            want_ranks = dense_ranks(s, targets)
            if cap is not None:
                assert (want_ranks < cap).any() and (want_ranks >= cap).any()
                want_ranks = want_ranks.clamp_max(cap)
            assert torch.equal(ranks, want_ranks)
            want = torch.topk(s, 10, dim=1)
            want_ids = torch.where(want.values > float("-inf"), want.indices, 0)
            # same sets of items (dense topk's tie order is unspecified)
            assert [sorted(r) for r in top.tolist()] == [sorted(r) for r in want_ids.tolist()]


@pytest.mark.parametrize("cap", [None, 20])
def test_a_baselines_float64_scores_are_ranked_in_float64(cap):
    """Popularity and Markov score in float64: two shares that float32 would merge keep
    their order (the target above the other is rank 0, not a tie)."""
    scores = torch.tensor([[0.0, 1.0, 1.0 + 1e-12, 0.5, 0.2]], dtype=torch.float64)
    ranker = ranking.DenseRanker(lambda x: scores)
    state = ranker.encode(torch.zeros((1, 3, 1), dtype=torch.int64))
    ranks, top = ranking.target_ranks(ranker, state, torch.tensor([2]), chunk=2, cap=cap)
    assert ranks.tolist() == [0]
    assert top[0, :2].tolist() == [2, 1]


def test_candidate_scores_equal_the_full_rows():
    n = 97
    for name, model in _models(n).items():
        x = _inputs(9, n, seed=7)
        cand = torch.randint(0, n, (9, 5), generator=torch.Generator().manual_seed(2))
        ranker = ranking.ranker_for(model)
        with torch.no_grad():
            got = ranking.score_items(ranker, x, cand, batch=4)
            want = model(x).gather(1, cand)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), name
        assert torch.allclose(got[finite], want[finite], atol=1e-5), name


def test_deleting_positions_shifts_every_row_like_one_row_at_a_time():
    x = _inputs(40, 30, seed=11)
    mask = torch.rand((40, 6), generator=torch.Generator().manual_seed(4)) < 0.3
    got = ranking.delete_positions(x, mask)
    for b in range(40):
        keep = ~mask[b] & (x[b, 0] > 0)
        kept = x[b][:, keep]
        want = torch.zeros_like(x[b])
        if kept.shape[1]:
            want[:, 6 - kept.shape[1] :] = kept
        assert torch.equal(got[b], want), b


def test_the_dynamic_int8_runtime_is_ranked_densely_and_still_equal():
    n = 61
    seg = Student(_config(n), n, None).eval()
    dyn = student_from_arrays(*loads(quantized_bytes(seg)), "dynamic")
    assert isinstance(dyn, Int8Student)
    ranker = ranking.ranker_for(dyn)
    assert isinstance(ranker, ranking.DenseRanker)
    x = _inputs(5, n)
    with torch.no_grad():
        v, i = ranking.top_k(ranker, ranker.encode(x), 5, chunk=7)
        assert torch.equal(i, ranking.dense_top_k(dyn(x), 5)[1])


def test_every_per_user_metric_comes_with_its_95_percent_interval():
    from patternlake.models.metrics import _metrics

    ranks = np.array([0, 3, 50, 1, 12, 9, 100, 0])
    m = _metrics(ranks, np.zeros((8, 10), dtype=np.int64), 200)
    hits = (ranks < 10).astype(float)
    half = 1.96 * hits.std(ddof=1) / np.sqrt(8)
    assert m["hr@10"] == round(hits.mean(), 6)
    assert m["hr@10_ci95_low"] == pytest.approx(hits.mean() - half, abs=1e-6)
    assert m["hr@10_ci95_high"] == pytest.approx(hits.mean() + half, abs=1e-6)
    for name in ("ndcg@10", "mrr@10", "ndcg@20", "hr@20"):
        assert m[f"{name}_ci95_low"] <= m[name] <= m[f"{name}_ci95_high"]


def test_target_ranks_match_the_dense_matrix_bit_for_bit_at_catalogue_scale():
    """The target's score is taken as the chunk's matrix product computes it: the estimate
    from ``items`` (another kernel) differs in the last bits, which moves ranks by one at
    this size. The dense matrix here is the same states against the whole item table."""
    n = 50_000
    for d, seed in ((64, 1), (32, 3), (128, 2)):
        model = TeacherScorer(_net(n, seed=seed, d_model=d, n_heads=2)).eval()
        x = _inputs(512, n, seed=9 + seed)
        targets = torch.randint(1, n, (512,), generator=torch.Generator().manual_seed(8))
        ranker = ranking.ranker_for(model)
        with torch.no_grad():
            state = ranker.encode(x)
            dense = ranker.chunk(state, 0, n)
            # half the targets among each row's 30 best: ranks below the cap occur
            near = dense.topk(30, dim=1).indices[torch.arange(512), torch.arange(512) % 30]
            targets = torch.where(torch.arange(512) % 2 == 0, near, targets)
            ranks, _ = ranking.target_ranks(ranker, state, targets, chunk=4096)
            capped, _ = ranking.target_ranks(ranker, state, targets, chunk=4096, cap=20)
        want = dense_ranks(masked_scores(dense, targets), targets)
        assert torch.equal(ranks, want), d
        assert torch.equal(capped, want.clamp_max(20)), d
