"""Segment heads on the trained daily lake (a copy): trained as Spark tasks on the stored
teacher top-K, judged against the shared student on each segment's gate users, kept only
where they win, and served by score and evaluate on top of the shared file counted once."""

from __future__ import annotations

import pytest
import torch

from patternlake import registry
from patternlake.models.store import loads
from patternlake.models.student import from_bytes, head_params, is_head_tensor, with_head
from patternlake.sequence_reader import COLUMNS, SOFT_COLUMNS, read_table
from patternlake.students.heads import fit_head, heads, settings
from patternlake.students.topk import TABLE
from tests.conftest import copy_trained_lake, with_overrides


@pytest.fixture(scope="module")
def served(trained_lake, tmp_path_factory):
    """A copy of the trained lake where the shared fp32 student serves every segment (as
    when it passes the gate): what heads specialise."""
    cfg, lake, _ = copy_trained_lake(trained_lake, tmp_path_factory.mktemp("heads"))
    good = trained_lake[5]
    segments = sorted(good["segments"])
    for g in segments:
        registry.set_champion(cfg, g, good["registered_version"])
    return cfg, lake, good, segments


def _head_rows(lake) -> list:
    return [
        r
        for r in lake.read("model_decisions").where("stage = 'heads'").collect()
        if r.segment_id >= 0
    ]


@pytest.mark.slow
def test_heads_that_do_not_help_are_dropped_and_the_shared_student_keeps_serving(served):
    cfg, lake, good, segments = served
    still = with_overrides(cfg, heads={"lr": 1e-12, "epochs": 2, "patience": 1})
    out = heads(lake.spark, lake, still)
    assert out["heads"] == 0
    rows = _head_rows(lake)
    assert {r.segment_id for r in rows} == set(segments)
    for r in rows:
        assert not r.promoted and r.champion == f"student v{good['registered_version']}"
        assert r.registered_version is not None and r.bytes > 0
    for g in segments:  # the aliases did not move
        assert str(registry.champion_version(cfg, g).version) == good["registered_version"]


@pytest.mark.slow
def test_a_kept_head_serves_its_segment_and_the_fleet_counts_the_shared_file_once(served):
    from patternlake.evaluation.evaluate import evaluate_models
    from patternlake.scoring.score import score_users

    cfg, lake, good, segments = served
    eager = with_overrides(cfg, heads={"gate": 0.01})  # keep any head that trained
    out = heads(lake.spark, lake, eager)
    kept = {int(g): d for g, d in out["segments"].items() if d.get("promoted")}
    assert kept, out  # some segment's head improved on its tune users
    base_file = registry.version_file(cfg, registry.STUDENT, good["registered_version"])
    base_bytes = base_file.stat().st_size
    head_bytes = {}
    for g, d in kept.items():
        mv = registry.champion_version(cfg, g)
        assert str(mv.version) == d["registered_version"] and mv.tags["variant"] == "head"
        assert mv.tags["base_version"] == good["registered_version"]
        data, base = registry.student_files(cfg, mv.version)
        assert base == base_file.read_bytes() and len(data) < base_bytes / 2
        head_bytes[g] = len(data)
        model = from_bytes(data, base=base)
        assert model.config.item_bias and model.config.adapter_rank == cfg.heads.adapter_rank
    # evaluate: the fleet is the shared file once plus each kept head's own file
    report = evaluate_models(lake.spark, lake, cfg)
    fleet = report["models"]["fleet"]
    assert fleet["bytes"] == base_bytes + sum(head_bytes.values())
    for g, nbytes in head_bytes.items():  # what the segment needs: its head and the base
        assert fleet["segments"][str(g)]["bytes"] == nbytes + base_bytes
    assert fleet["users_per_s"] > 0
    assert {report["champions"][str(g)] for g in kept} == {
        f"student-head v{kept[g]['registered_version']}" for g in kept
    }
    # score serves the head where it was kept, the shared student elsewhere
    run = score_users(lake.spark, lake, cfg)["run_id"]
    rows = lake.read("user_patterns").where(f"fallback = false AND run_id = '{run}'")
    names = {(r.segment_id, r.model_name) for r in rows.collect()}  # this run's rows only
    assert names
    for g, name in names:
        assert name == ("student-head" if g in kept else "student")
    # a rerun decides every segment again, against the shared student under its head
    still = with_overrides(cfg, heads={"lr": 1e-12, "epochs": 2, "patience": 1})
    again = heads(lake.spark, lake, still)
    assert set(again["segments"]) == set(out["segments"]) and again["heads"] == 0
    for g in segments:
        assert str(registry.champion_version(cfg, g).version) == good["registered_version"]


@pytest.mark.slow
def test_a_head_learns_what_its_base_misses_and_changes_nothing_else(served):
    """A base whose item table is zeroed scores every item alike (scaling the table would
    not do: the ranking is scale-free); the head's item bias learns the popular items, so its
    tune NDCG@10 rises well above the base's, and no tensor of the base changes."""
    cfg, lake, good, segments = served
    base = registry.load_student(cfg, good["registered_version"])
    with torch.no_grad():
        base.net.item_emb.weight.zero_()
        if base.config.seen_bias:
            base.net.seen_weight.zero_()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    table = read_table(lake.files(TABLE, lake.version(TABLE)), COLUMNS + SOFT_COLUMNS)
    L = base.config.max_len
    stride = min(cfg.train.window_stride, L) or L  # as the stored top-K was cut
    s = settings(cfg, stride) | {"segment": 0, "base_version": "1"}
    out = fit_head(base, table, s | {"epochs": 4, "patience": 4, "valid_users": 10_000})
    assert out["tune_users"] > 20 and out["targets"] > 0
    assert out["best_epoch"] > 0 and out["tune_ndcg"] > out["base_ndcg"] + 0.05, out
    for name, value in base.state_dict().items():  # training touched no tensor of the base
        assert torch.equal(value, before[name]), name
    tensors, _ = loads(out["head"])  # the file holds the head only
    assert tensors and all(is_head_tensor(k) for k in tensors)
    trained = from_bytes(out["head"], base=base.to_bytes())
    assert float(trained.net.item_bias.detach().abs().max()) > 0


def test_a_fresh_head_scores_exactly_as_its_base_and_trains_only_its_own_tensors():
    from patternlake.models.student import Student
    from patternlake.models.teacher import TeacherConfig

    c = TeacherConfig(n_items=40, n_types=3, max_len=6, d_model=8, n_heads=2, n_layers=1,
                      seen_bias=True)  # fmt: skip
    torch.manual_seed(0)
    base = Student(c, 40, None).eval()
    head = with_head(base, item_bias=True, adapter_rank=2)
    x = torch.randint(1, 40, (7, 3, 6))
    x[:, 1] %= 3
    x[:, 2] %= 4
    with torch.no_grad():
        assert torch.equal(head(x), base(x))
    names = {n for n, p in head.named_parameters() if any(p is q for q in head_params(head))}
    assert names == {
        "net.ln.weight",
        "net.ln.bias",
        "net.item_bias",
        "net.adapter.0.weight",
        "net.adapter.1.weight",
    }
    from patternlake.models.student import head_bytes

    with pytest.raises(ValueError, match="base student"):
        from_bytes(head_bytes(head, "3"))
    # the body is the base's own storage: heads of one base hold it once
    assert head.net.item_emb.weight.data_ptr() == base.net.item_emb.weight.data_ptr()
    assert head.net.ln.weight.data_ptr() != base.net.ln.weight.data_ptr()
