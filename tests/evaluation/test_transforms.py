"""The evaluation transforms on hand-made arrays and tiny fake models: windows, scorer routing,
baselines, report rows and the ranking metrics of a known ranking."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from patternlake.errors import PatternlakeError
from patternlake.evaluation.transforms import (
    NO_SEGMENT,
    baseline_scorers,
    model_report,
    model_reports,
    model_scorer,
    protocol,
    routed_scorer,
    scorers,
    segment_groups,
    window,
)
from patternlake.models.baselines import MarkovChain
from patternlake.models.metrics import ranker_ranks
from patternlake.models.ranking import DenseRanker
from patternlake.sequence_reader import training_arrays
from patternlake.sequence_schema import MIN_EVALUATED_EVENTS
from tests.training.handmade import SCHEMA

N_ITEMS = 12  # item ids 0 (padding) .. 11


class Fixed(torch.nn.Module):
    """Scores every user with one fixed row; records the input shape it was given."""

    def __init__(self, row: list[float], max_len: int | None = None, n_params: int = 3):
        super().__init__()
        self.row = torch.tensor(row)
        self.weight = torch.nn.Parameter(torch.zeros(n_params))
        self.config = SimpleNamespace(max_len=max_len) if max_len else None
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return self.row.expand(x.shape[0], -1).clone()

    def num_params(self) -> int:
        return self.weight.numel()


def test_window_is_the_models_max_len_or_the_wrapped_teachers_or_all():
    assert window(Fixed([0.0], max_len=4)) == 4
    assert window(SimpleNamespace(teacher=Fixed([0.0], max_len=7))) == 7  # a wrapper
    assert window(Fixed([0.0])) == 0  # no max_len: the whole input (x[..., -0:])


def test_segment_groups_default_to_no_segment():
    got = segment_groups(np.array(["a", "b", "c"], dtype=object), {"a": 2, "c": 0})
    assert got.tolist() == [2, NO_SEGMENT, 0]


def test_model_scorer_gives_the_model_its_own_tail_of_the_inputs():
    model = Fixed([0.0, 1.0, 2.0], max_len=2, n_params=5)
    stacked = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)  # (n, 3, L=4)
    rank, params, nbytes = model_scorer(model, stacked)
    ranks, top = rank(slice(0, 2), torch.tensor([2, 1]), None)
    assert model.seen == [(2, 3, 2)] and ranks.tolist() == [0, 1]
    assert top.tolist() == [[2, 1, 0]] * 2  # padding (0) is never ranked: it closes the row
    assert params == 5 and nbytes > 0


def test_routed_scorer_scores_each_user_with_their_segments_model_else_the_fallback():
    a, b = Fixed([0.0, 3.0, 1.0], n_params=4), Fixed([0.0, 0.0, 5.0], n_params=9)
    stacked = np.zeros((3, 3, 2), dtype=np.int64)
    groups = np.array([1, 2, 1])
    rank, params, nbytes = routed_scorer({1: (a, 100)}, b, stacked, groups)
    ranks, top = rank(slice(0, 3), torch.tensor([2, 1, 1]), None)
    assert ranks.tolist() == [1, 1, 0] and top[:, 0].tolist() == [1, 2, 1]
    assert a.seen == [(2, 3, 2)] and b.seen == [(1, 3, 2)]  # users 0 and 2; user 1
    assert (params, nbytes) == (4, 100)  # what serving the routed models costs: not b
    orphan, _, _ = routed_scorer({1: (a, 100)}, None, stacked, groups)
    with pytest.raises(PatternlakeError, match="no model for segment 2"):
        orphan(slice(0, 3), torch.tensor([1, 1, 1]), None)


def sequences_table() -> pa.Table:
    rows = [
        # evaluable: 4 and 5 are the validation and test targets, training part 1 2 3
        ("u1", 5, [1, 2, 3, 4, 5], 4, 5),
        ("u2", 2, [2, 3], None, None),  # not evaluable: all of it trains
    ]
    return pa.Table.from_pylist(
        [
            {
                "user_id": u,
                "n_events": n,
                "item_seq": s,
                "type_seq": [1] * n,
                "gap_seq": [0] * n,
                "time_seq": list(range(n)),
                "valid_item": v,
                "test_item": t,
            }
            for u, n, s, v, t in rows
        ],
        schema=SCHEMA,
    )


def test_baselines_fit_on_the_training_parts_only():
    items = np.array([[0, 1, 2], [0, 2, 1], [0, 0, 3]])  # the evaluated users' inputs
    found = baseline_scorers(sequences_table(), 6, 3, items)
    assert list(found) == ["popularity", "markov"]
    pop, pop_params, _ = found["popularity"]
    # training events: 1 2 3 (u1, its targets 4 and 5 left out) and 2 3 (u2)
    # counts [0, 1, 2, 2, 0, 0]: item 1 ranks after 2 and 3, item 3 ties with 2 (ties
    # count against the target)
    ranks, top = pop(slice(0, 2), torch.tensor([1, 3]), None)
    assert ranks.tolist() == [2, 1] and top[0].tolist()[:3] == [2, 3, 1] and pop_params == 6
    markov, markov_params, _ = found["markov"]
    # transitions 1 -> 2 once, 2 -> 3 twice; + 0.001 * popularity share (counts / 5)
    expected = [
        [0, 0.0002, 0.0004, 1.0004, 0, 0],  # last item 2
        [0, 0.0002, 1.0004, 0.0004, 0, 0],  # last item 1
        [0, 0.0002, 0.0004, 0.0004, 0, 0],  # last item 3: never followed, popularity only
    ]
    ranks, top = markov(slice(0, 3), torch.tensor([3, 2, 3]), None)
    assert ranks.tolist() == [0, 0, 1]
    assert top.tolist() == [[3, 2, 1, 4, 5, 0], [2, 3, 1, 4, 5, 0], [2, 3, 1, 4, 5, 0]]
    chain = MarkovChain(6).fit(*training_arrays(sequences_table(), 3)[::3])
    chunks = [chain.ranker().chunk(items, lo, min(6, lo + 4)) for lo in (0, 4)]
    dense = chain.scores(items)
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-5, atol=1e-7)
    dense[:, 0] = float("-inf")
    assert torch.equal(torch.cat(chunks, 1), dense)  # item chunks are the dense rows
    assert markov_params == 2


def test_scorers_in_report_order_and_routed_only_with_a_segment_model():
    stacked = np.zeros((1, 3, 2), dtype=np.int64)
    teacher = Fixed([0.0, 1.0])
    baseline = {"popularity": (None, 1, 1), "markov": (None, 2, 2)}
    routed = {"student": {3: (Fixed([1.0, 0.0]), 10)}, "student_int8": {}}
    got = scorers(baseline, {"teacher": teacher}, routed, stacked, np.array([3]))
    assert list(got) == ["popularity", "markov", "student", "teacher"]


def test_protocol_counts_items_without_padding():
    assert protocol(True, 7, N_ITEMS) == {
        "split": "leave-last-out test",
        "min_events": MIN_EVALUATED_EVENTS,
        "ranking": "full catalogue",
        "mask_history": True,
        "users": 7,
        "items": N_ITEMS - 1,
    }


def test_model_report_sizes_per_segment_a_routed_model_falls_back_to_the_teachers():
    per = {"-1": {"users": 1}, "1": {"users": 2}, "2": {"users": 1}}
    groups = np.array([1, 2, -1, 1])
    plain = model_report({"ndcg@10": 0.5}, per, 50, 999, groups)
    assert plain["params"] == 50 and plain["bytes"] == 999 and plain["overall"] == {"ndcg@10": 0.5}
    assert all(s["params"] == 50 and s["bytes"] == 999 for s in plain["segments"].values())
    assert "teacher_segments" not in plain
    student = Fixed([0.0], n_params=4)
    routed = model_report({}, per, 4, 100, groups, routed={1: (student, 100)}, teacher=(50, 999))
    assert routed["segments"] == {
        "-1": {"users": 1, "params": 50, "bytes": 999},  # no segment: the teacher serves
        "1": {"users": 2, "params": 4, "bytes": 100},
        "2": {"users": 1, "params": 50, "bytes": 999},
    }
    assert routed["teacher_segments"] == [-1, 2]


def scores_ranking(targets: list[int], above: int) -> torch.Tensor:
    """(n, N_ITEMS) scores with ``above`` items scored over each user's target."""
    s = torch.zeros(len(targets), N_ITEMS)
    for u, t in enumerate(targets):
        s[u, t] = 5.0
        for k in range(above):
            s[u, 1 + (t + k) % (N_ITEMS - 1)] = 9.0 + k  # never item 0 nor the target
    return s


def test_model_reports_rank_the_targets():
    targets = np.array([3, 5, 7])
    groups = np.array([1, 1, 2])

    def ranked(place: int):
        ranker = DenseRanker(lambda x: scores_ranking(x.tolist(), place))
        return ranker_ranks(ranker, lambda s: torch.from_numpy(targets[s]))

    scored = {"first": (ranked(0), 1, 1), "second": (ranked(1), 1, 1)}
    out = model_reports(scored, targets, groups, N_ITEMS, 2, None, {})
    first, second = out["first"]["overall"], out["second"]["overall"]
    assert (first["ndcg@10"], first["hr@10"], first["mrr@10"]) == (1.0, 1.0, 1.0)
    # every target second: NDCG 1 / log2(3), MRR 1/2
    assert second["ndcg@10"] == pytest.approx(1 / math.log2(3), abs=1e-6)
    assert (second["hr@10"], second["mrr@10"]) == (1.0, 0.5)
    assert out["second"]["segments"]["1"]["users"] == 2
    assert out["second"]["segments"]["2"]["users"] == 1
