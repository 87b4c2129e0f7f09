import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from patternlake.errors import PatternlakeError
from patternlake.ingest.ingest import ingest
from patternlake.quality import validate
from patternlake.quality.validate import validate_pending
from tests.conftest import with_overrides

CORPUS = Path(__file__).parents[1] / "data" / "bad_input"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


def check_invariant(lake, batch_id):
    report = (
        lake.read("validation_results")
        .filter(F.col("batch_id") == batch_id)
        .orderBy(F.desc("validated_at"))
        .first()
    )
    bronze = lake.read("bronze_events").filter(F.col("_batch_id") == batch_id).count()
    silver = lake.read("silver_events").filter(F.col("_batch_id") == batch_id).count()
    quarantined = lake.read("quarantine_events").filter(F.col("_batch_id") == batch_id).count()
    assert bronze == report.bronze_rows == silver + quarantined + report.duplicate_rows
    assert (silver, quarantined) == (report.silver_rows, report.quarantined_rows)
    return report


@pytest.mark.parametrize("folder", ["jsonl", "csv"])
def test_bad_input_corpus_every_bad_row_quarantined_with_its_reasons(spark, stage, folder):
    config, lake = stage
    config = with_overrides(config, validate={"max_invalid_share": 1.0})
    batch = ingest(spark, lake, config, str(CORPUS / folder)).batch_id
    [report] = validate_pending(spark, lake, config)
    assert report.status == "passed"
    check_invariant(lake, batch)

    quarantine = lake.read("quarantine_events").collect()
    by_id = {r.event_id: sorted(r.reasons) for r in quarantine}
    silver_ids = {r.event_id for r in lake.read("silver_events").collect()}
    expected = {
        k: v
        for k, v in EXPECTED["by_event_id"].items()
        if (k.startswith("c-") == (folder == "csv"))
    }
    assert expected
    for event_id, reasons in expected.items():
        if reasons:
            assert by_id.get(event_id) == sorted(reasons), event_id
        else:
            assert event_id in silver_ids, event_id
    if folder == "jsonl":
        for prefix, reasons in EXPECTED["by_raw_prefix"].items():
            [row] = [r for r in quarantine if r._raw and r._raw.startswith(prefix)]
            assert sorted(row.reasons) == sorted(reasons)
        assert report.duplicate_rows == 2  # ok-iso-z delivered three times
        props = lake.read("silver_events").filter("event_id = 'ok-extra-props'").first().properties
        assert json.loads(props["ctx"]) == {"page": "home"} and props["price"] == "9.5"
        times = {r.event_id: r.event_time.isoformat() for r in lake.read("silver_events").collect()}
        assert times["ok-iso-offset"] == times["ok-iso-z"] == "2026-03-01T10:00:00"
        assert times["ok-epoch-ms"] == "2026-03-01T10:00:00.123000"
    # the GX result and the HTML report are kept
    record = lake.read("validation_results").first()
    gx = json.loads(record.gx_result)
    assert gx["statistics"]["evaluated_expectations"] == 14
    assert "Quarantine reasons" in Path(record.report_path).read_text()


def test_too_many_invalid_rows_fail_the_batch_and_lose_nothing(spark, stage):
    config, lake = stage
    batch = ingest(spark, lake, config, str(CORPUS / "jsonl")).batch_id
    with pytest.raises(
        PatternlakeError, match=r"invalid rows \(limit validate.max_invalid_share=20%"
    ) as err:
        validate_pending(spark, lake, config)
    assert "Nothing was lost" in str(err.value)
    assert not lake.exists("silver_events")
    assert lake.read("quarantine_events").count() == 15
    assert lake.read("validation_results").first().status == "failed"
    # raise the limit: the same batch passes on the next run, quarantine is not doubled
    relaxed = with_overrides(config, validate={"max_invalid_share": 0.9})
    [report] = validate_pending(spark, lake, relaxed)
    assert report.status == "passed"
    assert lake.read("quarantine_events").count() == 15
    check_invariant(lake, batch)
    assert validate_pending(spark, lake, relaxed) == []  # nothing left to do


@pytest.mark.parametrize("lookup", ["broadcast", "shuffle"])
def test_generated_batches_validate_clean_and_dedupe_across_batches(
    spark, stage, small_events, tmp_path, monkeypatch, lookup
):
    # both ways of finding the batch's ids already in silver: the batch's ids broadcast
    # (small batches) and silver's ids joined by a shuffle (large ones)
    monkeypatch.setattr(validate, "BROADCAST_LOOKUP_ROWS", 10**9 if lookup == "broadcast" else 0)
    config, lake = stage
    files = sorted((small_events / "events").iterdir())
    first = ingest(spark, lake, config, str(files[0])).batch_id
    # a re-delivery of some first-batch rows inside the second batch must count as duplicates
    redelivered = tmp_path / "second.csv"
    head = files[0].read_text().splitlines()[:51]
    redelivered.write_text("\n".join(head + files[1].read_text().splitlines()[1:]) + "\n")
    second = ingest(spark, lake, config, str(redelivered)).batch_id
    reports = {r.batch_id: r for r in validate_pending(spark, lake, config)}
    assert reports[first].quarantined_rows == 0 and reports[second].quarantined_rows == 0
    assert reports[second].duplicate_rows >= 50
    for b in (first, second):
        check_invariant(lake, b)
    silver = lake.read("silver_events")
    assert silver.count() == silver.select("event_id").distinct().count() == 15_000
    # a small batch is not spread over spark.sql.shuffle.partitions files
    assert len(lake.files("silver_events")) <= 4


RESULT_KEYS = (
    "element_count",
    "unexpected_count",
    "unexpected_percent",
    "missing_count",
    "missing_percent",
    "unexpected_percent_total",
    "unexpected_percent_nonmissing",
)


def _by_expectation(gx_result: dict) -> dict:
    out = {}
    for res in gx_result["results"]:
        cfg = res["expectation_config"]
        # GX resolves $PARAMETER values in the kwargs it reports: key by what is not resolved
        key = (cfg["type"], cfg["kwargs"]["column"], (cfg.get("meta") or {}).get("reason"))
        numbers = {k: res["result"].get(k) for k in RESULT_KEYS if k in res["result"]}
        assert key not in out, key
        out[key] = (res["success"], {k: round(v, 9) if v else v for k, v in numbers.items()})
    return out


@pytest.mark.parametrize("folder", ["jsonl", "csv"])
def test_single_pass_record_equals_what_great_expectations_computes(spark, stage, tmp_path, folder):
    """validate.gx=record builds GX's result from one pass over the batch; validate.gx=run lets
    GX scan the batch itself. On the bad-input corpus both give the same result per
    expectation: success, counts and percentages, and the same overall statistics."""
    from patternlake.lake import Lake

    config, _ = stage
    results = {}
    for mode in ("record", "run"):
        cfg = with_overrides(config, validate={"max_invalid_share": 1.0, "gx": mode})
        cfg = cfg.model_copy(
            update={"lake": cfg.lake.model_copy(update={"root": str(tmp_path / mode)})}
        )
        lk = Lake(spark, cfg.lake)
        ingest(spark, lk, cfg, str(CORPUS / folder))
        validate_pending(spark, lk, cfg)
        results[mode] = json.loads(lk.read("validation_results").first().gx_result)
    record, gx = results["record"], results["run"]
    assert record["statistics"] == gx["statistics"]
    assert record["success"] == gx["success"]
    assert _by_expectation(record) == _by_expectation(gx)
    # the corpus does break expectations (the comparison is not between two clean results)
    assert any(r["result"].get("unexpected_count") for r in record["results"])
