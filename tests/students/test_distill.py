"""distill -> compress -> evaluate -> models on the generated daily lake, with a real
teacher (single process, a few epochs), real Spark tasks and a real MLflow registry."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from patternlake import registry
from patternlake.models.student import count_params, from_bytes, quantized_bytes
from patternlake.models.teacher import TeacherConfig
from patternlake.students.segment_training import SegmentData, segment_table


@pytest.fixture(scope="module")
def students(trained_lake):
    return trained_lake


@pytest.mark.slow
def test_a_weak_student_is_refused_and_the_segment_keeps_the_teacher(students):
    cfg, lake, _, weak, weak_champions, _, _ = students
    for g, r in weak["segments"].items():
        assert r["promoted"] is False and r["champion"] == "teacher", (g, r)
        assert weak_champions[g] is None  # no champion alias: the teacher serves
    rows = lake.read("model_decisions").where("stage = 'distill'").collect()
    refused = [
        r
        for r in rows
        if r.registered_version in {s["registered_version"] for s in weak["segments"].values()}
    ]
    assert refused and all(not r.promoted and r.champion == "teacher" for r in refused)
    assert all(r.model_ndcg_at_10 < cfg.students.gate * r.reference_ndcg_at_10 for r in refused)


@pytest.mark.slow
def test_students_train_in_parallel_spark_tasks_one_per_segment(students, capsys):
    cfg, lake, teacher, _, _, good, _ = students
    segs = sorted(r[0] for r in lake.read("segments").select("segment_id").distinct().collect())
    assert sorted(good["segments"]) == segs and len(segs) >= 3
    spans = [(r["task_started"], r["task_finished"], r["pid"]) for r in good["segments"].values()]
    overlapping = any(
        a[0] < b[1] and b[0] < a[1] and a[2] != b[2]
        for i, a in enumerate(spans)
        for b in spans[i + 1 :]
    )
    assert overlapping, spans  # two segments trained at the same time, in two Python workers
    with capsys.disabled():
        for g, r in sorted(good["segments"].items()):
            print(
                f"\nsegment {g}: student {r['params']} params vs teacher {r['teacher_params']}; "
                f"validation NDCG@10 {r['best_valid_ndcg@10']:.4f} vs teacher "
                f"{r['teacher_valid_ndcg@10']:.4f} -> {r['champion']}"
            )


@pytest.mark.slow
def test_every_student_is_within_the_size_budget(students):
    cfg, _, teacher, _, _, good, _ = students
    budget = cfg.students.max_param_ratio * teacher["params"]
    for r in good["segments"].values():
        assert r["params"] <= budget
        assert r["params"] == count_params(TeacherConfig(**r["config"]))
        mv = registry.client(cfg).get_model_version(registry.STUDENT, r["registered_version"])
        assert int(mv.tags["params"]) == r["params"] and mv.tags["variant"] == "fp32"


@pytest.mark.slow
def test_loading_from_the_registry_never_unpickles(students, monkeypatch):
    cfg, _, _, _, _, good, packed = students

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for r in list(good["segments"].values()) + list(packed["segments"].values()):
        path = registry.version_file(cfg, registry.STUDENT, r["registered_version"])
        assert not path.read_bytes().startswith((b"PK", b"\x80"))  # not torch.save / pickle
        model = registry.load_student(cfg, r["registered_version"])
        assert isinstance(model, torch.nn.Module)
    teacher, tags = registry.load_teacher(cfg)
    assert teacher.num_params() > 0 and "data.version" in tags


@pytest.mark.slow
def test_int8_round_trip_keeps_the_top10_of_a_distilled_student(students):
    cfg, lake, teacher, _, _, good, _ = students
    tags = registry.load_teacher(cfg)[1]
    files = lake.files("user_sequences", int(tags["data.version"]))
    agree = []
    for g, r in good["segments"].items():
        fp32 = registry.load_student(cfg, r["registered_version"])
        int8 = from_bytes(quantized_bytes(fp32))
        data = SegmentData(segment_table(files, lake.files("segments"), g), fp32.config.max_len)
        with torch.no_grad():
            a = fp32(data.valid).topk(10).indices.sort().values
            b = int8(data.valid).topk(10).indices.sort().values
        agree.append((a == b).all(1).float().numpy())
    share = float(np.concatenate(agree).mean())
    assert share >= 0.95, share


@pytest.mark.slow
def test_compress_gates_int8_against_its_fp32_student_and_shrinks_it(students):
    cfg, lake, _, _, _, good, packed = students
    for g, r in packed["segments"].items():
        for tried in r["tried"]:  # int8 alone: > 3x; with half the weights pruned: >= 4x
            assert r["fp32_bytes"] / tried["int8_bytes"] > 3, tried
            if tried["sparsity"] >= 0.5:
                assert r["fp32_bytes"] / tried["int8_bytes"] >= 4, tried
                assert tried["sparsity_reached"] >= 0.49, tried
        passed = r["int8_valid_ndcg@10"] >= cfg.compress.gate * r["fp32_valid_ndcg@10"]
        fp32_champion = good["segments"][g]["promoted"]
        assert r["promoted"] == (passed and fp32_champion)
        champion = registry.champion_version(cfg, g)
        if r["promoted"]:
            assert str(champion.version) == r["registered_version"]
            assert champion.tags["variant"] == "int8"
        elif fp32_champion:
            assert str(champion.version) == good["segments"][g]["registered_version"]
        else:
            assert champion is None
    rows = lake.read("model_decisions").where("stage = 'compress'").count()
    assert rows == len(packed["segments"])


@pytest.mark.slow
def test_evaluate_reports_students_int8_and_champions(spark, students):
    from patternlake.evaluation.evaluate import evaluate_models
    from patternlake.students.models_report import model_report

    cfg, lake, _, _, _, good, packed = students
    out = evaluate_models(spark, lake, cfg)
    for name in ("teacher", "student", "student_int8"):
        m = out["models"][name]
        assert 0 < m["overall"]["ndcg@10"] <= 1 and m["params"] > 0 and m["bytes"] > 0
    evaluated = out["models"]["student"]["segments"]
    for g, r in good["segments"].items():
        if str(g) in evaluated:  # (a segment whose users all have < 3 events is not evaluated)
            assert evaluated[str(g)]["params"] == r["params"]
    assert set(out["champions"]) == {str(g) for g in good["segments"]}
    rows = model_report(lake, cfg)
    assert [r["segment_id"] for r in rows] == sorted(good["segments"])
    assert lake.read("model_report").count() == len(rows)
    for r in rows:
        assert r["int8_bytes"] < r["fp32_bytes"] and r["student_params"] < r["teacher_params"]


@pytest.mark.slow
def test_a_small_search_picks_a_student_within_the_budget(students):
    """students.search_trials > 0: an Optuna study (tuning's Pareto and pruning code) in the
    segment's task; the chosen trial is within the budget and is what gets trained."""
    from patternlake.models.teacher import teacher_bytes
    from patternlake.students.segment_training import distill_segment

    cfg, lake, _, _, _, good, _ = students
    teacher, tags = registry.load_teacher(cfg)
    g = max(good["segments"], key=lambda k: good["segments"][k]["users"])
    budget = int(cfg.students.max_param_ratio * teacher.num_params())
    settings = {
        **cfg.students.model_dump(),
        "search_trials": 4,
        "search_epochs": 2,
        "epochs": 2,
        "d_model": [32, 16, 8],
    }
    job = {
        "segment": g,
        "files": lake.files("user_sequences", int(tags["data.version"])),
        "segment_files": lake.files("segments"),
        "settings": settings,
        "budget": budget,
    }
    r = distill_segment(job, teacher_bytes(teacher))
    trials = r["search"]["trials"]
    assert len(trials) == 4
    over = [t for t in trials if t["params"] > budget]
    assert all(t["state"] == "PRUNED" for t in over)
    chosen = r["search"]["chosen"]
    assert chosen is not None and chosen["params"] <= budget and chosen["state"] == "COMPLETE"
    assert r["params"] == chosen["params"] and r["config"]["d_model"] == chosen["d_model"]
    assert r["config"]["n_layers"] == chosen["n_layers"]
