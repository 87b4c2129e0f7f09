"""The lake contract: every engine present must pass the same tests.

The native engine (``spark-delta``) needs the Delta Lake jars on Spark's classpath; Maven
Central is unreachable on these machines, so it is skipped here with the reason shown.
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
from patternlake.lake import Lake, make_engine
from patternlake.spark import delta_jars_loaded

WRITER = Path(__file__).with_name("writer_process.py")
NATIVE_SKIP = (
    "native Delta engine not tested: the io.delta:delta-spark jars are not on the Spark "
    "classpath (Maven Central is unreachable here); it runs on Databricks or with --packages"
)


@pytest.fixture(params=["delta-rs", "spark-delta"])
def lake(request, spark, config) -> Lake:
    if request.param == "spark-delta" and not delta_jars_loaded(spark):
        pytest.skip(NATIVE_SKIP)
    conf = config.lake.model_copy(update={"engine": request.param})
    return Lake(spark, conf, make_engine(spark, conf))


@pytest.fixture(params=["broadcast", "join"])
def merge_path(request, monkeypatch) -> str:
    """delta-rs merges a small source by broadcasting its keys, a large one by a full outer
    join: both must give Delta's MERGE semantics."""
    from patternlake.lake import deltars

    if request.param == "join":
        monkeypatch.setattr(deltars, "BROADCAST_MERGE_KEYS", -1)
    return request.param


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


def test_merge_updates_matching_keys_and_inserts_the_rest(lake, spark, table, merge_path):
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


def test_rewrite_and_merge_work_on_a_table_whose_version_has_no_files(
    lake, spark, table, merge_path
):
    lake.write(events(spark, []), table)  # e.g. quarantine_events after only clean batches
    out = lake.rewrite(table, F.col("user_id") == "u1", lambda df: df.filter(F.lit(False)))
    assert out["files"] == 0
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
    if lake.engine.name != "delta-rs":
        pytest.skip("subprocess writers use the default engine")
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
    versions = [h["version"] for h in lake.history(table)]
    assert sorted(versions) == list(range(10))  # ten commits, none lost or merged


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_previous_version_and_rerun_succeeds(
    lake, spark, tmp_path, table
):
    if lake.engine.name != "delta-rs":
        pytest.skip("subprocess writers use the default engine")
    lake.write(
        spark.range(10).withColumn("payload", F.lit("x")).withColumn("writer", F.lit(-1)), table
    )
    before = rows_of(lake.read(table))
    cmd = [sys.executable, str(WRITER), table, str(tmp_path / "lake"), "100", "1", "30000000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    staging = Path(table) / "_staging"
    deadline = time.time() + 180
    while time.time() < deadline and not (staging.exists() and any(staging.iterdir())):
        assert proc.poll() is None, "writer finished before it could be killed"
        time.sleep(0.05)
    time.sleep(1.0)  # Spark tasks are writing Parquet now
    assert proc.poll() is None, "writer finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # driver and its JVM, as a lost node would
    proc.wait(timeout=30)

    assert lake.version(table) == 0
    assert rows_of(lake.read(table)) == before
    assert DeltaTable(table).to_pyarrow_table().num_rows == 10

    rerun = subprocess.run([*cmd[:-1], "1000"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert lake.read(table).count() == 1010
    lake.vacuum(table, retention_hours=0)
    assert not staging.exists() or not any(staging.iterdir())
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
    """Issue 7, 2.1. A writer process computes its change (a merge of new key 1, or an
    overwrite), is held before committing, and the test commits a conflicting change first."""
    if lake.engine.name != "delta-rs":
        pytest.skip("subprocess writers use the default engine")
    lake.write(ids_table(spark, range(10), -1).coalesce(1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    op = "overwrite" if other == "append" else "merge"
    offset, rows = {"merge": (10, 1), "delete": (0, 1), "append": (100, 5)}[other]
    proc = start_writer(
        table, tmp_path / "lake", offset, rows, op=op, pause_at="commit", pause_dir=pause
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
        assert got == {i: 100 for i in range(100, 105)}  # the overwrite is the later commit


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
        if col not in ("bo", "bin"):
            tests["<"] = (field < scalar, F.col(col) < F.lit(value))
        if col != "nan":  # Spark ranks NaN above every number, Arrow compares it as false
            tests[">="] = (field >= scalar, F.col(col) >= F.lit(value))
        for op, (arrow_filter, spark_filter) in tests.items():
            via_deltalake = sorted(
                DeltaTable(table)
                .to_pyarrow_table(filters=arrow_filter, columns=["id"])["id"]
                .to_pylist()
            )
            via_spark = sorted(r.id for r in spark_df.filter(spark_filter).select("id").collect())
            if via_deltalake != via_spark:
                mismatches.append(f"{col} {op}: deltalake {via_deltalake}, spark {via_spark}")
    assert not mismatches, "\n".join(mismatches)


def _add_commit(table: str, actions: list[dict]) -> None:
    import json

    log = Path(table) / "_delta_log"
    version = max(int(p.stem) for p in log.glob("*.json")) + 1
    (log / f"{version:020d}.json").write_text("\n".join(json.dumps(a) for a in actions) + "\n")


def test_column_mapped_tables_are_refused_by_read_write_and_merge(lake, spark, table):
    """Issue 7, 2.4: column mapping at reader version 2 names no reader feature."""
    import json

    if lake.engine.name != "delta-rs":
        pytest.skip("the native engine reads column-mapped tables")
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    fields = json.loads(DeltaTable(table).schema().to_json())["fields"]
    for n, f in enumerate(fields, start=1):
        f["metadata"] = {"delta.columnMapping.id": n, "delta.columnMapping.physicalName": f["name"]}
    meta = DeltaTable(table).metadata()
    _add_commit(
        table,
        [
            {
                "commitInfo": {
                    "timestamp": int(time.time() * 1000),
                    "operation": "SET TBLPROPERTIES",
                }
            },
            {"protocol": {"minReaderVersion": 2, "minWriterVersion": 5}},
            {
                "metaData": {
                    "id": meta.id,
                    "format": {"provider": "parquet", "options": {}},
                    "schemaString": json.dumps({"type": "struct", "fields": fields}),
                    "partitionColumns": [],
                    "configuration": {
                        "delta.columnMapping.mode": "name",
                        "delta.columnMapping.maxColumnId": str(len(fields)),
                    },
                    "createdTime": int(time.time() * 1000),
                }
            },
        ],
    )
    assert DeltaTable(table).protocol().min_reader_version == 2
    for attempt in (
        lambda: lake.read(table),
        lambda: lake.merge(events(spark, [("u1", "d1", 2)]), table, keys=["user_id"]),
        lambda: lake.write(events(spark, [("u2", "d1", 2)]), table),
    ):
        with pytest.raises(PatternlakeError, match="columnMapping"):
            attempt()
    assert DeltaTable(table).version() == 1


def test_time_travel_before_the_first_commit_is_a_clear_error(lake, spark, table):
    """Issue 7, 2.5."""
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    with pytest.raises(PatternlakeError, match="no version at or before"):
        lake.read(table, timestamp=datetime(2000, 1, 1, tzinfo=UTC))
    assert lake.read(table, timestamp=datetime.now(UTC)).count() == 1


def test_merge_keys_follow_sql_semantics_and_update_every_matched_row(
    lake, spark, table, merge_path
):
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
        if "_delta_log" not in p.parts and "_staging" not in p.parts
    }


def _referenced(table: str) -> set[str]:
    return {str(Path(f).relative_to(table)) for f in DeltaTable(table).file_uris()}


@pytest.mark.slow
def test_vacuum_removes_the_files_of_a_writer_killed_between_move_and_commit(
    lake, spark, tmp_path, table
):
    """Issue 7, 2.7."""
    if lake.engine.name != "delta-rs":
        pytest.skip("subprocess writers use the default engine")
    lake.write(ids_table(spark, range(10), -1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(table, tmp_path / "lake", 100, 1000, pause_at="commit", pause_dir=pause)
    wait_until_held(proc, pause)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _parquet_on_disk(table) - _referenced(table), "the writer moved no file"
    lake.vacuum(table, retention_hours=0)
    assert _parquet_on_disk(table) == _referenced(table)
    staging = Path(table) / "_staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert lake.read(table).count() == 10


@pytest.mark.slow
@pytest.mark.parametrize("held_at", ["write", "commit"])
def test_vacuum_never_touches_a_writer_still_running(lake, spark, tmp_path, table, held_at):
    """Issue 7, 2.8: held while Spark writes its staging files, or after moving them into the
    table; a zero-retention vacuum meanwhile must leave them alone."""
    if lake.engine.name != "delta-rs":
        pytest.skip("subprocess writers use the default engine")
    lake.write(ids_table(spark, range(10), -1), table)
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = start_writer(table, tmp_path / "lake", 100, 1000, pause_at=held_at, pause_dir=pause)
    wait_until_held(proc, pause)
    time.sleep(0.5)
    lake.vacuum(table, retention_hours=0)
    release(proc, pause)
    assert lake.read(table).count() == 1010
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


def test_a_commit_followed_by_many_others_returns_its_own_version(lake, spark, table, monkeypatch):
    """Issue 7, 2.10: 101 commits by others land right after ours; the write still reports
    its version (a RuntimeError here would make callers write the data twice)."""
    if lake.engine.name != "delta-rs":
        pytest.skip("delta-rs commit path")
    lake.write(events(spark, [("u1", "d1", 1)]), table)
    commit = DeltaTable.create_write_transaction

    def commit_then_others(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        for _ in range(101):
            other = DeltaTable(table)
            commit(other, [], "append", other.schema())

    monkeypatch.setattr(DeltaTable, "create_write_transaction", commit_then_others)
    v = lake.write(events(spark, [("u2", "d1", 2)]), table, commit_info={"probe": "mine"})
    monkeypatch.undo()
    assert lake.version(table) == v + 101
    assert [h for h in lake.history(table) if h["version"] == v][0].get("probe") == "mine"
    assert lake.read(table).count() == 2


def test_read_range_reads_only_the_files_whose_statistics_overlap(lake, spark, table):
    # three appends = three files with disjoint user_id ranges (u1-u2, u5-u6, u8-u9)
    for rows in ([("u1", "d1", 1), ("u2", "d1", 2)], [("u5", "d2", 5), ("u6", "d2", 6)]):
        lake.write(events(spark, rows).coalesce(1), table)
    lake.write(events(spark, [("u8", "d3", 8), ("u9", "d3", 9)]).coalesce(1), table)
    hit = lake.read_range(table, "user_id", "u5", "u7")
    assert rows_of(hit) == [("u5", "d2", 5), ("u6", "d2", 6)]
    if lake.engine.__class__.__name__ == "DeltaRsEngine":  # native Delta skips files at planning
        assert len(hit.inputFiles()) == 1
    assert rows_of(lake.read_range(table, "user_id", "u0", "u0")) == []
    assert rows_of(lake.read_range(table, "user_id", "u2", "u8")) == [
        ("u2", "d1", 2), ("u5", "d2", 5), ("u6", "d2", 6), ("u8", "d3", 8)
    ]  # fmt: skip


def test_commit_rows_counts_what_a_commit_added_from_the_log(lake, spark, table):
    v0 = lake.write(events(spark, [("u1", "d1", 1), ("u2", "d1", 2), ("u3", "d2", 3)]), table)
    v1 = lake.write(events(spark, [("u4", "d1", 4)]), table)
    v2 = lake.write(events(spark, [("u5", "d1", 5), ("u6", "d1", 6)]), table, "overwrite")
    assert [lake.commit_rows(table, v) for v in (v0, v1, v2)] == [3, 1, 2]
