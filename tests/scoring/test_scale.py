"""Scoring at catalogue scale: explanations that score only the recommended items equal the
full-catalogue occlusion, and the scoring task runs under an address-space ceiling that one
(batch x catalogue) matrix would exceed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace

import torch

from patternlake.models import ranking
from patternlake.models.teacher import SequentialTeacher, TeacherConfig, TeacherScorer
from patternlake.scoring.transforms import normalise, occlusion


def _teacher(n_items: int, seed: int = 0) -> TeacherScorer:
    torch.manual_seed(seed)
    c = TeacherConfig(
        n_items=n_items, n_types=3, max_len=12, d_model=16, n_heads=2, n_layers=2, seen_bias=True
    )
    net = SequentialTeacher(c).eval()
    with torch.no_grad():
        net.seen_weight.fill_(0.5)
        net.item_emb.weight.mul_(20)
    return TeacherScorer(net).eval()


def _full_catalogue_occlusion(model, x, items, last):
    """The reference: every deleted history scored over the whole catalogue, one row at a
    time deleted in a Python loop."""
    B, _, L = x.shape
    base = model(x).gather(1, items)
    drops = torch.zeros((B, items.shape[1], last))
    for j in range(last):
        p = L - 1 - j
        deleted = torch.zeros_like(x)
        for b in range(B):
            keep = (x[b, 0] > 0) & (torch.arange(L) != p)
            kept = x[b][:, keep]
            if kept.shape[1]:
                deleted[b, :, L - kept.shape[1] :] = kept
        s = model(deleted).gather(1, items)
        d = torch.where(torch.isfinite(s), base - s, torch.zeros_like(s))
        drops[:, :, j] = torch.where((x[:, 0, p] > 0).unsqueeze(1), d, torch.zeros_like(d))
    return drops


def test_candidate_only_explanations_equal_full_catalogue_occlusion():
    n = 500
    model = _teacher(n)
    g = torch.Generator().manual_seed(3)
    x = torch.zeros((31, 3, 12), dtype=torch.int64)
    x[:, 0] = torch.randint(1, n, (31, 12), generator=g)
    x[:, 1] = torch.randint(1, 3, (31, 12), generator=g)
    x[:, 2] = torch.randint(0, 5, (31, 12), generator=g)
    for b in range(0, 31, 4):  # short histories: left padding
        x[b, :, : b % 10] = 0
    ranker = ranking.ranker_for(model)
    with torch.no_grad():
        _, ids = ranking.top_k(ranker, ranker.encode(x), 10, chunk=64)
        want = _full_catalogue_occlusion(model, x, ids, 8)
        got = occlusion(ranker, x, ids, 8, batch=40)
    assert torch.allclose(got, want, atol=1e-4)
    w_idx, w = normalise(want, 3)
    g_idx, gw = normalise(got, 3)
    assert torch.allclose(gw, w, atol=1e-4)
    assert torch.equal(g_idx[w > 0], w_idx[w > 0])


def test_cached_prefix_explanations_equal_encoding_every_deleted_history():
    """The SequentialTeacher family encodes the deletions against a cached prefix
    (``encode_deletions``); the generic path (any model: each deleted history encoded
    whole) gives the same drops, for the teacher and a segment student, every position of
    the window deleted in turn, short histories included."""
    import numpy as np

    from patternlake.models.student import Student

    n = 300
    catalogue = np.arange(3, n, 2)
    c = TeacherConfig(n_items=len(catalogue) + 2, n_types=3, max_len=12, d_model=16,
                      n_heads=2, n_layers=3, seen_bias=True)  # fmt: skip
    torch.manual_seed(4)
    student = Student(c, n, catalogue).eval()
    with torch.no_grad():
        student.net.seen_weight.fill_(-0.4)
    g = torch.Generator().manual_seed(5)
    x = torch.zeros((23, 3, 12), dtype=torch.int64)
    x[:, 0] = torch.randint(1, n, (23, 12), generator=g)
    x[:, 1] = torch.randint(1, 3, (23, 12), generator=g)
    x[:, 2] = torch.randint(0, 5, (23, 12), generator=g)
    x[:, 0, 5] = x[:, 0, 9]  # an item twice in the window: the seen term after a deletion
    for b in range(0, 23, 3):
        x[b, :, : b % 12] = 0
    from patternlake.models.student import with_head

    head = with_head(student, item_bias=True, adapter_rank=3)
    with torch.no_grad():
        head.net.item_bias.normal_()
        head.net.adapter[1].weight.normal_(0, 0.3)
    low = Student(replace(c, item_rank=5), n, catalogue).eval()  # a low-rank item table
    with torch.no_grad():
        low.net.seen_weight.fill_(0.3)
    for model in (_teacher(n, seed=2), student, head, low):
        ranker = ranking.ranker_for(model)
        assert isinstance(ranker, ranking.DotRanker)
        generic = ranking.DenseRanker(model, n)
        with torch.no_grad():
            _, ids = ranking.top_k(ranker, ranker.encode(x), 5, chunk=64)
            want = occlusion(generic, x, ids, 12, batch=16)
            got = occlusion(ranker, x, ids, 12, batch=16)
        assert (want != 0).float().mean() > 0.5
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


CEILING = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, pandas as pd, torch
    from patternlake.models.teacher import SequentialTeacher, TeacherConfig, teacher_bytes
    from patternlake.scoring.score import score_batches

    n_items, users = 200_000, 1024
    torch.manual_seed(0)
    c = TeacherConfig(n_items=n_items, n_types=3, max_len=20, d_model=16, n_heads=2,
                      n_layers=1, seen_bias=True)
    payload = {"teacher": teacher_bytes(SequentialTeacher(c).eval()), "teacher_version": "1",
               "students": {}, "runtime": "dequant", "max_len": 20, "data_version": 0}
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, n_items, 20).tolist() for _ in range(users)]
    batch = pd.DataFrame({
        "user_id": [f"u{i}" for i in range(users)], "segment_id": [0] * users,
        "item_seq": seqs, "type_seq": [[1] * 20] * users, "gap_seq": [[1] * 20] * users,
        "recent_names": [[(i, str(i)) for i in s] for s in seqs],
    })
    settings = dict(top_k=10, min_history=1, exclude_seen=True, explain_events=20,
                    explain_top=3, pattern_window=20)
    # the address space now + what the task may add: less than one (users x catalogue)
    # float32 matrix (819 MB), let alone the copies dense scoring made of it
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = vm + int(sys.argv[1]) * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = next(score_batches(iter([batch]), "d", payload, {}, {}, settings))
    assert len(out) == users * 10, len(out)
    assert out["explanation"].map(len).gt(0).mean() > 0.5
    print("ok", len(out))
    """
)


def test_scoring_a_large_catalogue_completes_under_a_memory_ceiling():
    """200k items, 1,024 users in one Arrow batch, the worker's address space capped at
    +600 MB: a (1024 x 200k) float32 matrix is 819 MB, so scoring that held one fails."""
    env = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", CEILING, "600"], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0 and "ok 10240" in run.stdout, run.stderr[-3000:]
