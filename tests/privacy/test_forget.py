"""forget-user: the id's bytes leave every file under the lake root; nobody else's rows change."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from patternlake.privacy import transforms
from tests.conftest import comparable, copy_trained_lake

# ---- transforms ----------------------------------------------------------------------------


def test_ids_are_found_as_tokens_only():
    rx = re.compile(transforms.token_regex(["u12", "a.b"]))
    assert rx.search('"u12","i1"') and rx.search("u12\ti1") and rx.search("x a.b y")
    for text in ("u123", "au12", "u12-b", "u12_c", "axb", "u1"):
        assert not rx.search(text), text


def test_clean_ids_refuses_empty_ids():
    assert transforms.clean_ids([" u1", "u1", "u2 "]) == ["u1", "u2"]
    for bad in ([], ["u1", "  "]):
        with pytest.raises(ValueError, match="forget-user"):
            transforms.clean_ids(bad)


def test_user_rows_match_the_user_column_and_raw_text_of_unparsable_rows_only(spark):
    schema = StructType([StructField("user_id", StringType()), StructField("_raw", StringType())])
    rows = [
        ("u12", None),  # theirs
        (" u12 ", None),  # theirs (validate trims)
        ("u123", None),  # another user
        (None, '"u12",i9,??'),  # unparsable, names them
        ("", "u12;broken"),  # blank user column, names them
        ("u7", "u12 mentioned by u7"),  # u7's row: not theirs
        (None, "u123,i1"),  # unparsable, another user
    ]
    df = spark.createDataFrame(rows, schema)
    cond = transforms.user_rows(df.schema, ["u12"], ["user_id"], ["_raw"])
    assert [r[0] for r in df.select(cond).collect()] == [
        True,
        True,
        False,
        True,
        True,
        False,
        False,
    ]
    assert (
        transforms.user_rows(
            StructType([StructField("item_id", StringType())]), ["u12"], ["user_id"], []
        )
        is None
    )


def test_recorded_samples_lose_the_users_values_and_keep_the_rest():
    import json

    doc = {
        "results": [
            {
                "expectation_config": {"type": "t", "kwargs": {"column": "user_id"}},
                "result": {
                    "unexpected_count": 3,
                    "partial_unexpected_list": ["u12", "u99!", "u12"],
                    "partial_unexpected_counts": [
                        {"value": "u12", "count": 2},
                        {"value": "u99!", "count": 1},
                    ],
                },
            },
            {
                "expectation_config": {"type": "t", "kwargs": {"column": "item_id"}},
                "result": {"partial_unexpected_list": ["i1"]},
            },
        ]
    }
    out = json.loads(transforms.scrub_json_text(json.dumps(doc), ["u12"], ["user_id", "_raw"]))
    users = out["results"][0]["result"]
    assert users["partial_unexpected_list"] == ["u99!"]
    assert users["partial_unexpected_counts"] == [{"value": "u99!", "count": 1}]
    assert users["unexpected_count"] == 3  # counts stay
    assert out["results"][1] == doc["results"][1]
    assert transforms.scrub_json_text("no mention", ["u12"], ["user_id"]) == "no mention"
    assert transforms.scrub_json_text(None, ["u12"], ["user_id"]) is None


def test_salted_hash_is_keyed_and_stable():
    h = transforms.salted_hash("u12", b"k1")
    assert (
        h
        == hmac.new(b"k1", b"u12", hashlib.sha256).hexdigest()
        == transforms.salted_hash("u12", b"k1")
    )
    assert h != transforms.salted_hash("u12", b"k2") and "u12" not in h


# ---- on a copy of the trained daily lake -----------------------------------------------------


def _files_naming(root: Path, uid: str) -> list[str]:
    """Files under ``root`` whose bytes, or (Parquet) whose decoded string values, hold ``uid``."""
    needle = uid.encode()
    hits = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if needle in path.read_bytes():
            hits.append(str(path))
        elif path.suffix == ".parquet" and uid in str(pq.read_table(path).to_pylist()):
            hits.append(str(path) + " (decoded)")
    return hits


@pytest.fixture(scope="module")
def forgotten(spark, trained_lake, tmp_path_factory):
    from patternlake.cli import main
    from patternlake.scoring.score import score_users

    work = tmp_path_factory.mktemp("forget")
    cfg, lake, overrides = copy_trained_lake(trained_lake, work, score={"explain_events": 5})

    # the user with the most silver events; a new batch gives them a quarantined row (unknown
    # event type) and one with a broken time, next to another user's good row
    silver = lake.read("silver_events")
    uid = silver.groupBy("user_id").count().orderBy(F.desc("count"), "user_id").first()[0]
    other = silver.where(F.col("user_id") != uid).first()
    mine = silver.where(F.col("user_id") == uid).orderBy("event_time").first()
    ms = lambda t: int(t.timestamp() * 1000)  # noqa: E731
    batch = work / "batch"
    batch.mkdir()
    (batch / "late.csv").write_text(
        '"user_id","item_id","event_type","event_time","event_id","category","price"\n'
        f'"{uid}","{mine.item_id}","teleport",{ms(mine.event_time) + 5},"x-bad-type","c01",1.0\n'
        f'"{uid}","{mine.item_id}","view","not-a-time"""broken,,,\n'
        f'"{other.user_id}","{other.item_id}","view",{ms(other.event_time) + 7},"x-other","c01",2.0\n'
    )
    overrides += ["--set", "validate.max_invalid_share=1.0"]  # a small batch of mostly bad rows
    assert main([*overrides, "ingest", str(batch)]) == 0
    assert main([*overrides, "validate"]) == 0
    assert main([*overrides, "featurize"]) == 0
    score_users(spark, lake, cfg, "before-forget")

    tables = [n for n in sorted(cfg.lake.tables) if lake.exists(n)]
    with_users = [n for n in tables if "user_id" in lake.schema(n).fieldNames()]
    others = {
        n: comparable(lake.read(n).where(~F.col("user_id").eqNullSafe(uid))).localCheckpoint()
        for n in with_users
    }
    theirs = {n: lake.read(n).where(F.col("user_id") == uid).count() for n in with_users}
    named_before = _files_naming(work / "lake", uid)
    versions = {n: lake.version(n) for n in tables}

    assert main([*overrides, "forget-user", "", uid]) == 2  # bad input: refused, nothing lost
    untouched = {n: lake.version(n) for n in tables}

    assert main([*overrides, "forget-user", uid]) == 0
    return cfg, lake, work, uid, others, theirs, named_before, versions, untouched


@pytest.mark.slow
def test_no_file_under_the_lake_root_holds_the_id_afterwards(forgotten):
    cfg, lake, work, uid, _, theirs, named_before, *_ = forgotten
    # the test can fail: before, the id was in table files (silver, quarantine, user_patterns, ...)
    assert len(named_before) >= 5, named_before
    assert theirs["quarantine_events"] >= 1 and theirs["user_patterns"] >= 1
    assert theirs["bronze_events"] >= 2
    assert _files_naming(work / "lake", uid) == []


@pytest.mark.slow
def test_every_other_users_rows_are_intact_and_theirs_are_gone(spark, forgotten):
    _, lake, _, uid, others, theirs, *_ = forgotten
    for name, before in others.items():
        after = comparable(lake.read(name))
        assert after.where(F.col("user_id") == uid).count() == 0, name
        assert before.exceptAll(after).count() == 0, name
        assert after.exceptAll(before).count() == 0, name
    assert sum(theirs.values()) > 0


@pytest.mark.slow
def test_bad_input_changes_nothing(forgotten):
    *_, versions, untouched = forgotten
    assert untouched == versions


@pytest.mark.slow
def test_log_holds_a_salted_hash_and_models_are_marked_for_retraining(forgotten):
    from patternlake import registry
    from patternlake.privacy.forget import _salt

    cfg, lake, _, uid, _, theirs, *_ = forgotten
    (row,) = lake.read("forget_log").collect()
    assert row.user_hash == transforms.salted_hash(uid, _salt(cfg))
    assert uid not in str(row.asDict())
    assert row.rows_removed["silver_events"] == theirs["silver_events"]
    assert row.models_marked and any(m.startswith("teacher/") for m in row.models_marked)
    c = registry.client(cfg)
    for m in row.models_marked:
        name, version = m.split("/")
        assert c.get_model_version(name, version).tags["retrain_required"] == row.forget_id


@pytest.mark.slow
def test_history_before_the_forget_is_gone(forgotten):
    from patternlake.errors import PatternlakeError

    _, lake, *_, versions, _ = forgotten
    with pytest.raises(PatternlakeError):
        lake.read("silver_events", version=versions["silver_events"]).count()
    assert lake.read("silver_events").count() > 0


def _cli_overrides(cfg, work) -> list[str]:
    """The CLI settings that point at the forgotten lake's copy under ``work``."""
    return [
        "--set", f"lake.root={work / 'lake'}",
        "--set", f"models.root={work / 'models'}",
        "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "--set", f"mlflow.artifact_location={cfg.mlflow.artifact_location}",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["distill", "evaluate"])
def test_a_stage_reading_the_teachers_pinned_version_after_a_forget_says_run_train(
    forgotten, capsys, stage
):
    """The teacher was trained on a user_sequences version that the forget removed: the
    stages that read that version say so in one line and name the way out."""
    from patternlake.cli import main

    cfg, _, work, *_ = forgotten
    overrides = _cli_overrides(cfg, work)
    capsys.readouterr()
    assert main([*overrides, stage]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("patternlake: error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "no longer exists" in errors[0] and "`patternlake run train`" in errors[0], err


@pytest.mark.slow
def test_a_second_forget_on_the_same_tables_succeeds_and_leaves_no_trace(spark, forgotten):
    """After a forget the log starts at its checkpoint; Delta refuses a lite vacuum there
    unless the lake records that older removed files are gone (the second forget failed)."""
    from patternlake.cli import main

    cfg, lake, work, uid, *_ = forgotten
    other = (
        lake.read("silver_events")
        .groupBy("user_id")
        .count()
        .orderBy(F.desc("count"), "user_id")
        .first()[0]
    )
    assert other != uid and _files_naming(work / "lake", other)
    overrides = _cli_overrides(cfg, work)
    assert main([*overrides, "forget-user", other]) == 0
    assert _files_naming(work / "lake", other) == []
    assert _files_naming(work / "lake", uid) == []
    assert lake.read("silver_events").where(F.col("user_id") == other).count() == 0
