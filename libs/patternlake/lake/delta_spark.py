"""The lake's engine: Delta Lake on Spark (``delta-spark``), the same code locally, on a
cluster and on Databricks.

Every operation is one Delta transaction. What this module adds to delta-spark's API:

* **the version a write made**, not the table's latest: each commit carries a transaction id
  in its ``userMetadata``, and the version is the one whose commit holds it;
* **settings per operation** (schema auto-merge, the commit's metadata, vacuum's retention
  check, compaction's file size), set for that operation alone and restored after it;
* **clear errors**: a missing table or version, a timestamp outside the table's history, a
  predicate Spark cannot parse, and commit conflicts (``ConcurrentCommitError``; the lake
  retries those, see ``Lake``);
* **log-level operations on any Hadoop file system** (``dbfs:``, ``abfss:``, ``s3a:``): the
  rows a commit added and expiring old log entries read and delete through Spark's file
  system, not a local path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, ParseException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from patternlake.errors import (
    ConcurrentCommitError,
    PatternlakeError,
    TableNotFoundError,
    VersionNotFoundError,
)
from patternlake.lake.delta_log import (
    commit_info,
    data_files,
    delete_log_before,
    delta_log_class,
    read_text,
    write_text,
)
from patternlake.lake.engine import WriteMode
from patternlake.spark import sql_settings

log = logging.getLogger(__name__)

TXN_KEY = "patternlake.txn"
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
# Delta's commit conflicts (io.delta.exceptions.*, by class name or error class)
_CONFLICT = re.compile(
    r"io\.delta\.exceptions\.\w+Exception"
    r"|\[(DELTA_CONCURRENT_\w+|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED)\]"
)
# Table properties of the tables the lake creates. Deletion vectors stay off: training,
# evaluation and distillation read a version's Parquet files directly (``files``), which
# would show rows a deletion vector hides.
CREATE_PROPERTIES = {"delta.enableDeletionVectors": "false"}


class DeltaSparkEngine:
    name = "delta-spark"

    def __init__(self, spark: SparkSession):
        from delta.tables import DeltaTable  # the delta-spark Python package

        self.spark = spark
        self._DeltaTable = DeltaTable

    # ---- reading -------------------------------------------------------------------------

    def _table(self, uri: str) -> Any:
        if not self.exists(uri):
            raise TableNotFoundError(f"no Delta table at {uri}: run the job that writes it first")
        return self._DeltaTable.forPath(self.spark, uri)

    def exists(self, uri: str) -> bool:
        return bool(self._DeltaTable.isDeltaTable(self.spark, uri))

    def schema(self, uri: str) -> StructType:
        return self.read(uri, None, None).schema

    def partition_columns(self, uri: str) -> list[str]:
        self._table(uri)
        columns = self._snapshot(uri, None).metadata().partitionColumns()
        return [columns.apply(i) for i in range(columns.size())]

    def version(self, uri: str) -> int:
        """The table's latest version."""
        self._table(uri)
        return int(self._snapshot(uri, None).version())

    def read(self, uri: str, version: int | None, timestamp: datetime | None) -> DataFrame:
        self._table(uri)
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        if timestamp is not None:
            reader = reader.option("timestampAsOf", timestamp.isoformat())
        try:
            return reader.load(uri)  # Delta resolves the version here, when the plan is built
        except (AnalysisException, Py4JJavaError) as exc:
            if timestamp is not None and re.search(
                r"TIMESTAMP_GREATER|after the latest", str(exc), re.I
            ):
                return self._read_latest_before(uri, timestamp)
            raise _time_travel_error(uri, version, timestamp, exc) from None

    def _read_latest_before(self, uri: str, timestamp: datetime) -> DataFrame:
        """A timestamp after the last commit: the table then was its latest version (pinned,
        so a commit landing meanwhile does not change what is read)."""
        last = self._table(uri).history(1).collect()[0]
        # Spark hands a timestamp to Python as a naive datetime in the process's local time
        committed = last["timestamp"].astimezone(UTC)
        wanted = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
        if committed > wanted:  # a commit landed since: the timestamp now resolves
            reader = self.spark.read.format("delta").option("timestampAsOf", timestamp.isoformat())
            try:
                return reader.load(uri)
            except (AnalysisException, Py4JJavaError) as exc:
                raise _time_travel_error(uri, None, timestamp, exc) from None
        return self.read(uri, int(last["version"]), None)

    def read_range(self, uri: str, column: str, lo: Any, hi: Any) -> DataFrame:
        # Delta skips the files whose log statistics lie outside the range at planning
        return self.read(uri, None, None).filter(F.col(f"`{column}`").between(lo, hi))

    def files(self, uri: str, version: int | None) -> list[str]:
        """The Parquet files of one version, for readers outside Spark (training, evaluation).
        A version with deletion vectors has rows its files still hold: refused."""
        version = self.version(uri) if version is None else version
        df = self.read(uri, version, None)
        dvs = self._deletion_vectors(uri, version)
        if dvs:
            raise PatternlakeError(
                f"{uri} version {version} has {dvs} "
                "deletion vectors, so its Parquet files hold deleted rows: run "
                f"`REORG TABLE delta.`{uri}` APPLY (PURGE)` and read the version it makes"
            )
        return list(df.inputFiles())

    def _deletion_vectors(self, uri: str, version: int | None) -> int:
        """How many files of the version have a deletion vector (0 without the feature)."""
        snapshot = self._snapshot(uri, version)
        if not snapshot.protocol().readerFeatureNames().contains("deletionVectors"):
            return 0
        return int(snapshot.allFiles().filter("deletionVector IS NOT NULL").count())

    def _snapshot(self, uri: str, version: int | None) -> Any:
        """The JVM ``Snapshot`` of one version (the latest when ``version`` is None)."""
        delta_log = self._delta_log(uri)
        if version is None:
            return delta_log.update(False, self._none(), self._none())
        return delta_log.getSnapshotAt(version, self._none(), self._none())

    def history(self, uri: str, limit: int | None) -> list[dict[str, Any]]:
        """Commits, newest first, with the ``patternlake.*`` keys of each commit's metadata
        at the top level of its dict."""
        table = self._table(uri)
        rows = table.history(limit) if limit else table.history()
        return [_flat(r.asDict(recursive=True)) for r in rows.collect()]

    def commit_rows(self, uri: str, version: int) -> int:
        """Rows added by the commit that made ``version``: the ``numRecords`` statistics of
        its add actions (read from its log entry; no data is read)."""
        path = f"{uri}/_delta_log/{version:020d}.json"
        try:
            text = read_text(self.spark, path)
        except Py4JJavaError:
            raise PatternlakeError(
                f"{uri}: the log entry of version {version} is gone (history expired)"
            ) from None
        total = 0
        for line in text.splitlines():
            add = json.loads(line).get("add") if line.strip() else None
            if add is None:
                continue
            stats = json.loads(add.get("stats") or "{}")
            if "numRecords" not in stats:
                raise PatternlakeError(f"{uri} version {version}: a file has no row count")
            total += int(stats["numRecords"])
        return total

    # ---- writing -------------------------------------------------------------------------

    def write(
        self,
        df: DataFrame,
        uri: str,
        *,
        mode: WriteMode,
        partition_by: list[str],
        replace_where: dict[str, Any] | None,
        schema: StructType,
        add_columns: StructType | None,
        overwrite_schema: bool,
        metadata: dict[str, str],
    ) -> int:
        txn, since = self._begin(uri)
        creates = since < 0 or overwrite_schema
        writer = df.write.format("delta").mode(mode)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if add_columns is not None:
            writer = writer.option("mergeSchema", "true")
        if overwrite_schema:
            writer = writer.option("overwriteSchema", "true")
        if replace_where:
            writer = writer.option("replaceWhere", _where(replace_where))
        writer = writer.option("userMetadata", _commit_text(metadata, txn))
        # every write makes a version of its own, an empty append too (Delta skips those by
        # default, and the caller would then count another commit's rows as this one's)
        settings = {"spark.databricks.delta.skipRecordingEmptyCommits": "false"}
        if creates:
            settings.update(_create_defaults())
        return self._commit(uri, txn, since, settings, lambda: writer.save(uri), required=True)

    def merge(
        self,
        df: DataFrame,
        uri: str,
        keys: list[str],
        *,
        schema: StructType,
        add_columns: StructType | None,
        source_keys: int | None,
        metadata: dict[str, str],
    ) -> int:
        txn, since = self._begin(uri)
        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        settings = {USER_METADATA: _commit_text(metadata, txn)}
        if add_columns is not None:
            settings["spark.databricks.delta.schema.autoMerge.enabled"] = "true"
        merge = (
            self._table(uri)
            .alias("t")
            .merge(df.alias("s"), cond)
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
        )
        return self._commit(uri, txn, since, settings, merge.execute, required=True)

    def delete(
        self, uri: str, predicate: str | Column, metadata: dict[str, str] | None = None
    ) -> dict[str, int]:
        """Delete the rows matching ``predicate``; return rows deleted and the version (the
        table's own when nothing matched and nothing was committed)."""
        txn, since = self._begin(uri)
        table = self._table(uri)
        settings = {USER_METADATA: _commit_text(metadata or {}, txn)}
        try:
            version = self._commit(uri, txn, since, settings, lambda: table.delete(predicate))
        except (ParseException, AnalysisException) as exc:  # a conflict is not one of these
            first = str(exc).strip().splitlines()[0][:300]
            raise PatternlakeError(
                f"delete from {uri}: bad predicate {predicate!r}: {first}"
            ) from None
        if version is None:
            return {"rows": 0, "version": since}
        metrics = commit_info(self.spark, uri, version).get("operationMetrics") or {}
        return {"rows": int(metrics.get("numDeletedRows", 0)), "version": version}

    def update(
        self, uri: str, predicate: Column, values: dict[str, Column], metadata: dict[str, str]
    ) -> int | None:
        """Set ``values`` on the rows matching ``predicate``; the version, or None when no
        row matched (Delta commits nothing then)."""
        txn, since = self._begin(uri)
        settings = {USER_METADATA: _commit_text(metadata, txn)}
        table = self._table(uri)
        return self._commit(uri, txn, since, settings, lambda: table.update(predicate, values))

    def purge(self, uri: str) -> None:
        """Rewrite the files that have deletion vectors without the rows they hide."""
        self.spark.sql(f"REORG TABLE delta.{_quoted(uri)} APPLY (PURGE)").collect()

    def vacuum(self, uri: str, retention_hours: int, dry_run: bool, lite: bool) -> list[str]:
        """Delete files no version inside the retention window needs. ``lite``: only the files
        the log removed (never the files of a writer still running, whatever the retention);
        otherwise every file the table does not reference (a killed writer's leftovers too)."""
        sql = f"VACUUM delta.{_quoted(uri)} {'LITE ' if lite else ''}RETAIN {retention_hours} HOURS"
        check = {
            "spark.databricks.delta.retentionDurationCheck.enabled": "false",
            # VACUUM START/END commits on every file system (Delta skips them on S3 by
            # default): forget-user's last log entry is then one that names no id
            "spark.databricks.delta.vacuum.logging.enabled": "true",
        }
        with sql_settings(self.spark, check):
            if dry_run:
                return sorted(r[0] for r in self.spark.sql(sql + " DRY RUN").collect())
            before = set(data_files(self.spark, uri))
            self.spark.sql(sql).collect()
        return sorted(before - set(data_files(self.spark, uri)))

    def compact(self, uri: str, target_size: int) -> dict[str, Any]:
        settings = {"spark.databricks.delta.optimize.maxFileSize": str(target_size)}
        with sql_settings(self.spark, settings), _conflicts(uri):
            row = self._table(uri).optimize().executeCompaction().collect()[0]
        return row.asDict(recursive=True)

    def expire_history(self, uri: str) -> list[str]:
        """Checkpoint the latest version, then delete every older log entry and checkpoint:
        time travel to older versions ends, and no old commit's predicate or statistics stays
        on disk."""
        self._table(uri)
        delta_log = self._delta_log(uri)
        snapshot = delta_log.update(False, self._none(), self._none())
        latest = int(snapshot.version())
        # Delta logs a failed checkpoint and goes on: here it must fail, before any deletion
        throwing = {"spark.databricks.delta.checkpoint.exceptionThrowing": "true"}
        with sql_settings(self.spark, throwing):
            delta_log.checkpoint(snapshot, self._none())
        last = json.loads(read_text(self.spark, f"{uri}/_delta_log/_last_checkpoint"))
        if int(last.get("version", -1)) != latest:
            raise RuntimeError(f"{uri}: _last_checkpoint names {last}, not version {latest}")
        removed = delete_log_before(self.spark, uri, latest)
        # a lite vacuum needs the log back to the last vacuum; the log now starts here
        write_text(
            self.spark,
            f"{uri}/_delta_log/_last_vacuum_info",
            json.dumps({"latestCommitVersionOutsideOfRetentionWindow": latest}),
        )
        return removed

    def _delta_log(self, uri: str) -> Any:
        return delta_log_class(self.spark).forTable(
            self.spark._jsparkSession,  # type: ignore[attr-defined]
            uri,
        )

    def _none(self) -> Any:
        return self.spark.sparkContext._jvm.scala.Option.empty()  # type: ignore[attr-defined]

    # ---- which version a commit made -----------------------------------------------------

    def _begin(self, uri: str) -> tuple[str, int]:
        """A new transaction id, and the table's version before this operation (-1: none)."""
        since = self.version(uri) if self.exists(uri) else -1
        return uuid.uuid4().hex, since

    def _commit(
        self,
        uri: str,
        txn: str,
        since: int,
        settings: dict[str, str],
        operation: Callable[[], Any],
        required: bool = False,
    ) -> int | None:
        """Run ``operation`` (one Delta transaction tagged ``txn``) with ``settings``; return
        the version it committed (None: it committed nothing). A conflict raised although the
        commit landed (an error after it) is not a conflict: its version is returned."""
        try:
            with sql_settings(self.spark, settings), _conflicts(uri):
                operation()
        except ConcurrentCommitError:
            if self._committed(uri, txn, since, required=False) is None:
                raise
        return self._committed(uri, txn, since, required=required)

    def _committed(self, uri: str, txn: str, since: int, required: bool = True) -> int | None:
        """The version whose commit carries ``txn`` (made after version ``since``): the first
        log entry written since whose commit information holds it."""
        if self.exists(uri):
            for version in range(since + 1, self.version(uri) + 1):
                if txn in commit_info(self.spark, uri, version).get("userMetadata", ""):
                    return version
        if required:
            raise RuntimeError(f"{uri}: the commit of transaction {txn} is not in the log")
        return None


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    meta = entry.get("userMetadata")
    if isinstance(meta, str) and meta.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            entry.update({k: v for k, v in json.loads(meta).items() if k not in entry})
    return entry


def _commit_text(metadata: dict[str, str], txn: str) -> str:
    return json.dumps({**metadata, TXN_KEY: txn}, sort_keys=True)


def _create_defaults() -> dict[str, str]:
    prefix = "spark.databricks.delta.properties.defaults."
    return {prefix + k.removeprefix("delta."): v for k, v in CREATE_PROPERTIES.items()}


class _conflicts:
    """Turn Delta's commit conflicts into ``ConcurrentCommitError`` (nothing was committed)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and _is_conflict(exc):
            first = str(exc).strip().splitlines()[0][:300]
            raise ConcurrentCommitError(
                f"{self.uri}: another writer committed a conflicting change first ({first})"
            ) from None
        return False


def _is_conflict(exc: BaseException) -> bool:
    try:
        from delta.exceptions import DeltaConcurrentModificationException

        if isinstance(exc, DeltaConcurrentModificationException):
            return True
    except ImportError:  # pragma: no cover - delta-spark is a dependency
        pass
    return bool(_CONFLICT.search(f"{type(exc).__name__} {exc}"))


def _time_travel_error(
    uri: str, version: int | None, timestamp: datetime | None, exc: Exception
) -> Exception:
    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    if timestamp is not None and re.search(r"TIMESTAMP_EARLIER|before the earliest", text, re.I):
        return PatternlakeError(
            f"{uri}: no version at or before {timestamp.isoformat()}: that is before the "
            "earliest version the table still has"
        )
    if version is not None and re.search(
        r"VERSION_NOT_FOUND|VERSION_NOT_EXIST|Cannot time travel|FILE_NOT_FOUND|NOT_CONTIGUOUS"
        r"|not reconstruct|EMPTY_DIRECTORY|MISSING_DELTA_LOG|FileNotFound|CHECKPOINT",
        text,
        re.I,
    ):
        return VersionNotFoundError(
            f"{uri}: version {version} does not exist (never written, or its log and files "
            f"were removed by forget-user or vacuum): {first}"
        )
    return exc


def _where(values: dict[str, Any]) -> str:
    return " AND ".join(
        f"`{k}` IS NULL" if v is None else f"`{k}` = {_sql_literal(v)}" for k, v in values.items()
    )


def _sql_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quoted(uri: str) -> str:
    return "`" + uri.replace("`", "``") + "`"
