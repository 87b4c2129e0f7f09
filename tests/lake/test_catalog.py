"""The catalog of table contracts: one per table of conf, each with its schema and the stage
that writes it, and every write through `Lake` checked against it."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F

from patternlake.config import load_config
from patternlake.errors import ConfigError, SchemaMismatchError
from patternlake.lake.catalog import CONTRACTS, Column, _columns, contract, type_text
from patternlake.pipeline import STAGES

RUN = ("r1", "daily", 0, "ingest", "succeeded", None, datetime(2026, 1, 1, tzinfo=UTC), 1.5)


def commands() -> set[str]:
    from patternlake.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_table_of_conf_has_a_contract_and_every_contract_a_table():
    tables = load_config("local", environ={}).lake.tables
    assert sorted(tables) == sorted(CONTRACTS)
    for name, spec in tables.items():
        c = contract(name)
        assert c.table == name and c.columns and c.producers and c.doc
        for part in spec.partition_by:  # a partition column holds a value in every row
            assert not c.column(part).nullable, (name, part)


def test_every_producer_is_a_stage_or_a_command_and_matches_the_stages_outputs():
    known = set(STAGES) | commands()
    for c in CONTRACTS.values():
        assert set(c.producers) <= known, (c.table, c.producers)
        declared = {s.name for s in STAGES.values() if c.table in s.outputs}
        assert declared == set(c.producers) & set(STAGES), (c.table, c.producers, declared)
    for stage in STAGES.values():
        for out in stage.outputs:
            if not out.startswith("model:"):
                assert stage.name in contract(out).producers, (stage.name, out)


def test_the_three_late_tables_have_their_contracts():
    assert contract("user_patterns").producers == ("score",)
    assert contract("drift").producers == ("monitor",)
    assert contract("forget_log").producers == ("forget-user",)
    assert contract("user_patterns").column("pattern").type.startswith("struct<kind:string,")
    assert not contract("forget_log").column("user_hash").nullable


def test_column_specs_keep_nested_commas_and_not_null():
    cols = _columns(
        "a string NOT NULL, b array<struct<x:int,y:map<string,bigint>>>, c decimal(10,2), "
        "d struct<Kind: string> not null"
    )
    assert cols == [
        Column("a", "string", False),
        Column("b", "array<struct<x:int,y:map<string,bigint>>>"),
        Column("c", "decimal(10,2)"),
        Column("d", "struct<kind:string>", False),
    ]
    with pytest.raises(ValueError, match="name type"):
        _columns("a string, b")
    with pytest.raises(ConfigError, match="no contract"):
        contract("nope")


def test_every_contract_is_valid_spark_sql_written_as_spark_prints_it(spark):
    for c in CONTRACTS.values():
        parsed = spark.createDataFrame([], c.ddl()).schema
        assert [(f.name, type_text(f.dataType)) for f in parsed] == [
            (col.name, col.type) for col in c.columns
        ], c.table


# ---- writes are checked ------------------------------------------------------------------


def runs(spark, rows=(RUN,), ddl=None):
    return spark.createDataFrame([(*r, None, None) for r in rows], ddl or contract("runs").ddl())


def unchanged(lake, name, version, count):
    assert lake.version(name) == version and lake.read(name).count() == count


def test_missing_extra_and_mistyped_columns_are_refused_and_nothing_is_written(stage):
    _, lake = stage
    spark = lake.spark
    v = lake.write(runs(spark), "runs")
    bad = {
        "column status (string NOT NULL) is missing": runs(spark).drop("status"),
        "column note (string) is not in the contract": runs(spark).withColumn("note", F.lit("x")),
        "column position: expected int, got bigint": runs(spark).withColumn(
            "position", F.col("position").cast("long")
        ),
        "column started_at: expected timestamp, got timestamp_ntz": runs(spark).withColumn(
            "started_at", F.col("started_at").cast("timestamp_ntz")
        ),
    }
    for problem, df in bad.items():
        for write, kwargs in (
            (lake.write, {}),
            (lake.write, {"mode": "overwrite", "overwrite_schema": True}),
            (lake.merge, {"keys": ["run_id"]}),
        ):
            with pytest.raises(SchemaMismatchError) as err:
                write(df, "runs", **kwargs)
            message = str(err.value)
            assert message.startswith("write runs: ") and problem in message, message
            assert "patternlake.lake.catalog" in message and "nothing was written" in message
            unchanged(lake, "runs", v, 1)
    # the first write of a table is checked too: no table
    with pytest.raises(SchemaMismatchError, match="drift: .*column check .*is missing"):
        lake.write(spark.createDataFrame([("m1",)], "monitor_id string"), "drift")
    assert not lake.exists("drift")


def test_a_null_in_a_not_null_column_stops_the_write_before_its_commit(stage):
    _, lake = stage
    spark = lake.spark
    v = lake.write(runs(spark), "runs")
    nulls = runs(spark, [RUN, ("r2", "daily", 1, None, "failed", None, None, 0.0)])
    for write, kwargs in ((lake.write, {}), (lake.merge, {"keys": ["run_id"]})):
        with pytest.raises(SchemaMismatchError) as err:
            write(nulls, "runs", **kwargs)
        assert str(err.value) == (
            "write runs: column step is NOT NULL in the table's contract "
            "(patternlake.lake.catalog) but the data holds a null; nothing was written"
        )
        unchanged(lake, "runs", v, 1)
    # a nullable column may be null, or absent: written as null
    lake.write(runs(spark, [("r3", "daily", 2, "mine", "skipped", None, None, 0.0)]), "runs")
    lake.merge(runs(spark, [RUN]).drop("error", "resumed_from"), "runs", keys=["run_id", "step"])
    assert lake.read("runs").count() == 2


def test_the_not_null_check_keeps_the_columns_metadata(stage):
    """The check's projection must not drop column metadata (user_sequences records its
    vocabulary there): a bug once lost it on every write whose NOT NULL columns Spark
    could not prove non-null."""
    _, lake = stage
    df = runs(lake.spark).withMetadata("step", {"patternlake.note": {"k": 1}})
    lake.write(df, "runs", "overwrite", overwrite_schema=True)
    assert lake.read("runs").schema["step"].metadata == {"patternlake.note": {"k": 1}}


def test_a_table_created_from_partial_data_gets_every_contract_column(stage):
    _, lake = stage
    spark = lake.spark
    lake.write(spark.createDataFrame([("i1", 1)], "item_id string, item_idx int"), "item_index")
    assert [(f.name, type_text(f.dataType)) for f in lake.schema("item_index")] == [
        (c.name, c.type) for c in contract("item_index").columns
    ]
    assert lake.read("item_index").first().asDict() == {
        "item_id": "i1",
        "item_idx": 1,
        "first_seen": None,
        "first_batch": None,
    }


def test_a_family_admits_its_columns_of_its_type_only(stage):
    _, lake = stage
    c = contract("user_features")
    base = lake.spark.createDataFrame([], c.ddl()).withColumn("share_view", F.lit(0.5))
    assert c.mismatches(base.schema) == []
    wrong = base.withColumn("share_view", F.lit("half"))
    assert c.mismatches(wrong.schema) == ["column share_view: expected double, got string"]
    assert c.mismatches(base.withColumn("shares", F.lit(1.0)).schema) == [
        "column shares (double) is not in the contract"
    ]


def test_paths_and_tables_without_a_contract_are_not_checked(stage, tmp_path):
    _, lake = stage
    df = lake.spark.createDataFrame([(1,)], "anything bigint")
    lake.write(df, str(tmp_path / "adhoc"))
    assert lake.contract(str(tmp_path / "adhoc")) is None
    assert lake.contract("runs") is contract("runs")
