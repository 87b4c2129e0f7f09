"""The lake contract, on the lake's engine (delta-spark, with the jars ``make setup`` fetched).

Tables written here are also read through delta-rs (``deltalake``), as readers without Spark
(pandas, DuckDB, BI tools) read them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from patternlake.errors import PatternlakeError, SchemaMismatchError, TableNotFoundError
from patternlake.lake import Lake

WRITER = Path(__file__).with_name("writer_process.py")


@pytest.fixture
def lake(spark, config) -> Lake:
    lake = Lake(spark, config.lake)
    assert lake.engine.name == "delta-spark"
    return lake


@pytest.fixture
def table(tmp_path) -> str:
    return str(tmp_path / "table")


def events(spark, rows: list[tuple]) -> object:
    schema = StructType(
        [
            StructField("user_id", StringType()),
            StructField("day", StringType()),
            StructField("n", LongType()),
        ]
    )
    return spark.createDataFrame(rows, schema)


def rows_of(df) -> list[tuple]:
    return sorted(tuple(r) for r in df.collect())


def test_append_then_read_latest_and_every_version(lake, spark, table):
    v0 = lake.write(events(spark, [("u1", "d1", 1), ("u2", "d1", 2)]), table)
    v1 = lake.write(events(spark, [("u3", "d2", 3)]), table)
    assert (v0, v1) == (0, 1)
    assert rows_of(lake.read(table)) == [("u1", "d1", 1), ("u2", "d1", 2), ("u3", "d2", 3)]
    assert rows_of(lake.read(table, version=0)) == [("u1", "d1", 1), ("u2", "d1", 2)]
    assert lake.version(table) == 1


def test_time_travel_by_timestamp(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    time.sleep(1.1)
    between = datetime.now(UTC)
    time.sleep(1.1)
    lake.write(events(spark, [("u2", "d1", 2)]), table)
    assert rows_of(lake.read(table, timestamp=between)) == [("u1", "d1", 1)]
    assert lake.read(table, timestamp=between.isoformat()).count() == 1
    with pytest.raises(PatternlakeError):
        lake.read(table, version=0, timestamp=between)


def test_overwrite_replaces_everything(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1), ("u2", "d2", 2)]), table)
    lake.write(events(spark, [("u9", "d9", 9)]), table, "overwrite")
    assert rows_of(lake.read(table)) == [("u9", "d9", 9)]
    assert lake.read(table, version=0).count() == 2


def test_overwrite_of_one_partition_keeps_the_others(lake, spark, table):
    lake.write(
        events(spark, [("u1", "d1", 1), ("u2", "d2", 2), ("u3", "d2", 3)]),
        table,
        partition_by=["day"],
    )
    lake.write(events(spark, [("u4", "d2", 4)]), table, "overwrite", replace_where={"day": "d2"})
    assert rows_of(lake.read(table)) == [("u1", "d1", 1), ("u4", "d2", 4)]
    with pytest.raises(PatternlakeError, match="outside replace_where"):
        lake.write(
            events(spark, [("u5", "d3", 5)]), table, "overwrite", replace_where={"day": "d2"}
        )
    with pytest.raises(PatternlakeError, match="not partition columns"):
        lake.write(
            events(spark, [("u5", "d2", 5)]), table, "overwrite", replace_where={"user_id": "u5"}
        )
    assert rows_of(lake.read(table)) == [("u1", "d1", 1), ("u4", "d2", 4)]


def test_partition_values_with_special_characters_round_trip(lake, spark, table):
    odd = ["a b:c", "x/y", "50%", None, "é"]
    lake.write(
        events(spark, [(f"u{i}", d, i) for i, d in enumerate(odd)]), table, partition_by=["day"]
    )
    got = {r.user_id: r.day for r in lake.read(table).collect()}
    assert got == {f"u{i}": d for i, d in enumerate(odd)}
    plain = DeltaTable(table).to_pyarrow_table().to_pydict()
    assert dict(zip(plain["user_id"], plain["day"], strict=True)) == got


def test_merge_updates_matching_keys_and_inserts_the_rest(lake, spark, table):
    lake.write(
        events(spark, [("u1", "d1", 1), ("u2", "d1", 2), ("u3", "d2", 3)]),
        table,
        partition_by=["day"],
    )
    lake.merge(events(spark, [("u2", "d1", 20), ("u4", "d2", 4)]), table, keys=["user_id", "day"])
    assert rows_of(lake.read(table)) == [
        ("u1", "d1", 1),
        ("u2", "d1", 20),
        ("u3", "d2", 3),
        ("u4", "d2", 4),
    ]
    # merging the same data again changes nothing
    lake.merge(events(spark, [("u2", "d1", 20), ("u4", "d2", 4)]), table, keys=["user_id", "day"])
    assert lake.read(table).count() == 4


def test_merge_rejects_duplicate_keys_and_creates_missing_tables(lake, spark, table):
    with pytest.raises(PatternlakeError, match="more than one row"):
        lake.merge(events(spark, [("u1", "d1", 1), ("u1", "d1", 2)]), table, keys=["user_id"])
    assert not lake.exists(table)
    lake.merge(events(spark, [("u1", "d1", 1)]), table, keys=["user_id"])
    assert rows_of(lake.read(table)) == [("u1", "d1", 1)]
    with pytest.raises(SchemaMismatchError, match="key columns"):
        lake.merge(events(spark, [("u1", "d1", 1)]), table, keys=["nope"])


def test_schema_evolution_adds_columns_and_rejects_type_changes(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    wider = events(spark, [("u2", "d1", 2)]).withColumn("score", F.lit(0.5))
    with pytest.raises(SchemaMismatchError, match="merge_schema=True"):
        lake.write(wider, table)
    lake.write(wider, table, merge_schema=True)
    got = {r.user_id: r.score for r in lake.read(table).collect()}
    assert got == {"u1": None, "u2": 0.5}
    # fewer columns than the table: the missing one is written as null
    lake.write(events(spark, [("u3", "d1", 3)]).drop("n"), table)
    assert lake.read(table).filter("user_id = 'u3'").first().n is None
    with pytest.raises(SchemaMismatchError, match="n: table has bigint, data has string"):
        lake.write(events(spark, [("u4", "d1", 4)]).withColumn("n", F.lit("four")), table)
    assert lake.read(table).count() == 3


def test_delete_and_vacuum_remove_the_data_from_disk(lake, spark, table):
    lake.write(events(spark, [("forget-me", "d1", 1), ("keep", "d1", 2)]), table)
    lake.write(events(spark, [("forget-me", "d2", 3), ("keep", "d2", 4)]), table)
    assert lake.delete(table, "user_id = 'forget-me'") == 2
    assert rows_of(lake.read(table)) == [("keep", "d1", 2), ("keep", "d2", 4)]
    assert "forget-me" in _user_ids_on_disk(table)  # old files still hold it (time travel)
    lake.vacuum(table, retention_hours=0)
    assert "forget-me" not in _user_ids_on_disk(table)
    assert rows_of(lake.read(table)) == [("keep", "d1", 2), ("keep", "d2", 4)]


def test_delete_and_merge_work_on_a_table_whose_version_has_no_files(lake, spark, table):
    lake.write(events(spark, []), table)  # e.g. quarantine_events after only clean batches
    assert lake.delete(table, F.col("user_id") == "u1") == 0
    lake.merge(events(spark, [("u1", "d1", 1)]), table, keys=["user_id"])
    assert rows_of(lake.read(table)) == [("u1", "d1", 1)]


def test_compact_merges_small_files_without_changing_rows(lake, spark, table):
    for i in range(6):
        lake.write(events(spark, [(f"u{i}", "d1", i)]), table)
    before = rows_of(lake.read(table))
    n_before = len(lake.files(table))
    lake.compact(table)
    assert len(lake.files(table)) < n_before
    assert rows_of(lake.read(table)) == before


def test_history_lists_operations_newest_first(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    lake.write(events(spark, [("u2", "d1", 2)]), table, "overwrite")
    history = lake.history(table)
    assert [h["version"] for h in history] == [1, 0]
    assert history[0]["patternlake.mode"] == "overwrite" or "overwrite" in str(history[0]).lower()


def test_missing_table_is_a_clear_user_error(lake, table):
    with pytest.raises(TableNotFoundError, match="run the job that writes it"):
        lake.read(table)


def test_every_table_is_readable_by_plain_deltalake_and_by_spark(lake, spark, table):
    df = events(spark, [(f"u{i}", f"d{i % 3}", i) for i in range(50)])
    lake.write(df, table, partition_by=["day"])
    lake.merge(events(spark, [("u1", "d1", 100)]), table, keys=["user_id"])
    lake.delete(table, "n < 5 AND n <> 1")
    expected = rows_of(lake.read(table))
    plain = DeltaTable(table).to_pyarrow_table().select(["user_id", "day", "n"]).to_pylist()
    assert sorted((r["user_id"], r["day"], r["n"]) for r in plain) == expected
    files = DeltaTable(table).file_uris()
    via_spark = spark.read.option("basePath", table).parquet(*files).select("user_id", "day", "n")
    assert rows_of(via_spark) == expected
    assert len(expected) == 50 - 4


def test_table_names_come_from_conf(spark, config):
    lake = Lake(spark, config.lake)
    assert lake.uri("silver_events") == f"{lake.root}/silver/events"
    with pytest.raises(PatternlakeError, match="not in lake.tables"):
        lake.uri("silver-events")


@pytest.mark.slow
def test_two_concurrent_appenders_lose_no_rows(lake, tmp_path, table):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WRITER),
                table,
                str(tmp_path / "lake"),
                str(offset),
                "5",
                "2000",
                str(barrier),
                f"w{offset}",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for offset in (0, 1_000_000)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    df = lake.read(table)
    assert df.count() == 20_000
    assert df.select("id").distinct().count() == 20_000
    history = {h["version"]: h for h in lake.history(table)}
    assert sorted(history) == list(range(10))  # ten commits, none lost or merged
    # each write returned the version its own commit made, not the table's latest then
    reported = {
        int(line.rsplit(" ", 1)[1]): offset
        for offset, out in zip((0, 1_000_000), outputs, strict=True)
        for line in out.splitlines()
        if line.startswith("wrote batch")
    }
    assert sorted(reported) == list(range(10)), outputs
    assert {v: history[v]["probe"] for v in reported} == {
        v: f"writer-{offset}" for v, offset in reported.items()
    }


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_previous_version_and_rerun_succeeds(
    lake, spark, tmp_path, table
):
    lake.write(
        spark.range(10).withColumn("payload", F.lit("x")).withColumn("writer", F.lit(-1)), table
    )
    before = rows_of(lake.read(table))
    cmd = [sys.executable, str(WRITER), table, str(tmp_path / "lake"), "100", "1", "30000000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    committed = _parquet_on_disk(table)
    deadline = time.time() + 180
    while time.time() < deadline and not (_in_progress(table) - committed):
        assert proc.poll() is None, "writer finished before it could be killed"
        time.sleep(0.05)
    time.sleep(1.0)  # Spark tasks are writing Parquet now
    assert proc.poll() is None, "writer finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # driver and its JVM, as a lost node would
    proc.wait(timeout=30)

    assert lake.version(table) == 0
    assert rows_of(lake.read(table)) == before
    assert DeltaTable(table).to_pyarrow_table().num_rows == 10
    assert _parquet_on_disk(table) - _referenced(table), "the killed writer left no file"

    rerun = subprocess.run([*cmd[:-1], "1000"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert lake.read(table).count() == 1010
    lake.vacuum(table, retention_hours=0)  # a full vacuum: no writer runs now
    assert _parquet_on_disk(table) == _referenced(table)
    assert lake.read(table).count() == 1010


def _user_ids_on_disk(table: str) -> set[str]:
    """Every user_id in every Parquet file under the table folder, referenced or not."""
    files = [p for p in Path(table).rglob("*.parquet") if "_delta_log" not in p.parts]
    found: set[str] = set()
    for f in files:
        found.update(v for v in pq.read_table(f, columns=["user_id"]).column(0).to_pylist() if v)
    return found


# ---- defects of issue 7: each test failed before its fix --------------------------------------


def start_writer(table, root, offset, rows, *, op="append", pause_at=None, pause_dir=None):
    env = {**os.environ, "PL_WRITER_OP": op}
    if pause_at:
        env.update(PL_PAUSE_AT=pause_at, PL_PAUSE_DIR=str(pause_dir))
    return subprocess.Popen(
        [sys.executable, str(WRITER), table, str(root), str(offset), "1", str(rows)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def wait_until_held(proc, pause_dir: Path) -> None:
    deadline = time.time() + 240
    while not (pause_dir / "paused").exists():
        if proc.poll() is not None or time.time() > deadline:
            out = proc.communicate(timeout=30)[0] if proc.poll() is not None else "(running)"
            pytest.fail(f"writer was never held: {out}")
        time.sleep(0.05)


def release(proc, pause_dir: Path) -> str:
    (pause_dir / "release").touch()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return out


def ids_table(spark, ids, writer: int):
    return (
        spark.createDataFrame([(i,) for i in ids], "id long")
        .withColumn("payload", F.sha2(F.col("id").cast("string"), 256))
        .withColumn("writer", F.lit(writer))  # an int, as in writer_process.py
    )


def rows_any(df) -> list[tuple]:
    """Sorted rows, nulls allowed anywhere."""
    return sorted((tuple(r) for r in df.collect()), key=repr)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["merge", "delete", "append"])
def test_a_commit_racing_another_writer_neither_duplicates_nor_loses_rows(
    lake, spark, tmp_path, table, other
):
    """A writer process starts its change (a merge of new key 10, or an overwrite), is held
    while it writes its files, and the test commits a conflicting change first: the held
    writer's commit conflicts, and the lake retries it against the new version."""
    lake.write(ids_table(spark, range(10), -1).coalesce(1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    op = "overwrite" if other == "append" else "merge"
    offset, rows = {"merge": (10, 1), "delete": (0, 1), "append": (100, 5)}[other]
    proc = start_writer(
        table, tmp_path / "lake", offset, rows, op=op, pause_at="write", pause_dir=pause
    )
    wait_until_held(proc, pause)
    if other == "merge":  # the same new key, from another writer
        lake.merge(ids_table(spark, [10], 99), table, keys=["id"])
    elif other == "delete":  # a row of the file the held merge rewrites
        assert lake.delete(table, "id = 5") == 1
    else:  # rows appended after the held overwrite read the table
        lake.write(ids_table(spark, [200, 201], 99), table)
    release(proc, pause)

    got = {r.id: r.writer for r in lake.read(table).collect()}
    assert lake.read(table).count() == len(got)  # no key twice
    if other == "merge":
        assert got == {**{i: -1 for i in range(10)}, 10: 10}  # the held merge committed last
    elif other == "delete":
        assert got == {0: 0, **{i: -1 for i in range(1, 10) if i != 5}}
    else:
        # the overwrite read the whole table, so the append conflicts with it: it is retried
        # and commits after the append, replacing everything (no half of either survives)
        assert got == {i: 100 for i in range(100, 105)}


def test_replace_where_treats_a_null_partition_as_a_value(lake, spark, table):
    """Issue 7, 2.2."""
    lake.write(events(spark, [("u1", "d1", 1), ("u2", None, 2)]), table, partition_by=["day"])
    with pytest.raises(PatternlakeError, match="outside replace_where"):
        lake.write(
            events(spark, [("u3", None, 3)]), table, "overwrite", replace_where={"day": "d1"}
        )
    lake.write(events(spark, [("u4", None, 4)]), table, "overwrite", replace_where={"day": None})
    assert rows_any(lake.read(table)) == [("u1", "d1", 1), ("u4", None, 4)]
    with pytest.raises(PatternlakeError, match="outside replace_where"):
        lake.write(
            events(spark, [("u5", "d1", 5)]), table, "overwrite", replace_where={"day": None}
        )


def all_types(spark, ids: range, awkward: bool):
    """One row per id with every column type the lake stores, and nulls; ``awkward`` adds
    strings over 4 KB (Spark writes no statistics for them), NaN and infinity."""
    from datetime import date, timedelta
    from decimal import Decimal

    from pyspark.sql.types import (
        BinaryType,
        BooleanType,
        ByteType,
        DateType,
        DecimalType,
        DoubleType,
        FloatType,
        IntegerType,
        ShortType,
        TimestampNTZType,
        TimestampType,
    )

    schema = StructType(
        [
            StructField("id", LongType()),
            StructField("b", ByteType()),
            StructField("s", ShortType()),
            StructField("i", IntegerType()),
            StructField("l", LongType()),
            StructField("f", FloatType()),
            StructField("d", DoubleType()),
            StructField("nan", DoubleType()),
            StructField("str", StringType()),
            StructField("longstr", StringType()),
            StructField("bo", BooleanType()),
            StructField("dt", DateType()),
            StructField("ts", TimestampType()),
            StructField("ntz", TimestampNTZType()),
            StructField("dec", DecimalType(10, 2)),
            StructField("bigdec", DecimalType(30, 5)),
            StructField("bin", BinaryType()),
        ]
    )
    base = datetime(2026, 1, 1, 0, 0, 0, 123456)
    rows = []
    for n in ids:
        if n % 5 == 4:
            rows.append((n,) + (None,) * (len(schema.fields) - 1))
            continue
        rows.append(
            (
                n,
                n - 8,
                n * 100 - 400,
                n * 1000,
                n * 10**12,
                float("inf") if awkward and n == 7 else n / 4,
                -n / 3,
                float("nan") if awkward and n == 2 else n * 1.5,
                f"k{n:03d}",
                ("x" * (5000 if awkward else 40) + str(n)) if n % 3 else f"short{n}",
                n % 2 == 0,
                date(2026, 1, 1) + timedelta(days=n),
                (base + timedelta(seconds=n)).replace(tzinfo=UTC),
                base + timedelta(minutes=n),
                Decimal(n) / 4,
                Decimal(10**20) + Decimal(n) / 8 if awkward else None,  # no exact JSON double
                bytes([n, 255 - n]),
            )
        )
    return spark.createDataFrame(rows, schema)


@pytest.mark.parametrize("awkward", [False, True], ids=["ranges", "awkward"])
def test_file_statistics_give_the_same_filtered_rows_through_deltalake_and_spark(
    lake, spark, table, awkward
):
    """Issue 7, 2.3: for every column type, a filtered read through delta-rs (which skips
    files by their statistics) returns what Spark returns scanning every row."""
    import json
    from datetime import date, timedelta
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.compute as pc

    for part in (range(0, 5), range(5, 10), range(10, 15)):
        lake.write(all_types(spark, part, awkward).coalesce(1), table)
    with_ranges = 0
    for entry in (Path(table) / "_delta_log").glob("*.json"):
        for line in entry.read_text().splitlines():
            add = json.loads(line).get("add")
            if add and add.get("stats"):
                stats = json.loads(
                    add["stats"], parse_constant=lambda c: pytest.fail(f"{c} in stats")
                )
                with_ranges += "minValues" in stats
    if not awkward:  # the files are skipped by their ranges, so the ranges are what is tested
        assert with_ranges == 3

    base = datetime(2026, 1, 1, 0, 0, 0, 123456)
    probes = {
        "b": 3 - 8,
        "s": 600,
        "i": 11000,
        "l": 6 * 10**12,
        "f": 2.5,
        "d": -2.0,
        "nan": 9.0,
        "str": "k012",
        "longstr": "x" * (5000 if awkward else 40) + "5",
        "bo": True,
        "dt": date(2026, 1, 1) + timedelta(days=8),
        "ts": (base + timedelta(seconds=11)).replace(tzinfo=UTC),
        "ntz": base + timedelta(minutes=6),
        "dec": Decimal(13) / 4,
        "bigdec": Decimal(10**20) + Decimal(3) / 8,
        "bin": bytes([6, 249]),
    }
    dataset = DeltaTable(table).to_pyarrow_dataset()
    spark_df = lake.read(table)
    mismatches = []
    for col, value in probes.items():
        arrow_type = dataset.schema.field(col).type
        scalar = pa.scalar(value, arrow_type)
        field = pc.field(col)
        tests = {
            "=": (field == scalar, F.col(col) == F.lit(value)),
            "is null": (field.is_null(), F.col(col).isNull()),
            "is not null": (field.is_valid(), F.col(col).isNotNull()),
        }
        # NaN: Spark ranks it above every number; delta-rs's filters and Arrow do not agree
        if col not in ("bo", "bin", "nan"):
            tests["<"] = (field < scalar, F.col(col) < F.lit(value))
        if col != "nan":
            tests[">="] = (field >= scalar, F.col(col) >= F.lit(value))
        for op, (arrow_filter, spark_filter) in tests.items():
            if col in DELTA_RS_BOOLEAN_PRUNING:  # filter after reading, not by statistics
                whole = DeltaTable(table).to_pyarrow_table(columns=["id", col])
                picked = whole.filter(arrow_filter)["id"]
            else:
                picked = DeltaTable(table).to_pyarrow_table(filters=arrow_filter, columns=["id"])[
                    "id"
                ]
            via_deltalake = sorted(picked.to_pylist())
            via_spark = sorted(r.id for r in spark_df.filter(spark_filter).select("id").collect())
            if via_deltalake != via_spark:
                mismatches.append(f"{col} {op}: deltalake {via_deltalake}, spark {via_spark}")
    assert not mismatches, "\n".join(mismatches)


def test_time_travel_before_the_first_commit_is_a_clear_error(lake, spark, table):
    """Issue 7, 2.5."""
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    with pytest.raises(PatternlakeError, match="no version at or before"):
        lake.read(table, timestamp=datetime(2000, 1, 1, tzinfo=UTC))
    assert lake.read(table, timestamp=datetime.now(UTC)).count() == 1


def test_merge_keys_follow_sql_semantics_and_update_every_matched_row(lake, spark, table):
    """Issue 7, 2.6: a null key never matches (so it is always inserted, and two null-key
    rows are not duplicates); a source row matching several target rows updates them all."""
    lake.write(events(spark, [("u1", "d1", 1), ("u1", "d2", 2), (None, "d3", 3)]), table)
    lake.merge(events(spark, [("u1", "d9", 10), (None, "d3", 30)]), table, keys=["user_id"])
    expected = [(None, "d3", 3), (None, "d3", 30), ("u1", "d9", 10), ("u1", "d9", 10)]
    assert rows_any(lake.read(table)) == sorted(expected, key=repr)
    lake.merge(events(spark, [(None, "d4", 4), (None, "d5", 5)]), table, keys=["user_id"])
    assert lake.read(table).filter("user_id IS NULL").count() == 4
    with pytest.raises(PatternlakeError, match="more than one row"):
        lake.merge(events(spark, [("u2", "d1", 1), ("u2", "d2", 2)]), table, keys=["user_id"])


def _parquet_on_disk(table: str) -> set[str]:
    return {
        str(p.relative_to(table))
        for p in Path(table).rglob("*.parquet")
        if "_delta_log" not in p.parts
    }


def _in_progress(table: str) -> set[str]:
    """Parquet files on disk, those Spark's tasks are still writing included (not the
    hidden checksum files beside them)."""
    return {
        str(p.relative_to(table))
        for p in Path(table).rglob("*")
        if "_delta_log" not in p.parts and ".parquet" in p.name and not p.name.startswith(".")
    }


def _referenced(table: str) -> set[str]:
    return {str(Path(f).relative_to(table)) for f in DeltaTable(table).file_uris()}


@pytest.mark.slow
def test_a_lite_vacuum_never_touches_a_writer_still_running(lake, spark, tmp_path, table):
    """A writer held while its tasks write the data files; a zero-retention lite vacuum
    (what forget-user runs) meanwhile must leave them alone."""
    lake.write(ids_table(spark, range(10), -1), table)
    lake.delete(table, "id < 3")  # something for the vacuum to remove
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(table, tmp_path / "lake", 100, 1000, pause_at="write", pause_dir=pause)
    wait_until_held(proc, pause)
    time.sleep(0.5)
    removed = lake.vacuum(table, retention_hours=0, lite=True)
    assert removed  # the files the delete removed
    release(proc, pause)
    assert lake.read(table).count() == 1007
    assert _parquet_on_disk(table) >= _referenced(table)


def test_adding_columns_commits_schema_and_data_together(lake, spark, table):
    """Issue 7, 2.9: one version holds the new columns and the rows that bring them."""
    lake.write(events(spark, [("u1", "d1", 1)]), table, partition_by=["day"])
    v = lake.write(
        events(spark, [("u2", "d1", 2)]).withColumn("score", F.lit(0.5)), table, merge_schema=True
    )
    assert v == 1 and lake.version(table) == 1
    v = lake.merge(
        events(spark, [("u1", "d1", 10)]).withColumn("extra", F.lit("e")),
        table,
        keys=["user_id"],
        merge_schema=True,
    )
    assert v == 2 and lake.version(table) == 2
    got = {r.user_id: (r.n, r.score, r.extra) for r in lake.read(table).collect()}
    assert got == {"u1": (10, None, "e"), "u2": (2, 0.5, None)}
    assert lake.read(table, version=0).columns == ["user_id", "day", "n"]


def test_read_range_reads_only_the_files_whose_statistics_overlap(lake, spark, table):
    # three appends = three files with disjoint user_id ranges (u1-u2, u5-u6, u8-u9)
    for rows in ([("u1", "d1", 1), ("u2", "d1", 2)], [("u5", "d2", 5), ("u6", "d2", 6)]):
        lake.write(events(spark, rows).coalesce(1), table)
    lake.write(events(spark, [("u8", "d3", 8), ("u9", "d3", 9)]).coalesce(1), table)
    hit = lake.read_range(table, "user_id", "u5", "u7")
    assert rows_of(hit) == [("u5", "d2", 5), ("u6", "d2", 6)]
    scans = _plan_scans(lake.read_range(table, "user_id", "u5", "u7"))
    assert scans == [1], scans  # Delta skipped two of the three files at planning
    assert rows_of(lake.read_range(table, "user_id", "u0", "u0")) == []
    assert rows_of(lake.read_range(table, "user_id", "u2", "u8")) == [
        ("u2", "d1", 2), ("u5", "d2", 5), ("u6", "d2", 6), ("u8", "d3", 8)
    ]  # fmt: skip


def test_commit_rows_counts_what_a_commit_added_from_the_log(lake, spark, table):
    v0 = lake.write(events(spark, [("u1", "d1", 1), ("u2", "d1", 2), ("u3", "d2", 3)]), table)
    v1 = lake.write(events(spark, [("u4", "d1", 4)]), table)
    v2 = lake.write(events(spark, [("u5", "d1", 5), ("u6", "d1", 6)]), table, "overwrite")
    assert [lake.commit_rows(table, v) for v in (v0, v1, v2)] == [3, 1, 2]


# delta-rs 1.6.6 skips every file on a predicate over a boolean column of a table written by
# delta-spark (which records a null count but no min/max for booleans): delta-io/delta-rs#4490.
# Readers filter such columns after reading (docs/lake.md); the test below shows the defect.
DELTA_RS_BOOLEAN_PRUNING = {"bo"}


def test_delta_rs_prunes_every_file_on_a_boolean_predicate_of_a_delta_spark_table(
    lake, spark, table
):
    """The upstream defect the readers work around; when this fails, delta-rs fixed it: drop
    DELTA_RS_BOOLEAN_PRUNING and the note in docs/lake.md."""
    lake.write(spark.createDataFrame([(1, True), (2, False)], "id long, bo boolean"), table)
    import pyarrow.compute as pc

    pruned = DeltaTable(table).to_pyarrow_table(filters=pc.field("bo") == True)  # noqa: E712
    assert pruned.num_rows == 0
    assert DeltaTable(table).to_pyarrow_table().filter(pc.field("bo") == True).num_rows == 1  # noqa: E712


def _plan_scans(df) -> list[int]:
    """Run ``df`` and return the number of files each of its scans read."""
    df.collect()
    plan = df._jdf.queryExecution().executedPlan()
    if plan.getClass().getSimpleName() == "AdaptiveSparkPlanExec":
        plan = plan.executedPlan()
    leaves = plan.collectLeaves()
    out = []
    for i in range(leaves.size()):
        metrics = leaves.apply(i).metrics()
        if metrics.contains("numFiles"):
            out.append(int(metrics.apply("numFiles").value()))
    return out


# ---- the defects of the engines before delta-spark ran: each test failed on that code ------


@pytest.mark.slow
def test_two_merges_of_the_same_key_into_a_new_table_insert_it_once(lake, spark, tmp_path, table):
    """Both writers find no table; the held one creates it, the test merges the same key
    and commits first; the held merge then conflicts, is retried, and updates the key."""
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(
        table, tmp_path / "lake", 10, 1, op="merge", pause_at="write", pause_dir=pause
    )
    wait_until_held(proc, pause)
    lake.merge(ids_table(spark, [10], 99), table, keys=["id"])
    release(proc, pause)
    assert rows_any(lake.read(table).select("id", "writer")) == [(10, 10)]


@pytest.mark.slow
def test_two_partition_overwrites_of_a_new_table_keep_both_partitions(lake, spark, tmp_path, table):
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(
        table, tmp_path / "lake", 1, 2, op="replace_where", pause_at="write", pause_dir=pause
    )
    wait_until_held(proc, pause)
    mine = ids_table(spark, [7, 8, 9], 2).withColumn("part", F.lit(2))
    lake.write(mine, table, "overwrite", partition_by=["part"], replace_where={"part": 2})
    release(proc, pause)
    got = rows_any(lake.read(table).select("part", "id"))
    assert got == [(1, 1), (1, 2), (2, 7), (2, 8), (2, 9)]


@pytest.mark.slow
def test_two_writers_adding_different_columns_keep_both(lake, spark, tmp_path, table):
    lake.write(ids_table(spark, range(3), -1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(
        table, tmp_path / "lake", 100, 1, op="add_column", pause_at="write", pause_dir=pause
    )
    wait_until_held(proc, pause)
    lake.write(ids_table(spark, [200], 2).withColumn("c2", F.lit(2)), table, merge_schema=True)
    release(proc, pause)
    df = lake.read(table)
    assert {"c100", "c2"} <= set(df.columns)
    got = {r.id: (r.c100, r.c2) for r in df.collect()}
    assert got == {
        0: (None, None),
        1: (None, None),
        2: (None, None),
        100: (100, None),
        200: (None, 2),
    }


@pytest.mark.slow
def test_a_delete_that_conflicts_is_retried_not_reported_as_a_bad_predicate(
    lake, spark, tmp_path, table
):
    lake.write(ids_table(spark, range(10), -1).coalesce(1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(
        table, tmp_path / "lake", 5, 1, op="delete", pause_at="write", pause_dir=pause
    )
    wait_until_held(proc, pause)
    lake.merge(ids_table(spark, [6], 99), table, keys=["id"])  # rewrites the delete's file
    out = release(proc, pause)
    assert "deleted 1" in out, out
    got = {r.id: r.writer for r in lake.read(table).collect()}
    assert got == {**{i: -1 for i in range(10) if i not in (5, 6)}, 6: 99}


def test_read_range_keeps_rows_past_the_millisecond_of_a_timestamp_statistic(lake, spark, table):
    """Delta's statistics keep timestamps to the millisecond: the largest value of a file can
    lie up to 1 ms above its recorded maximum, and a range ending there must keep it."""
    base = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    rows = [(i, base.replace(microsecond=us)) for i, us in enumerate([0, 400, 999])]
    lake.write(spark.createDataFrame(rows, "id long, ts timestamp").coalesce(1), table)
    hi = base.replace(microsecond=999)
    got = lake.read_range(table, "ts", base.replace(microsecond=500), hi)
    assert [r.id for r in got.collect()] == [2]


def test_settings_of_one_operation_do_not_leak_into_the_session(lake, spark, table):
    keys = [
        "spark.databricks.delta.schema.autoMerge.enabled",
        "spark.databricks.delta.commitInfo.userMetadata",
        "spark.databricks.delta.retentionDurationCheck.enabled",
        "spark.databricks.delta.optimize.maxFileSize",
    ]
    before = {k: spark.conf.get(k, None) for k in keys}
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    wider = events(spark, [("u1", "d1", 2)]).withColumn("extra", F.lit("x"))
    lake.merge(wider, table, keys=["user_id"], merge_schema=True)
    lake.delete(table, "user_id = 'nobody'")
    lake.compact(table, target_mb=1)
    lake.vacuum(table, retention_hours=0, lite=True)
    assert {k: spark.conf.get(k, None) for k in keys} == before
    # a later plain merge does not evolve the schema: the setting did not stay on
    with pytest.raises(SchemaMismatchError, match="merge_schema=True"):
        lake.merge(wider.withColumn("more", F.lit(1)), table, keys=["user_id"])


def test_time_travel_after_the_last_commit_and_to_a_missing_version(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    lake.write(events(spark, [("u2", "d1", 2)]), table)
    later = datetime(2999, 1, 1, tzinfo=UTC)  # after the last commit: the latest version
    assert rows_of(lake.read(table, timestamp=later)) == [("u1", "d1", 1), ("u2", "d1", 2)]
    with pytest.raises(PatternlakeError, match="version 7 does not exist"):
        lake.read(table, version=7)
    lake.expire_history(table)  # versions 0 and 1 lose their log: time travel to them ends
    with pytest.raises(PatternlakeError, match="version 0 does not exist"):
        lake.read(table, version=0).count()
    assert lake.read(table).count() == 2


def test_a_bad_delete_predicate_is_a_clear_user_error(lake, spark, table):
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    with pytest.raises(PatternlakeError, match="bad predicate"):
        lake.delete(table, "user_id = = 'u1'")
    with pytest.raises(PatternlakeError, match="bad predicate"):
        lake.delete(table, "no_such_column = 1")
    assert lake.read(table).count() == 1


def test_files_refuses_a_version_with_deletion_vectors_until_purged(lake, spark, table):
    """Training and evaluation read a version's Parquet files directly: a deletion vector
    would hide nothing from them. The lake's tables are created without them; a table whose
    owner turned them on is refused until purged."""
    lake.write(events(spark, [(f"u{i}", "d1", i) for i in range(10)]).coalesce(1), table)
    props = spark.sql(f"SHOW TBLPROPERTIES delta.`{table}`").collect()
    assert {r.key: r.value for r in props}.get("delta.enableDeletionVectors") == "false"
    spark.sql(
        f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')"
    )
    lake.delete(table, "n < 3")
    with pytest.raises(PatternlakeError, match="deletion vectors"):
        lake.files(table)
    lake.purge(table)
    files = lake.files(table)
    assert sum(pq.read_metadata(f.removeprefix("file:")).num_rows for f in files) == 7


def test_a_table_written_by_delta_spark_reads_the_same_in_deltalake_pandas_and_duckdb(
    lake, spark, table
):
    import duckdb

    from patternlake.sequence_schema import SequenceVocabulary

    vocabulary = SequenceVocabulary(("view", "buy"), max_len=20)
    rows = [(f"u{i}", [i, i + 1], [1, 2], [0, 3]) for i in range(20)]
    df = spark.createDataFrame(
        rows, "user_id string, item_seq array<int>, type_seq array<int>, gap_seq array<int>"
    )
    lake.write(vocabulary.attach(df), table, partition_by=[])
    lake.merge(
        vocabulary.attach(df.limit(2).withColumn("item_seq", F.array(F.lit(99)))),
        table,
        keys=["user_id"],
    )
    expected = sorted(
        (r.user_id, list(r.item_seq), list(r.type_seq)) for r in lake.read(table).collect()
    )

    dt = DeltaTable(table)
    via_deltalake = sorted(
        (r["user_id"], r["item_seq"], r["type_seq"]) for r in dt.to_pyarrow_table().to_pylist()
    )
    pdf = dt.to_pandas()
    via_pandas = sorted(
        (u, list(i), list(t))
        for u, i, t in zip(pdf.user_id, pdf.item_seq, pdf.type_seq, strict=True)
    )
    con = duckdb.connect()
    con.register("t", dt.to_pyarrow_dataset())
    via_duckdb = sorted(
        (u, list(i), list(t))
        for u, i, t in con.execute("SELECT user_id, item_seq, type_seq FROM t").fetchall()
    )
    assert via_deltalake == via_pandas == via_duckdb == expected
    assert len(expected) == 20 and ("u0", [99], [1, 2]) in expected
    # the column metadata (the vocabulary) is the same through delta-rs as through Spark
    import json

    meta = {f.name: f.metadata for f in dt.schema().fields}
    spark_meta = {f.name: f.metadata for f in lake.schema(table).fields}
    for name, value in spark_meta.items():
        got = {
            k: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
            for k, v in meta[name].items()
        }
        assert got == value, name
    assert SequenceVocabulary.from_schema(lake.schema(table)) == vocabulary


def test_missing_delta_jars_are_one_clear_line_naming_the_set_up_step(monkeypatch, tmp_path):
    from patternlake.spark import DELTA_JARS_ENV, _delta_jars

    monkeypatch.setenv(DELTA_JARS_ENV, str(tmp_path / "empty"))
    with pytest.raises(PatternlakeError, match=r"make setup.*fetch_delta_jars"):
        _delta_jars()


def test_conflicts_past_the_retry_deadline_are_reported_clearly(monkeypatch):
    from patternlake.errors import ConcurrentCommitError
    from patternlake.lake import tables

    calls = []

    def always_beaten() -> int:
        calls.append(1)
        raise ConcurrentCommitError("t: another writer committed a conflicting change first")

    monkeypatch.setattr(tables, "RETRY_DEADLINE_S", 0.0)
    monkeypatch.setattr(tables.time, "sleep", lambda s: None)
    with pytest.raises(
        ConcurrentCommitError, match=r"merge into t: 1 commit conflicts .* nothing was committed"
    ):
        tables._retrying("merge into t", always_beaten)
    assert len(calls) == 1
