"""Ranking metrics and baselines on tiny hand-made scores."""

import numpy as np
import torch

from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.models.metrics import evaluate_scorer

NAN, INF = float("nan"), float("inf")


def metrics_of(scores: list[list[float]], targets: list[int]) -> dict[str, float]:
    s = torch.tensor(scores)
    overall, _ = evaluate_scorer(
        lambda sl: s[sl], len(targets), np.array(targets), np.zeros(len(targets)), s.shape[1]
    )
    return overall


def test_a_target_scored_nan_or_inf_ranks_last_never_as_a_hit():
    n = 12
    for bad in (NAN, INF, -INF):
        scores = [[0.0] + [float(j) for j in range(1, n)]]
        scores[0][3] = bad
        m = metrics_of(scores, [3])
        assert m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["mrr@10"] == 0.0, bad
        assert all(np.isfinite(v) for v in m.values())


def test_items_scored_nan_never_outrank_the_target_nor_enter_the_top_10():
    n = 12
    scores = [[NAN] * n]  # a diverged model: everything NaN but the target
    scores[0][5] = 1.0
    m = metrics_of(scores, [5])
    assert m["hr@10"] == 1.0 and m["ndcg@10"] == 1.0
    assert m["coverage@10"] == round(1 / (n - 1), 6)  # only the target is in a top 10


def test_an_all_nan_model_scores_zero():
    m = metrics_of([[NAN] * 30, [NAN] * 30], [1, 7])
    assert m["hr@10"] == m["ndcg@10"] == m["hr@20"] == m["coverage@10"] == 0.0


def test_popularity_counts_each_users_first_item():
    # left-padded training inputs and their next-item targets: user A saw 5 then 7,
    # user B (a full row) saw 3, 4, 5, 6
    items = np.array([[0, 0, 5], [3, 4, 5]])
    targets = np.array([[0, 0, 7], [4, 5, 6]])
    pop = Popularity(8).fit(items, targets)
    assert pop.counts.tolist() == [0, 0, 0, 1, 1, 2, 1, 1]
    # the Markov chain backs off to the same counts
    assert MarkovChain(8).fit(items, targets).pop.counts.tolist() == pop.counts.tolist()
