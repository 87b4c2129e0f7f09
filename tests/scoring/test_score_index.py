"""``score.index: faiss`` inside the scoring task: an exhaustive index gives exact scoring's
rows, the index is built once per worker and model, a model that is not a dot product stays
exact with one log line, and a bad setting fails with its key."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from patternlake.config import load_config
from patternlake.errors import ConfigError
from patternlake.models import ranking
from patternlake.models.teacher import (
    SequentialTeacher,
    TeacherConfig,
    TeacherEnsemble,
    TeacherScorer,
    teacher_bytes,
)
from patternlake.scoring import score

L = 12


def _teacher(n_items: int, seed: int = 0) -> SequentialTeacher:
    torch.manual_seed(seed)
    c = TeacherConfig(
        n_items=n_items, n_types=3, max_len=L, d_model=16, n_heads=2, n_layers=1, seen_bias=True
    )
    net = SequentialTeacher(c).eval()
    with torch.no_grad():
        net.seen_weight.fill_(0.5)
        net.item_emb.weight.mul_(20)
    return net


def _batches(n_items: int, users: int = 96, size: int = 32) -> list[pd.DataFrame]:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, n_items, rng.integers(1, L + 1)).tolist() for _ in range(users)]
    frame = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(users)],
            "segment_id": [0] * users,
            "item_seq": seqs,
            "type_seq": [[1] * len(s) for s in seqs],
            "gap_seq": [[1] * len(s) for s in seqs],
            "recent_names": [[(i, str(i)) for i in s] for s in seqs],
        }
    )
    return [frame.iloc[lo : lo + size] for lo in range(0, users, size)]


def _settings(**kw) -> dict:
    return dict(
        top_k=10, min_history=1, exclude_seen=True, explain_events=4, explain_top=2,
        pattern_window=20, index="exact", faiss_nlist=0, faiss_nprobe=64,
    ) | kw  # fmt: skip


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_an_exhaustive_faiss_index_gives_the_exact_rows(caplog, monkeypatch, exclude_seen):
    monkeypatch.setattr(score, "_WORKER_MODELS", {})  # a fresh Python worker
    n = 2_000
    payload = {
        "teacher": teacher_bytes(_teacher(n)), "teacher_version": "1", "students": {},
        "runtime": "dequant", "max_len": L, "data_version": 0,
    }  # fmt: skip
    popular = {score.NO_SEGMENT: [(i, 0.01) for i in range(1, 300)]}

    def run(**kw) -> pd.DataFrame:
        settings = _settings(exclude_seen=exclude_seen, **kw)
        frames = score.score_batches(iter(_batches(n)), "d", payload, popular, {}, settings)
        return pd.concat(list(frames), ignore_index=True)

    exact = run()
    with caplog.at_level(logging.INFO, logger="patternlake.scoring.score"):
        approx = run(index="faiss", faiss_nprobe=10_000)  # every list: exhaustive
    built = [r for r in caplog.records if "faiss IVF-Flat over 1999 items" in r.getMessage()]
    assert len(built) == 1  # three batches, one index
    assert not exact["fallback"].any()
    cols = ["user_id", "rank", "item_idx", "fallback", "model_name"]
    pd.testing.assert_frame_equal(approx[cols], exact[cols])
    np.testing.assert_allclose(approx["score"], exact["score"], rtol=1e-5, atol=1e-4)
    assert (approx["explanation"].map(len) == exact["explanation"].map(len)).all()
    # 2 lists out of 179 (random weights: no clusters): other items, still K per user,
    # never padding, never a past item where those are excluded
    few = run(index="faiss", faiss_nprobe=2)
    assert len(few) == len(exact) and (few["item_idx"] > 0).all()
    assert (few["item_idx"] != exact["item_idx"]).mean() > 0.5
    if exclude_seen:
        users = pd.concat(_batches(n))
        past = dict(zip(users["user_id"], users["item_seq"].map(set), strict=True))
        assert not any(i in past[u] for u, i in zip(few["user_id"], few["item_idx"], strict=True))


def test_a_model_that_is_not_a_dot_product_stays_exact(caplog):
    n = 300
    ensemble = TeacherScorer(TeacherEnsemble([_teacher(n, 1), _teacher(n, 2)])).eval()
    served = score.Served(ranking.ranker_for(ensemble), "teacher", "1", L, n)
    x = torch.zeros((8, 3, L), dtype=torch.int64)
    x[:, 0] = torch.randint(1, n, (8, L), generator=torch.Generator().manual_seed(0))
    x[:, 1] = 1
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="patternlake.scoring.score"):
        state = served.ranker.encode(x)
        want = ranking.top_k(served.ranker, state, 10)
        for _ in range(2):
            got = score.model_top_k(served, state, 10, None, _settings(index="faiss"))
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    lines = [r for r in caplog.records if "not a dot-product model" in r.getMessage()]
    assert len(lines) == 1 and served.index is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("score.index=annoy", "score.index: Input should be 'exact' or 'faiss'"),
        ("score.faiss_nprobe=0", "score.faiss_nprobe: Input should be greater than 0"),
        ("score.faiss_nlist=-1", "score.faiss_nlist: Input should be greater than or equal to 0"),
    ],
)
def test_bad_index_settings_fail_with_their_key(override, message):
    with pytest.raises(ConfigError, match="bad configuration") as err:
        load_config(overrides=[override], environ={})
    assert message in str(err.value)
    assert load_config(environ={}).score.index == "exact"
