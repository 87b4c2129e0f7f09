"""The evaluation as a Spark job equals the one-process evaluation on the trained test lake:
the teacher, the routed fp32 and int8 students, both baselines (fitted in Spark), every
metric with its interval, overall and per segment; and the user sample."""

from __future__ import annotations

import math

import pytest

from patternlake.evaluation.distributed import baseline_tables, sample_users
from patternlake.evaluation.evaluate import evaluate_models
from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.sequence_reader import first_training_items, read_table, training_arrays
from tests.conftest import with_overrides


def _same(a, b, path=""):
    """Equal reports; floats to 1e-6 (Spark and numpy sum in different orders)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: {sorted(set(a) ^ set(b))}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, abs_tol=2e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.mark.slow
@pytest.mark.parametrize("mask_history", [False, True])
def test_spark_evaluation_equals_the_one_process_evaluation(spark, trained_lake, mask_history):
    cfg, lake, *_ = trained_lake
    reports = {
        engine: evaluate_models(
            spark,
            lake,
            with_overrides(cfg, evaluate={"engine": engine, "mask_history": mask_history}),
        )
        for engine in ("local", "spark")
    }
    local, distributed = reports["local"], reports["spark"]
    for report in (local, distributed):  # timed: each engine its own, every model's > 0
        assert all(m.pop("users_per_s") > 0 for m in report["models"].values())
    assert {"teacher", "student", "student_int8", "popularity", "markov"} <= set(local["models"])
    assert list(distributed["models"]) == list(local["models"])  # same order
    _same(distributed, local)
    teacher = distributed["models"]["teacher"]["overall"]
    assert teacher["users"] == local["protocol"]["users"] > 0
    assert teacher["ndcg@10_ci95_low"] < teacher["ndcg@10"] < teacher["ndcg@10_ci95_high"]


@pytest.mark.slow
def test_baselines_fitted_in_spark_equal_the_fitted_arrays(spark, trained_lake):
    cfg, lake, *_ = trained_lake
    table = read_table(lake.files("user_sequences"))
    items, _, _, targets = training_arrays(table, 50)
    n = int(max(items.max(), targets.max())) + 1
    firsts = first_training_items(table)
    pop = Popularity(n).fit(items, targets, firsts)
    markov = MarkovChain(n).fit(items, targets, firsts)

    popularity, rows = baseline_tables(lake.read("user_sequences"), successors=3)
    counts = {r.item_idx: r["count"] for r in popularity.collect()}
    assert counts == {i: int(c) for i, c in enumerate(pop.counts) if c > 0}
    t = markov.transitions.tocsr()
    for r in rows.collect():
        full = t[r.last_item].toarray()[0]
        assert r.succ_total == full.sum() and r.succ_distinct == (full > 0).sum()
        # the 3 most frequent successors, ties to the lower id, in id order
        top = sorted(sorted(range(n), key=lambda j: (-full[j], j))[: min(3, (full > 0).sum())])
        assert list(r.succ_items) == top
        assert list(r.succ_counts) == [int(full[j]) for j in top]
    assert rows.count() == len(set(t.nonzero()[0]))


@pytest.mark.slow
def test_a_user_sample_is_the_same_users_every_time_and_about_the_size_asked(spark, trained_lake):
    cfg, lake, *_ = trained_lake
    users = lake.read("user_sequences").where("valid_item is not null")
    total = users.count()
    first = {r.user_id for r in sample_users(users, total // 4, 0).collect()}
    again = {r.user_id for r in sample_users(users.repartition(3), total // 4, 0).collect()}
    assert first == again
    assert 0.5 * total / 4 < len(first) < 1.5 * total / 4
    assert sample_users(users, 0, 0).count() == total  # 0: everyone
    report = evaluate_models(
        spark, lake, with_overrides(cfg, evaluate={"sample_users": total // 4})
    )
    assert report["protocol"]["users"] == len(first)
    assert report["protocol"]["sample_users"] == total // 4
    assert report["models"]["teacher"]["overall"]["users"] == len(first)


@pytest.mark.slow
def test_the_ranking_task_raises_no_warning(spark, trained_lake):
    """The task's Arrow columns are read-only buffers: turning them into tensors must not
    warn (a Python worker's warning reaches the user's terminal on every batch)."""
    import warnings

    import numpy as np

    from patternlake.evaluation import distributed as job

    cfg, lake, *_ = trained_lake
    sequences = lake.read("user_sequences")
    popularity, markov = job.baseline_tables(sequences, 10)
    n_items = int(sequences.selectExpr("max(array_max(item_seq))").first()[0]) + 2
    counts = job.counts_vector(popularity, n_items)
    inputs = job.test_inputs(sequences, None, markov, 50).limit(40).toArrow()
    payload = {"n_items": n_items, "max_len": 50, "mask_history": True, "counts": counts,
               "models": {}, "routed": {}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = list(job.rank_batches(iter(inputs.to_batches()), payload))
    ranks = np.concatenate([b.column("rank").to_numpy() for b in out])
    assert len(ranks) == 2 * inputs.num_rows and (ranks >= 0).all()
