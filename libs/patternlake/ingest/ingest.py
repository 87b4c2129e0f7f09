"""ingest: raw files -> ``bronze_events`` (as received, plus ingest metadata).

Each run is one batch (``_batch_id``). A file whose content was ingested before (same
sha256) is skipped, so re-ingesting the same file is a no-op, reported as such.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pyspark.sql import Observation, SparkSession
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.ingest.sources import (
    SourceFile,
    detect_format,
    fingerprint,
    list_source_files,
    read_events,
)
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.lake.paths import strip_file_scheme
from patternlake.spark import job_label

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    batch_id: str | None
    rows: int
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return self.batch_id is None


def parse_mapping(text: str | None) -> dict[str, str]:
    """``user_id=user,item_id=item,event_time=3`` -> dict (``--map``)."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise PatternlakeError(
                f"--map: expected FIELD=COLUMN pairs separated by commas, got {part!r}"
            )
        key, value = (s.strip() for s in part.split("=", 1))
        if not key or not value:
            raise PatternlakeError(f"--map: empty field or column in {part!r}")
        out[key] = value
    return out


def ingest(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    path: str,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
) -> IngestResult:
    """Read ``path`` (file or folder) into ``bronze_events`` as one new batch."""
    started = time.monotonic()
    conf = config.ingest
    files = list_source_files(path)
    fmt = detect_format(files, fmt or conf.format)
    sources = [fingerprint(f) for f in files]
    seen = _ingested_fingerprints(lake)
    fresh = [s for s in sources if s.fingerprint not in seen]
    skipped = [s.path for s in sources if s.fingerprint in seen]
    if not fresh:
        log.info("ingest %s: no-op, all %d files were ingested before", path, len(sources))
        return IngestResult(batch_id=None, rows=0, skipped=skipped)
    fresh = _dedupe_content(fresh)
    if all(s.size == 0 for s in fresh):
        log.info("ingest %s: all %d new files are empty; nothing to ingest", path, len(fresh))
        return IngestResult(batch_id=None, rows=0, files=[s.path for s in fresh], skipped=skipped)

    explicit = set(mapping or {})
    effective = dict(mapping) if mapping else dict(conf.mapping)
    df = read_events(spark, fresh, fmt, effective, explicit, conf.header, conf.sep)

    now = datetime.now(UTC)
    batch_id = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    fp_map = F.create_map(
        *[x for s in fresh for x in (F.lit(strip_file_scheme(s.path)), F.lit(s.fingerprint))]
    )
    bronze = df.select(
        "*",
        fp_map[F.col("_source_file")].alias("_source_fingerprint"),
        F.lit(batch_id).alias("_batch_id"),
        F.lit(now).cast("timestamp").alias("_ingested_at"),
        F.lit(fmt).alias("_source_format"),
    )
    fps = sorted({s.fingerprint for s in fresh})
    counted = Observation(f"ingest-{batch_id}") if len(fps) <= OBSERVED_FILES else None
    if counted is not None:  # the write counts each file's rows: no second read of the batch
        fp = F.col("_source_fingerprint")
        bronze = bronze.observe(
            counted, *[F.count_if(fp == F.lit(f)).alias(f"f{i}") for i, f in enumerate(fps)]
        )
    lake.write(bronze, "bronze_events", "append", commit_info={"patternlake.batch_id": batch_id})
    if counted is not None:
        per_file = {f: int(counted.get[f"f{i}"]) for i, f in enumerate(fps)}
    else:
        with job_label(spark, "ingest: rows per file"):
            per_file = {
                r["_source_fingerprint"]: r["count"]
                for r in lake.read("bronze_events")
                .filter(F.col("_batch_id") == batch_id)
                .groupBy("_source_fingerprint")
                .count()
                .collect()
            }
    rows = sum(per_file.values())
    log_rows = [
        (batch_id, s.path, s.fingerprint, s.size, int(per_file.get(s.fingerprint, 0)), fmt, now)
        for s in fresh
    ]
    lake.write(
        spark.createDataFrame(log_rows, contract("ingest_log").ddl()),
        "ingest_log",
        "append",
    )
    log.info(
        "ingest %s: batch %s, %d files (%s), %d rows, %d files skipped as already ingested (%.1fs)",
        path,
        batch_id,
        len(fresh),
        fmt,
        rows,
        len(skipped),
        time.monotonic() - started,
    )
    return IngestResult(
        batch_id=batch_id, rows=rows, files=[s.path for s in fresh], skipped=skipped
    )


OBSERVED_FILES = 256  # up to this many files per batch, the bronze write counts rows per file


def _ingested_fingerprints(lake: Lake) -> set[str]:
    """Content hashes already ingested: the ingest log, and bronze itself (in case a run died
    between writing bronze and the log)."""
    seen: set[str] = set()
    if lake.exists("ingest_log"):
        seen |= {r[0] for r in lake.read("ingest_log").select("fingerprint").distinct().collect()}
    if lake.exists("bronze_events"):
        seen |= {
            r[0]
            for r in lake.read("bronze_events").select("_source_fingerprint").distinct().collect()
        }
    return seen


def _dedupe_content(files: list[SourceFile]) -> list[SourceFile]:
    """Two files with the same content in one batch: ingest it once."""
    seen: set[str] = set()
    out = []
    for f in files:
        if f.fingerprint not in seen:
            seen.add(f.fingerprint)
            out.append(f)
    return out
