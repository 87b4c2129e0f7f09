"""distill -> compress -> evaluate -> models on the generated daily lake, with a real
teacher (single process, a few epochs), the teacher's top-K stored by a real Spark job, the
shared student trained by the teacher's training function and a real MLflow registry."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from patternlake import registry
from patternlake.models.student import Student, quantized_bytes
from patternlake.sequence_reader import read_table
from patternlake.students.distill import SHARED
from patternlake.students.topk import TABLE, topk_columns


@pytest.fixture(scope="module")
def students(trained_lake):
    return trained_lake


def _decisions(lake, stage: str, version: str) -> list:
    return [
        r
        for r in lake.read("model_decisions").where(f"stage = '{stage}'").collect()
        if r.registered_version == version
    ]


@pytest.mark.slow
def test_a_weak_student_is_refused_and_every_segment_keeps_the_teacher(students):
    cfg, lake, _, weak, weak_champions, _, _ = students
    assert weak["shared"]["promoted"] is False and weak["shared"]["champion"] == "teacher"
    assert weak_champions and all(v is None for v in weak_champions.values())
    rows = _decisions(lake, "distill", weak["registered_version"])
    pooled = [r for r in rows if r.segment_id == SHARED]
    assert len(pooled) == 1 and not pooled[0].promoted
    assert pooled[0].ratio_lower_90 < cfg.students.gate  # the interval is recorded
    assert pooled[0].ratio_lower_90 <= pooled[0].ratio <= pooled[0].ratio_upper_90
    assert all(not r.promoted and r.champion == "teacher" for r in rows)


@pytest.mark.slow
def test_the_shared_student_trains_with_the_training_function_within_the_byte_budget(
    students, capsys
):
    cfg, lake, teacher, _, _, good, packed = students
    d = good["shared"]
    assert d["backend"] == "single" and d["world"] == 1 and d["epochs_run"] >= 1
    assert (
        d["int8_bytes"]
        <= d["budget_bytes"]
        == int(cfg.students.max_bytes_ratio * d["teacher_bytes"])
    )
    mv = registry.client(cfg).get_model_version(registry.STUDENT, good["registered_version"])
    assert mv.tags["shared"] == "true" and mv.tags["variant"] == "fp32"
    path = registry.version_file(cfg, registry.STUDENT, good["registered_version"])
    assert int(mv.tags["bytes"]) == path.stat().st_size == d["fp32_bytes"]  # bytes on disk
    # one decision row for every user pooled, one per segment (its harm guard)
    rows = _decisions(lake, "distill", good["registered_version"])
    segments = {r[0] for r in lake.read("segments").select("segment_id").distinct().collect()}
    assert {r.segment_id for r in rows} <= segments | {SHARED} and SHARED in {
        r.segment_id for r in rows
    }
    for r in rows:
        champion = registry.champion_version(cfg, r.segment_id) if r.segment_id >= 0 else None
        if r.segment_id >= 0:
            assert (champion is not None) == r.promoted
            if r.promoted:  # the student, or its int8 form since compress
                assert str(champion.version) in {
                    good["registered_version"],
                    packed["registered_version"],
                }
    with capsys.disabled():
        for r in sorted(rows, key=lambda r: r.segment_id):
            print(
                f"\nsegment {r.segment_id}: {r.valid_users} gate users, student "
                f"{r.model_ndcg_at_10:.4f} vs teacher {r.reference_ndcg_at_10:.4f} = "
                f"{r.ratio:.3f} ({r.ratio_lower_90:.3f}-{r.ratio_upper_90:.3f}) -> {r.champion}"
            )


@pytest.mark.slow
def test_the_stored_teacher_logits_equal_recomputed_ones(students):
    cfg, lake, _, _, _, good, _ = students
    teacher, tags = registry.load_teacher(cfg)
    stored = read_table(
        lake.files(TABLE),
        [
            "user_id",
            "item_seq",
            "type_seq",
            "gap_seq",
            "valid_item",
            "test_item",
            "topk_items",
            "topk_logits",
            "teacher_version",
            "k",
        ],
    )
    assert set(stored.column("teacher_version").to_pylist()) == {tags["version"]}
    sample = stored.slice(0, 64)
    ids, logits = topk_columns(teacher, sample, cfg.students.top_k, None)
    assert ids.equals(sample.column("topk_items").combine_chunks().cast(ids.type))
    a = np.asarray(logits.flatten(), dtype=np.float32)
    b = np.asarray(sample.column("topk_logits").combine_chunks().flatten(), dtype=np.float32)
    assert np.allclose(a, b, atol=1e-5)
    sequences = read_table(lake.files("user_sequences", int(tags["data.version"])))
    assert stored.num_rows == sequences.num_rows
    assert isinstance(ids, pa.ListArray)


@pytest.mark.slow
def test_loading_from_the_registry_never_unpickles(students, monkeypatch):
    cfg, _, _, _, _, good, packed = students

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for version in (good["registered_version"], packed["registered_version"]):
        path = registry.version_file(cfg, registry.STUDENT, version)
        assert not path.read_bytes().startswith((b"PK", b"\x80"))  # not torch.save / pickle
        assert isinstance(registry.load_student(cfg, version), torch.nn.Module)
    teacher, tags = registry.load_teacher(cfg)
    assert teacher.num_params() > 0 and "data.version" in tags


@pytest.mark.slow
def test_compress_judges_int8_by_fidelity_and_moves_only_fp32_champions(students):
    cfg, lake, _, _, _, good, packed = students
    shared = packed["shared"]
    fp32_bytes = good["shared"]["fp32_bytes"]
    for tried in shared["tried"]:  # int8 alone: > 3x; with half the weights pruned: >= 4x
        assert fp32_bytes / tried["int8_bytes"] > 3, tried
        if tried["sparsity"] >= 0.5:
            assert fp32_bytes / tried["int8_bytes"] >= 4, tried
        assert 0 <= tried["top10_overlap"] <= 1 and tried["inputs"] > 0
        assert tried["passed"] == (
            tried["top10_overlap"] >= cfg.compress.min_overlap
            and tried["interval"]["lower"] >= cfg.compress.gate
            and tried["int8_bytes"] <= good["shared"]["budget_bytes"]
        )
    assert shared["promoted"] == shared["tried"][-1]["passed"]
    if len(shared["tried"]) > 1:
        assert not shared["tried"][0]["passed"]  # the first that passes wins
    for g, r in packed["segments"].items():
        champion = registry.champion_version(cfg, g)
        fp32_served = good["segments"][g]["promoted"]
        if r["promoted"]:
            assert shared["promoted"] and fp32_served
            assert str(champion.version) == packed["registered_version"]
        elif fp32_served:
            assert str(champion.version) == good["registered_version"]
        else:
            assert champion is None


@pytest.mark.slow
def test_evaluate_reports_the_served_fleet_counting_a_shared_file_once(spark, students):
    from patternlake.evaluation.evaluate import evaluate_models
    from patternlake.students.models_report import model_report

    cfg, lake, _, _, _, good, packed = students
    out = evaluate_models(spark, lake, cfg)
    for name in ("teacher", "student", "student_int8"):
        m = out["models"][name]
        assert 0 < m["overall"]["ndcg@10"] <= 1 and m["params"] > 0 and m["bytes"] > 0
    # every segment is served by the one shared file: its bytes once, not once per segment
    assert out["models"]["student"]["bytes"] == good["shared"]["fp32_bytes"]
    assert out["models"]["student_int8"]["bytes"] == packed["shared"]["bytes"]
    assert set(out["champions"]) == {str(g) for g in good["segments"]}
    if any(r["promoted"] for r in good["segments"].values()):
        assert "fleet" in out["models"]
    rows = model_report(lake, cfg)
    assert rows[0]["segment_id"] == SHARED
    assert [r["segment_id"] for r in rows[1:]] == sorted(good["segments"])
    assert lake.read("model_report").count() == len(rows)
    assert rows[0]["int8_bytes"] < rows[0]["fp32_bytes"]
    assert rows[0]["student_params"] < rows[0]["teacher_params"]
    assert rows[0]["student_ratio_lower_90"] <= rows[0]["student_ratio_upper_90"]
    assert json.loads(json.dumps(rows, default=str))


@pytest.mark.slow
def test_the_served_int8_file_is_the_one_the_budget_counted(students):
    cfg, _, _, _, _, good, _ = students
    fp32 = registry.load_student(cfg, good["registered_version"])
    assert isinstance(fp32, Student) and fp32.catalogue is None
    assert len(quantized_bytes(fp32)) <= good["shared"]["budget_bytes"]


@pytest.mark.slow
def test_the_student_distils_under_ddp_like_the_teacher(spark, students, tmp_path):
    """train.backend ddp: the shared student trains in two TorchDistributor processes, from
    the stored top-K the first distill wrote (reused, not recomputed)."""
    from patternlake.students.distill import distill
    from tests.conftest import copy_trained_lake

    cfg, lake, _ = copy_trained_lake(
        students,
        tmp_path,
        train={"backend": "ddp", "num_proc": 2},
        students={"epochs": 1},
    )
    before = lake.version(TABLE)
    out = distill(spark, lake, cfg)
    assert out["shared"]["backend"] == "ddp" and out["shared"]["world"] == 2
    assert out["shared"]["teacher_topk"]["reused"] and lake.version(TABLE) == before
    newest = registry.student_versions(cfg, shared="true", variant="fp32")[0]
    assert str(newest.version) == out["registered_version"]


@pytest.mark.slow
def test_compress_again_replaces_the_int8_of_the_same_student_and_a_refusal_keeps_it(
    spark, students, tmp_path
):
    """A second compress of the same fp32 student may replace its earlier int8 form (same
    lineage); one that fails its gates leaves every alias as it was and says so."""
    from patternlake.students.compress import compress
    from tests.conftest import copy_trained_lake, with_overrides

    cfg, lake, _ = copy_trained_lake(students, tmp_path)
    segments = sorted(students[5]["segments"])
    before = {g: registry.champion_version(cfg, g) for g in segments}
    strict = with_overrides(cfg, compress={"min_overlap": 1.0, "gate": 1.0, "sparsity": [0.9]})
    refused = compress(spark, lake, strict)
    assert not refused["shared"]["promoted"]
    after = {g: registry.champion_version(cfg, g) for g in segments}
    assert {g: getattr(v, "version", None) for g, v in after.items()} == {
        g: getattr(v, "version", None) for g, v in before.items()
    }
    served = {r["champion"] for r in refused["segments"].values()}
    assert refused["shared"]["champion"] in served
    again = compress(spark, lake, cfg)
    if again["shared"]["promoted"]:
        for g, v in before.items():
            if v is not None and v.tags.get("variant") == "int8":
                now = registry.champion_version(cfg, g)
                assert str(now.version) == again["registered_version"]


@pytest.mark.slow
def test_the_search_spends_the_byte_budget_on_tune_users_and_trains_its_choice(students, tmp_path):
    from patternlake.students.distill import distill
    from tests.conftest import copy_trained_lake, with_overrides

    cfg, lake, _ = copy_trained_lake(students, tmp_path)
    search = cfg.students.search.model_copy(
        update={"trials": 2, "epochs": 2, "patience": 2, "n_layers": [1], "item_share": [0.0, 0.5]}
    )
    cfg = with_overrides(cfg, students={"search": search})
    d = distill(lake.spark, lake, cfg)["shared"]
    trials = d["search"]
    assert len(trials) == 2 and sum(t["chosen"] for t in trials) == 1
    done = [t for t in trials if t["fits"]]
    assert done and all(t["int8_bytes"] <= d["budget_bytes"] for t in done)
    chosen = next(t for t in trials if t["chosen"])
    assert chosen["tune_valid_ndcg@10"] == max(t["tune_valid_ndcg@10"] for t in done)
    assert (d["n_layers"], d["item_rank"], d["lr"], d["alpha"]) == (
        chosen["n_layers"],
        chosen["item_rank"],
        chosen["lr"],
        chosen["alpha"],
    )
    served = registry.load_student(cfg, d["registered_version"])
    assert served.config.item_rank == chosen["item_rank"]
    assert d["int8_bytes"] <= d["budget_bytes"]
