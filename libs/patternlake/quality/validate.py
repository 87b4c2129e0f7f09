"""validate: ``bronze_events`` -> ``silver_events`` (typed, deduplicated, valid) and
``quarantine_events`` (every rejected row with all its reason codes).

Batches are validated in ingest order, each once it has passed. For every batch:

    bronze rows = silver rows + quarantined rows + duplicates

is checked by the job itself; a batch whose invalid share exceeds
``validate.max_invalid_share`` is quarantined, recorded as failed and stops the job with a
clear message (nothing is lost: bronze keeps it, quarantine holds the bad rows, and the
next run retries it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake, batches_in_order
from patternlake.quality.report import render_html
from patternlake.quality.suite import EventSuite, load_suite, row_reasons, run_gx

log = logging.getLogger(__name__)

SILVER_COLUMNS = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "event_time",
    "properties",
    "_batch_id",
    "_source_file",
    "_line_ordinal",
    "_ingested_at",
)


@dataclass
class BatchReport:
    batch_id: str
    status: str  # passed | failed
    bronze_rows: int
    silver_rows: int
    quarantined_rows: int
    duplicate_rows: int
    invalid_share: float
    reason_counts: dict[str, int] = field(default_factory=dict)
    gx_success: bool = False
    report_path: str = ""


def typed_events(bronze: DataFrame, default_event_type: str) -> DataFrame:
    """Bronze strings -> typed columns the suite checks (bad values become null, never errors)."""
    raw_time = F.trim(F.col("event_time"))
    numeric = raw_time.rlike(r"^-?\d{1,16}(\.\d+)?$")
    number = raw_time.try_cast("double")
    parsed = (
        F.when(
            numeric & (F.abs(number) >= 1e11), F.timestamp_seconds(number / 1000)
        )  # epoch millis
        .when(numeric, F.timestamp_seconds(number))  # epoch seconds
        .otherwise(raw_time.try_cast("timestamp"))  # ISO-8601, with or without zone
    )
    user = F.nullif(F.trim(F.col("user_id")), F.lit(""))
    item = F.nullif(F.trim(F.col("item_id")), F.lit(""))
    etype = F.coalesce(
        F.nullif(F.lower(F.trim(F.col("event_type"))), F.lit("")), F.lit(default_event_type)
    )
    given_id = F.nullif(F.trim(F.col("event_id")), F.lit(""))
    row_hash = F.sha2(
        F.concat_ws(
            "\u001f",
            user,
            item,
            raw_time,
            etype,
            F.to_json(F.array_sort(F.map_entries(F.col("properties")))),
            F.col("_raw"),  # unparsable rows differ only here
        ),
        256,
    ).substr(1, 32)
    return bronze.select(
        F.coalesce(given_id, F.concat(F.lit("h:"), row_hash)).alias("event_id"),
        user.alias("user_id"),
        item.alias("item_id"),
        etype.alias("event_type"),
        F.col("event_time").alias("event_time_raw"),
        parsed.alias("event_time"),
        "properties",
        "_raw",
        "_batch_id",
        "_source_file",
        _optional_long(bronze, "_line_ordinal"),
        "_ingested_at",
    )


def _optional_long(df: DataFrame, name: str) -> Column:
    """A column that tables written before it existed lack (null there)."""
    return F.col(name) if name in df.columns else F.lit(None).cast("long").alias(name)


def validate_pending(spark: SparkSession, lake: Lake, config: Config) -> list[BatchReport]:
    """Validate every bronze batch that has not passed yet, oldest first."""
    if not lake.exists("bronze_events"):
        raise PatternlakeError(
            "validate: bronze_events does not exist yet; run `patternlake ingest PATH` first"
        )
    bronze = lake.read("bronze_events")
    batches = batches_in_order(bronze)
    passed: set[str] = set()
    if lake.exists("validation_results"):
        passed = {
            r[0]
            for r in lake.read("validation_results")
            .filter("status = 'passed'")
            .select("batch_id")
            .collect()
        }
    pending = [b for b in batches if b not in passed]
    if not pending:
        log.info("validate: nothing to do, all %d batches passed before", len(batches))
    suite = load_suite(config.validate_)
    return [validate_batch(spark, lake, config, suite, b) for b in pending]


def validate_batch(
    spark: SparkSession, lake: Lake, config: Config, suite: EventSuite, batch_id: str
) -> BatchReport:
    started = time.monotonic()
    conf = config.validate_
    bronze = lake.read("bronze_events").filter(F.col("_batch_id") == batch_id)
    typed = typed_events(bronze, config.ingest.default_event_type)
    tagged = typed.withColumn("reasons", row_reasons(suite))

    # one pass: totals and the count of every reason
    reasons = sorted({e.reason for e in suite.quarantine_rules})
    aggs: list[Column] = [
        F.count(F.lit(1)).alias("total"),
        F.sum(F.when(F.size("reasons") > 0, 1).otherwise(0)).alias("bad"),
    ]
    aggs += [
        F.sum(F.array_contains("reasons", r).cast("int")).alias(f"r{i}")
        for i, r in enumerate(reasons)
    ]
    stats = tagged.agg(*aggs).first()
    total, bad = int(stats["total"]), int(stats["bad"] or 0)
    reason_counts = {r: int(stats[f"r{i}"] or 0) for i, r in enumerate(reasons) if stats[f"r{i}"]}

    gx_result = run_gx(typed, suite, batch_id)
    _check_agreement(gx_result, reason_counts)

    now = datetime.now(UTC)
    quarantine = tagged.filter(F.size("reasons") > 0).select(
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "event_time_raw",
        "event_time",
        "properties",
        "_raw",
        "reasons",
        "_batch_id",
        "_source_file",
        "_ingested_at",
        F.lit(now).alias("_validated_at"),
    )
    # always written: an empty partition also replaces rows of an earlier failed attempt
    lake.write(
        quarantine,
        "quarantine_events",
        "overwrite",
        replace_where={"_batch_id": batch_id},
        commit_info={"patternlake.batch_id": batch_id},
    )

    share = bad / total if total else 0.0
    status = "passed" if share <= conf.max_invalid_share else "failed"
    silver_rows = duplicates = 0
    if status == "passed":
        valid = tagged.filter(F.size("reasons") == 0)
        first = Window.partitionBy("event_id").orderBy(
            "_source_file", "_line_ordinal", "event_time", "user_id", "item_id"
        )
        deduped = valid.withColumn("_n", F.row_number().over(first)).filter("_n = 1")
        if lake.exists("silver_events"):
            known = lake.read("silver_events").select("event_id")
            deduped = deduped.join(known, "event_id", "left_anti")
        lake.write(
            deduped.select(*SILVER_COLUMNS),
            "silver_events",
            "append",
            commit_info={"patternlake.batch_id": batch_id},
        )
        silver_rows = lake.read("silver_events").filter(F.col("_batch_id") == batch_id).count()
        duplicates = total - bad - silver_rows
        if total != silver_rows + bad + duplicates or duplicates < 0:
            raise RuntimeError(
                f"validate {batch_id}: rows lost: bronze {total} != silver {silver_rows} + "
                f"quarantined {bad} + duplicates {duplicates}"
            )

    report = BatchReport(
        batch_id=batch_id,
        status=status,
        bronze_rows=total,
        silver_rows=silver_rows,
        quarantined_rows=bad,
        duplicate_rows=duplicates,
        invalid_share=round(share, 6),
        reason_counts=reason_counts,
        gx_success=bool(gx_result.get("success")),
    )
    report.report_path = _write_html(lake, config, report, gx_result)
    _record(spark, lake, report, gx_result, now)
    log.info(
        "validate %s: %s, bronze=%d silver=%d quarantined=%d duplicates=%d reasons=%s (%.1fs)",
        batch_id,
        status,
        total,
        silver_rows,
        bad,
        duplicates,
        reason_counts,
        time.monotonic() - started,
    )
    if status == "failed":
        top = ", ".join(
            f"{k}={v}" for k, v in sorted(reason_counts.items(), key=lambda kv: -kv[1])[:5]
        )
        raise PatternlakeError(
            f"validate: batch {batch_id} has {share:.1%} invalid rows (limit validate.max_invalid_share="
            f"{conf.max_invalid_share:.0%}; {top}). Nothing was lost: the bad rows are in quarantine_events, "
            f"the batch stays in bronze_events and is retried by the next validate; report: {report.report_path}"
        )
    return report


def _check_agreement(gx_result: dict[str, Any], reason_counts: dict[str, int]) -> None:
    """GX's unexpected counts must match the row-level split (else the split is wrong)."""
    for res in gx_result.get("results", []):
        meta = (res.get("expectation_config") or {}).get("meta") or {}
        reason = meta.get("reason")
        if meta.get("action") == "deduplicate" or reason is None:
            continue
        if res.get("exception_info", {}).get("raised_exception"):
            raise RuntimeError(f"great expectations failed on {reason}: {res['exception_info']}")
        gx_count = int((res.get("result") or {}).get("unexpected_count") or 0)
        if gx_count != reason_counts.get(reason, 0):
            raise RuntimeError(
                f"validate: GX counts {gx_count} rows breaking {reason}, the row split {reason_counts.get(reason, 0)}"
            )


def _record(
    spark: SparkSession, lake: Lake, report: BatchReport, gx_result: dict[str, Any], now: datetime
) -> None:
    row = asdict(report)
    row["reason_counts"] = {k: int(v) for k, v in row["reason_counts"].items()}
    row["gx_result"] = json.dumps(gx_result, default=str)
    row["validated_at"] = now
    schema = (
        "batch_id string, status string, bronze_rows bigint, silver_rows bigint, quarantined_rows bigint, "
        "duplicate_rows bigint, invalid_share double, reason_counts map<string,bigint>, gx_success boolean, "
        "report_path string, gx_result string, validated_at timestamp"
    )
    cols = [c.split()[0] for c in schema.split(", ")]
    lake.write(
        spark.createDataFrame([tuple(row[c] for c in cols)], schema), "validation_results", "append"
    )


def _write_html(lake: Lake, config: Config, report: BatchReport, gx_result: dict[str, Any]) -> str:
    path = f"{lake.root}/{config.validate_.report_dir.strip('/')}/{report.batch_id}.html"
    fs, p = pafs.FileSystem.from_uri(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(render_html(asdict(report), gx_result).encode("utf-8"))
    return path
