import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from patternlake.errors import PatternlakeError
from patternlake.ingest.ingest import ingest, parse_mapping
from patternlake.ingest.sources import _decoded_path, source_file, source_file_lookup

MOVIELENS = (
    "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n196\t51\t2\t880606923\n"
)


def test_movielens_layout_loads_with_only_a_mapping(spark, stage, tmp_path):
    config, lake = stage
    f = tmp_path / "u.data"
    f.write_text(MOVIELENS)
    result = ingest(
        spark,
        lake,
        config,
        str(f),
        "tsv",
        parse_mapping("user_id=0,item_id=1,event_time=3,rating=2"),
    )
    assert result.rows == 4
    rows = {r.item_id: r for r in lake.read("bronze_events").collect()}
    assert rows["242"].user_id == "196"
    assert rows["242"].event_time == "881250949"
    assert rows["242"].properties == {"rating": "3"}
    assert rows["242"]._source_file == str(f)


def test_source_file_is_the_decoded_path_whether_looked_up_or_decoded_per_row(
    spark, stage, tmp_path
):
    # spaces, '%', '+' and non-ASCII in the path: Spark's URI escapes them; ingest records the
    # path itself, through the per-file lookup and through the per-row decoding alike
    config, lake = stage
    folder = tmp_path / "odd dir %20 +é"
    folder.mkdir()
    (folder / "a b.tsv").write_text(MOVIELENS)
    (folder / "c%41+.tsv").write_text(MOVIELENS.replace("196", "197"))  # other content
    result = ingest(
        spark, lake, config, str(folder), "tsv", parse_mapping("user_id=0,item_id=1,event_time=3")
    )
    assert result.rows == 8  # rows per file go by the file's fingerprint, found by its path
    files = {r._source_file for r in lake.read("bronze_events").select("_source_file").collect()}
    assert files == {str(folder / "a b.tsv"), str(folder / "c%41+.tsv")}

    df = spark.read.option("sep", "\t").csv(str(folder))
    raw = F.col("_metadata.file_path")
    both = df.select(source_file(df).alias("looked_up"), _decoded_path(raw).alias("decoded"))
    assert both.filter(F.col("looked_up") != F.col("decoded")).count() == 0
    assert both.count() == 8
    # and the lookup is what answers: every row's file is in it
    lookup = source_file_lookup(df)
    assert df.filter(lookup[raw].isNull()).count() == 0


def test_reingesting_the_same_file_is_a_reported_noop(spark, stage, tmp_path):
    config, lake = stage
    f = tmp_path / "u.data"
    f.write_text(MOVIELENS)
    mapping = parse_mapping("user_id=0,item_id=1,event_time=3")
    first = ingest(spark, lake, config, str(f), "tsv", mapping)
    again = ingest(spark, lake, config, str(f), "tsv", mapping)
    assert not first.noop and again.noop and again.skipped == [str(f)]
    assert lake.read("bronze_events").count() == 4
    # the same content under another name is the same data
    copy = tmp_path / "copy.tsv"
    copy.write_text(MOVIELENS)
    assert ingest(spark, lake, config, str(copy), None, mapping).noop


def test_header_csv_with_default_mapping_and_properties(spark, stage, tmp_path):
    config, lake = stage
    f = tmp_path / "e.csv"
    f.write_text(
        "user_id,item_id,event_time,category,price\nu1,i1,2026-01-01T00:00:00+01:00,books,9.5\n"
    )
    ingest(spark, lake, config, str(f))
    row = lake.read("bronze_events").first()
    assert (row.user_id, row.item_id, row.event_type, row.event_id) == ("u1", "i1", None, None)
    assert row.properties == {"category": "books", "price": "9.5"}
    assert row._batch_id and row._ingested_at and row._source_format == "csv"


def test_parquet_with_typed_columns_and_renamed_fields(spark, stage, tmp_path):
    config, lake = stage
    when = dt.datetime(2026, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    pq.write_table(
        pa.table(
            {
                "who": ["a", "b"],
                "what": [1, 2],
                "ts": pa.array([when, when], pa.timestamp("ms", tz="UTC")),
            }
        ),
        tmp_path / "x.parquet",
    )
    ingest(
        spark,
        lake,
        config,
        str(tmp_path),
        mapping=parse_mapping("user_id=who,item_id=what,event_time=ts"),
    )
    rows = sorted(lake.read("bronze_events").collect(), key=lambda r: r.user_id)
    assert [r.item_id for r in rows] == ["1", "2"]
    assert rows[0].event_time.startswith("2026-02-03T04:05:06")


@pytest.mark.parametrize(
    ("content", "mapping", "message"),
    [
        (
            "user,item,ts\nu,i,1\n",
            None,
            "column 'user_id' (mapped to user_id) is not in the input; its columns are: user, item, ts",
        ),
        (
            "user_id,item_id,ts\nu,i,1\n",
            "user_id=user_id,item_id=item_id,event_time=ts,event_type=kind",
            "column 'kind' (mapped to event_type)",
        ),
        (
            "user_id,item_id,ts\nu,i,1\n",
            "user_id=user_id,item_id=item_id",
            "required field 'event_time'",
        ),
        ("1\t2\t3\n", "user_id=0,item_id=1,event_time=7", "columns 0..2"),
    ],
)
def test_wrong_mapping_fails_the_whole_batch_naming_the_column(
    spark, stage, tmp_path, content, mapping, message
):
    config, lake = stage
    f = tmp_path / ("e.csv" if "," in content else "e.tsv")
    f.write_text(content)
    with pytest.raises(PatternlakeError, match="ingest") as err:
        ingest(spark, lake, config, str(f), None, parse_mapping(mapping))
    assert message in str(err.value)
    assert not lake.exists("bronze_events")


def test_unusable_paths_are_user_errors(spark, stage, tmp_path):
    config, lake = stage
    with pytest.raises(PatternlakeError, match="does not exist"):
        ingest(spark, lake, config, str(tmp_path / "nope"))
    (tmp_path / "a.csv").write_text("user_id,item_id,event_time\nu,i,1\n")
    (tmp_path / "b.jsonl").write_text('{"user_id": "u"}\n')
    with pytest.raises(PatternlakeError, match="mixes formats"):
        ingest(spark, lake, config, str(tmp_path))
    (tmp_path / "c.data").write_text("x")
    with pytest.raises(PatternlakeError, match="pass --format"):
        ingest(spark, lake, config, str(tmp_path / "c.data"))
    with pytest.raises(PatternlakeError, match="--map"):
        parse_mapping("user_id")


def test_generated_events_ingest_every_row(spark, stage, small_events):
    config, lake = stage
    result = ingest(spark, lake, config, str(small_events / "events"))
    bronze = lake.read("bronze_events")
    lines = sum(
        len(f.read_text().splitlines()) - 1 for f in (small_events / "events").iterdir()
    )  # minus headers
    assert result.rows == bronze.count() == lines
    assert bronze.filter(F.col("_raw").isNotNull()).count() == 0
