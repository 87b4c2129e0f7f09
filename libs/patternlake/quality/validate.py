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
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake, batches_in_order
from patternlake.lake.catalog import contract
from patternlake.quality.html_report import render_html
from patternlake.quality.suite import (
    DEDUPE_COUNT,
    EventSuite,
    gx_record,
    import_gx_in_background,
    load_suite,
    reason_counts,
    row_reasons,
    run_gx,
    suite_metrics,
    with_violation_flags,
)
from patternlake.spark import NO_CONSTRAINT_PROPAGATION, job_label, shuffled_once, sql_settings

log = logging.getLogger(__name__)

SILVER_COLUMNS = tuple(contract("silver_events").names)
# the quarantined rows as tagged; _validated_at is added when they are written
QUARANTINE_COLUMNS = tuple(c for c in contract("quarantine_events").names if c != "_validated_at")
# up to this many valid rows, a batch's event ids are broadcast to look them up in silver
# (about 60 MB of hash table at 1M ids); larger batches join silver's ids by a shuffle
BROADCAST_LOOKUP_ROWS = 1_000_000


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
    if pending:
        import_gx_in_background()
    else:
        log.info("validate: nothing to do, all %d batches passed before", len(batches))
    suite = load_suite(config.validate_)
    reports = []
    for b in pending:
        with job_label(spark, f"validate {b}"), sql_settings(spark, NO_CONSTRAINT_PROPAGATION):
            reports.append(validate_batch(spark, lake, config, suite, b))
    return reports


def validate_batch(
    spark: SparkSession, lake: Lake, config: Config, suite: EventSuite, batch_id: str
) -> BatchReport:
    """One pass over the batch's bronze rows: they are parsed, checked, counted (totals,
    reasons, what Great Expectations reports) and shuffled by event id once
    (``shuffled_once``); the quarantine write and, when the batch passes, the silver write
    (the first row of each event id) both read that one shuffle."""
    started = time.monotonic()
    conf = config.validate_
    bronze = lake.read("bronze_events").filter(F.col("_batch_id") == batch_id)
    typed = typed_events(bronze, config.ingest.default_event_type)
    flagged = with_violation_flags(typed, suite)
    tagged = flagged.withColumn("reasons", row_reasons(suite))
    now = datetime.now(UTC)

    counted = f"validate-{uuid.uuid4().hex}"
    with job_label(spark, "parse, check and shuffle by event id"):
        keyed, stats = shuffled_once(
            # keyed_by_event_id keeps the tables' columns only: the flags stop here
            keyed_by_event_id(tagged.observe(counted, *batch_counts(suite))),
            counted,
        )
    _write_quarantine(lake, keyed, batch_id, now)
    total, bad = int(stats["total"]), int(stats["bad"])
    reason_counts = {
        r: int(stats[f"r{i}"]) for i, r in enumerate(suite.reason_codes) if stats[f"r{i}"]
    }
    share = bad / total if total else 0.0
    status = "passed" if share <= conf.max_invalid_share else "failed"
    silver_rows = duplicates = 0
    if status == "passed":
        silver_rows, duplicates, stats[DEDUPE_COUNT] = _append_silver(
            spark,
            lake,
            keyed,
            batch_id,
            stats["valid_min_id"],
            stats["valid_max_id"],
            total - bad,
        )
        if total != silver_rows + bad + duplicates:
            raise RuntimeError(
                f"validate {batch_id}: rows lost: bronze {total} != silver {silver_rows} + "
                f"quarantined {bad} + duplicates {duplicates}"
            )
    else:
        with job_label(spark, "shared event ids"):
            stats[DEDUPE_COUNT] = _shared_ids(keyed)
    gx_result = _gx_result(spark, lake, suite, conf.gx, typed, stats, reason_counts, batch_id)

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
        raise PatternlakeError(_failed_message(report, conf.max_invalid_share))
    return report


def _write_quarantine(lake: Lake, keyed: DataFrame, batch_id: str, now: datetime) -> None:
    """The batch's invalid rows to quarantine_events (read from the shuffle by event id: no
    sort, no second parse). Always written: an empty partition also replaces rows of an
    earlier failed attempt."""
    lake.write(
        keyed.filter(~F.col("_valid")).select(
            *QUARANTINE_COLUMNS, F.lit(now).alias("_validated_at")
        ),
        "quarantine_events",
        "overwrite",
        replace_where={"_batch_id": batch_id},
        commit_info={"patternlake.batch_id": batch_id},
    )


def _gx_result(
    spark: SparkSession,
    lake: Lake,
    suite: EventSuite,
    mode: str,
    typed: DataFrame,
    stats: dict[str, Any],
    reason_counts: dict[str, int],
    batch_id: str,
) -> dict[str, Any]:
    """Great Expectations' result for the batch: recorded from the observed counts
    (``record``), or GX's own validation of the batch checked against them (``run``)."""
    if mode == "run":
        with job_label(spark, "great expectations"):
            result = run_gx(typed, suite, batch_id)
        _check_agreement(result, reason_counts)
        return result
    samples = _unexpected_samples(lake, suite, batch_id, reason_counts) if stats["bad"] else {}
    return gx_record(suite, stats, samples, batch_id)


def _failed_message(report: BatchReport, limit: float) -> str:
    top = ", ".join(
        f"{k}={v}" for k, v in sorted(report.reason_counts.items(), key=lambda kv: -kv[1])[:5]
    )
    return (
        f"validate: batch {report.batch_id} has {report.invalid_share:.1%} invalid rows (limit "
        f"validate.max_invalid_share={limit:.0%}; {top}). Nothing was lost: the bad rows are in "
        f"quarantine_events, the batch stays in bronze_events and is retried by the next "
        f"validate; report: {report.report_path}"
    )


def batch_counts(suite: EventSuite) -> list[Column]:
    """What one pass over a tagged batch (``with_violation_flags``, then ``row_reasons``)
    observes: rows, invalid rows, rows per reason, the suite's own metrics (``suite_metrics``)
    and the event-id range of the valid rows."""
    valid = F.size("reasons") == 0
    return [
        F.count(F.lit(1)).alias("total"),
        F.count_if(~valid).alias("bad"),
        *reason_counts(suite),
        *suite_metrics(suite),
        F.min(F.when(valid, F.col("event_id"))).alias("valid_min_id"),
        F.max(F.when(valid, F.col("event_id"))).alias("valid_max_id"),
    ]


def _append_silver(
    spark: SparkSession,
    lake: Lake,
    keyed: DataFrame,
    batch_id: str,
    lo: str | None,
    hi: str | None,
    valid_rows: int,
) -> tuple[int, int, int]:
    """Append the batch's valid rows to silver, the first of each event id only (in delivery
    order) and none already in silver. Returns (silver rows of the batch, duplicates, rows
    sharing an event id with another row of the batch — Great Expectations' uniqueness count).

    ``keyed`` is the batch partitioned by event id (``keyed_by_event_id``), so ranking and
    counting each id's rows needs no shuffle; the lookup against silver reads only the
    silver files whose event-id range overlaps the batch's valid rows' (``Lake.read_range``),
    and for a batch of up to ``BROADCAST_LOOKUP_ROWS`` valid rows (a day on top of a large
    silver) it probes silver with the batch's ids instead of shuffling silver's."""
    ids = Observation(f"dedupe-{uuid.uuid4().hex}")
    ranked = ranked_by_event_id(keyed).observe(
        ids,
        F.count_if(F.col("_k") > 1).alias("shared"),
        F.count_if(F.col("_valid") & (F.col("_n") > 1)).alias("within"),
        F.count_if(F.col("_valid") & (F.col("_n") == 1)).alias("firsts"),
    )
    first = ranked.filter(F.col("_valid") & (F.col("_n") == 1)).select(*SILVER_COLUMNS)
    earlier_attempt = False
    if lake.exists("silver_events") and lo is not None:
        known = lake.read_range("silver_events", "event_id", lo, hi).select("event_id")
        if valid_rows <= BROADCAST_LOOKUP_ROWS:
            # few ids: find those already in silver with one scan of silver's event_id
            # column against the batch's ids broadcast (silver is not shuffled), then drop
            # the (few) found
            batch_ids = keyed.filter(F.col("_valid")).select("event_id").distinct()
            known = known.join(F.broadcast(batch_ids), "event_id", "left_semi")
            first = first.join(F.broadcast(known), "event_id", "left_anti")
        else:
            first = first.join(known, "event_id", "left_anti")
        first = first.select(*SILVER_COLUMNS)
        earlier_attempt = _wrote_silver_before(lake, batch_id)
    version = lake.write(
        first, "silver_events", "append", commit_info={"patternlake.batch_id": batch_id}
    )
    seen = ids.get
    silver_rows = lake.commit_rows("silver_events", version)
    if earlier_attempt:  # a run that died after its silver commit: those rows are the batch's
        with job_label(spark, "count silver rows"):
            silver_rows = lake.read("silver_events").filter(F.col("_batch_id") == batch_id).count()
    # valid rows that are not the batch's silver rows: repeats within the batch, and ids that
    # were in silver already
    duplicates = int(seen["within"]) + int(seen["firsts"]) - silver_rows
    return silver_rows, duplicates, int(seen["shared"])


def keyed_by_event_id(tagged: DataFrame) -> DataFrame:
    """What both of validate's writes need from a tagged batch, hash-partitioned by event id:
    the silver columns, ``_valid``, and for invalid rows the quarantine's own columns
    (``event_time_raw``, ``_raw``, ``reasons``; null on valid rows, which need none of them).
    The number of partitions is left to adaptive execution, which coalesces a small batch's
    shuffle (a 1% day is not written as ``spark.sql.shuffle.partitions`` tiny files)."""
    valid = F.size("reasons") == 0
    quarantine_only = [c for c in QUARANTINE_COLUMNS if c not in SILVER_COLUMNS]
    return tagged.select(
        *SILVER_COLUMNS,
        *[F.when(~valid, F.col(c)).alias(c) for c in quarantine_only],
        valid.alias("_valid"),
    ).repartition("event_id")


def ranked_by_event_id(keyed: DataFrame) -> DataFrame:
    """``keyed`` (``keyed_by_event_id``) with each row's rank among the rows of its event id
    (``_n``: valid first, then source file, position, time) and how many rows share that id
    (``_k``)."""
    order = Window.partitionBy("event_id").orderBy(
        (~F.col("_valid")).asc(),
        "_source_file",
        "_line_ordinal",
        "event_time",
        "user_id",
        "item_id",
    )
    whole = order.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    return keyed.select(
        "*",
        F.row_number().over(order).alias("_n"),
        F.count(F.lit(1)).over(whole).alias("_k"),
    )


def _wrote_silver_before(lake: Lake, batch_id: str) -> bool:
    """Whether an earlier attempt at this batch committed to silver (its commit says so)."""
    return any(c.get("patternlake.batch_id") == batch_id for c in lake.history("silver_events"))


def _shared_ids(keyed: DataFrame) -> int:
    """Rows whose event id another row of the batch has (uniqueness, for a failed batch);
    ``keyed`` is partitioned by event id, so this needs no shuffle."""
    n = keyed.groupBy("event_id").count().filter("count > 1").agg(F.sum("count")).first()[0]
    return int(n or 0)


def _unexpected_samples(
    lake: Lake, suite: EventSuite, batch_id: str, reason_counts: dict[str, int], limit: int = 20
) -> dict[str, list[str | None]]:
    """Up to ``limit`` values per broken expectation (GX's ``partial_unexpected_list``), read
    back from the batch's quarantine partition (only the bad rows)."""
    quarantine = lake.read("quarantine_events").filter(F.col("_batch_id") == batch_id)
    rules = [
        e
        for e in suite.quarantine_rules
        if reason_counts.get(e.reason) and e.kwargs["column"] in quarantine.columns
    ]
    if not rules:
        return {}
    pairs = F.array_compact(
        F.array(
            *[
                F.when(
                    F.array_contains("reasons", e.reason),
                    F.struct(
                        F.lit(e.reason).alias("reason"),
                        F.col(f"`{e.kwargs['column']}`").cast("string").alias("value"),
                    ),
                )
                for e in rules
            ]
        )
    )
    first = Window.partitionBy("reason").orderBy("value")
    rows = (
        quarantine.select(F.explode(pairs).alias("p"))
        .select("p.reason", "p.value")
        .withColumn("_i", F.row_number().over(first))
        .filter(F.col("_i") <= limit)
        .collect()
    )
    out: dict[str, list[str | None]] = {}
    for r in rows:
        out.setdefault(r["reason"], []).append(r["value"])
    return out


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
    table = contract("validation_results")
    lake.write(
        spark.createDataFrame([tuple(row[c] for c in table.names)], table.ddl()),
        "validation_results",
        "append",
    )


def _write_html(lake: Lake, config: Config, report: BatchReport, gx_result: dict[str, Any]) -> str:
    path = f"{lake.root}/{config.validate_.report_dir.strip('/')}/{report.batch_id}.html"
    fs, p = pafs.FileSystem.from_uri(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(render_html(asdict(report), gx_result).encode("utf-8"))
    return path
