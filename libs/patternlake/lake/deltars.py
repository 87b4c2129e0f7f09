"""Delta tables with Spark doing the Parquet I/O and delta-rs committing the log.

A write goes in three steps, so that no reader ever sees half of it:

1. Spark writes the DataFrame as Parquet into ``<table>/_staging/<txn>/data-<n>/`` (a folder
   of its own per transaction, so concurrent writers never share Spark's ``_temporary``);
2. each file's statistics are read from its footer and the file is moved next to the
   table's other files (``col=value/`` folders for partitioned tables), after its name is
   recorded in the staging folder's manifest;
3. delta-rs commits Add (and Remove, and schema) actions in one atomic transaction.

Concurrency is optimistic: a commit is made against the snapshot its actions were computed
from (``max_commit_retries=0``). When another writer committed first, the actions are
computed again from the new snapshot (a merge re-reads the table; an append is simply
re-committed) and committed again, so a merge never inserts a key twice and an overwrite
never keeps rows appended after it read the table.

While a writer runs, its staging folder holds a marker (pid, host, heartbeat) and a manifest
of the files it moved into the table: ``vacuum`` never touches them. A writer killed before
step 3 leaves only files that no version references: the table stays at its previous
version, and ``vacuum`` (a full one: every unreferenced file under the table older than the
retention) removes the leftovers.
"""

from __future__ import annotations

import contextlib
import decimal
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFound
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from patternlake.errors import PatternlakeError, TableNotFoundError
from patternlake.lake.engine import WriteMode
from patternlake.lake.paths import strip_file_scheme

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
MARKER = "_writer.json"
MANIFEST = "_published.json"
TXN_KEY = "patternlake.txn"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
HEARTBEAT_S = 30.0
# A writer on another host whose heartbeat is older than this is taken for dead.
STALE_AFTER_S = 600.0
# How long a commit keeps retrying against newer snapshots before giving up (nothing committed).
COMMIT_DEADLINE_S = 900.0


@dataclass
class _Plan:
    """The actions of one commit attempt, computed from one snapshot."""

    actions: list[AddAction | RemoveAction]
    mode: str
    schema: StructType
    filters: list[tuple[str, str, Any]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    abandon: Callable[[], None] = lambda: None  # undo what this attempt staged


class DeltaRsEngine:
    name = "delta-rs"

    def __init__(self, spark: SparkSession, storage_options: dict[str, str] | None = None):
        self.spark = spark
        self.storage_options = storage_options or None

    # ---- reading -------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        return DeltaTable.is_deltatable(uri, storage_options=self.storage_options)

    def _table(self, uri: str, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(uri, version=version, storage_options=self.storage_options)
        except DeltaTableNotFound:
            raise TableNotFoundError(
                f"no Delta table at {uri}: run the job that writes it first"
            ) from None
        except DeltaError as exc:
            if version is not None and "version" in str(exc).lower():
                raise PatternlakeError(f"{uri}: no version {version} ({exc})") from None
            raise

    def schema(self, uri: str) -> StructType:
        return _spark_schema(self._table(uri))

    def partition_columns(self, uri: str) -> list[str]:
        return list(self._table(uri).metadata().partition_columns)

    def version(self, uri: str) -> int:
        return self._table(uri).version()

    def _snapshot(self, uri: str, version: int | None, timestamp: datetime | None) -> DeltaTable:
        dt = self._table(uri, version)
        if timestamp is not None:
            try:
                dt.load_as_version(timestamp)
            except DeltaError as exc:
                raise PatternlakeError(
                    f"{uri}: no version at or before {timestamp} ({exc})"
                ) from None
            first = self._commit_time(uri, dt.version())
            wanted = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
            if first is not None and wanted < first:
                raise PatternlakeError(
                    f"{uri}: no version at or before {wanted.isoformat()}: the oldest version "
                    f"available ({dt.version()}) was committed at {first.isoformat()}"
                )
        _check_supported(dt, uri)
        return dt

    def _commit_time(self, uri: str, version: int) -> datetime | None:
        """When ``version`` was committed (its commitInfo timestamp), if its log file is there."""
        for entry in commit_entries(uri, version) or []:
            info = entry.get("commitInfo")
            if info and "timestamp" in info:
                return datetime.fromtimestamp(info["timestamp"] / 1000, UTC)
        return None

    def commit_rows(self, uri: str, version: int) -> int:
        return commit_rows(uri, version)

    def read(self, uri: str, version: int | None, timestamp: datetime | None) -> DataFrame:
        dt = self._snapshot(uri, version, timestamp)
        return self._read_files(uri, _spark_schema(dt), dt.file_uris())

    def _read_files(self, uri: str, schema: StructType, files: list[str]) -> DataFrame:
        if not files:
            return self.spark.createDataFrame([], schema)
        df = (
            self.spark.read.schema(schema)
            .option("basePath", _spark_path(uri))
            .parquet(*[_spark_path(f) for f in files])
        )
        return df.select(*[F.col(f"`{n}`") for n in schema.fieldNames()])

    def read_range(self, uri: str, column: str, lo: Any, hi: Any) -> DataFrame:
        dt = self._snapshot(uri, None, None)
        actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
        lows = actions.get(f"min.{column}")
        highs = actions.get(f"max.{column}")
        by_rel = {_relative(uri, f): f for f in dt.file_uris()}
        keep = []
        for i, rel in enumerate(actions["path"]):
            low = lows[i] if lows else None
            high = highs[i] if highs else None
            # no statistics: the file may hold anything; a null-only file holds nothing in range
            if (low is None or low <= hi) and (high is None or high >= lo):
                keep.append(by_rel.get(unquote(rel), by_rel.get(rel)))
        df = self._read_files(uri, _spark_schema(dt), [f for f in keep if f])
        return df.filter(F.col(f"`{column}`").between(lo, hi))

    def files(self, uri: str, version: int | None) -> list[str]:
        return self._snapshot(uri, version, None).file_uris()

    def history(self, uri: str, limit: int | None) -> list[dict[str, Any]]:
        return self._table(uri).history(limit)

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
        with _InFlight(uri) as flight:
            adds = self._stage(flight, df, uri, partition_by)
            txn = uuid.uuid4().hex
            if overwrite_schema or not self.exists(uri):
                before = self.version(uri) if overwrite_schema and self.exists(uri) else -1
                try:
                    create_table_with_add_actions(
                        uri,
                        _delta_schema(schema),
                        adds,
                        mode="overwrite" if overwrite_schema else "error",
                        partition_by=partition_by or None,
                        storage_options=self.storage_options,
                        commit_properties=CommitProperties(
                            custom_metadata={**metadata, TXN_KEY: txn}
                        ),
                    )
                    return self._find_commit(uri, txn, before)
                except DeltaError as exc:  # another writer created it first: commit on top
                    if overwrite_schema or "exist" not in str(exc).lower():
                        raise
                    log.info("%s was created concurrently; appending", uri)

            def plan(dt: DeltaTable) -> _Plan:
                _check_supported(dt, uri)
                if mode == "overwrite":
                    return _Plan(adds, "overwrite", schema, _partition_filters(replace_where))
                if add_columns is not None:
                    # delta-rs writes a schema change only with mode="overwrite"; a filter that
                    # matches no file makes it remove nothing: new columns and data, one commit.
                    parts = list(dt.metadata().partition_columns)
                    return _Plan(
                        adds, "overwrite", schema, [((parts or schema.names)[0], "in", [])]
                    )
                return _Plan(adds, "append", schema)

            return self._commit(uri, metadata, plan)

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
        """Copy-on-write upsert computed by Spark: files holding a matching key are rewritten.

        Delta's MERGE semantics: target and source rows match when every key is equal by SQL
        ``=`` (a null key never matches); every matched target row takes the source row's
        values, unmatched source rows are inserted. When the merge adds columns, the whole
        table is rewritten in the same commit (delta-rs changes a schema only in an overwrite).

        With at most ``BROADCAST_MERGE_KEYS`` source keys (the usual day: the users one batch
        touches), the source's keys are broadcast: the rewritten files' rows are filtered
        against them where they are read and the source rows are added, so neither side's
        rows are shuffled (``_replaced``). More keys, or an unknown count: one full outer join.
        """
        new_names = set(add_columns.fieldNames()) if add_columns is not None else set()
        before = StructType([f for f in schema.fields if f.name not in new_names])
        small = source_keys is not None and source_keys <= BROADCAST_MERGE_KEYS
        keyset = df.select(*keys).dropna()
        keyset = F.broadcast(keyset) if small else keyset
        with _InFlight(uri) as flight:

            def plan(dt: DeltaTable) -> _Plan:
                _check_supported(dt, uri)
                partition_by = list(dt.metadata().partition_columns)
                files = dt.file_uris()
                if add_columns is not None:
                    touched = files
                else:
                    touched = self._files_holding(
                        uri, before, files, lambda rows: rows.join(keyset, keys, "left_semi")
                    )
                target = self._read_files(uri, schema, touched)
                rows = (
                    _replaced(target, df, keyset, keys, schema)
                    if small
                    else _upserted(target, df, keys, schema)
                )
                adds = self._stage(flight, rows, uri, partition_by)
                info = {"patternlake.rewritten_files": str(len(touched))}
                if add_columns is not None:
                    return _Plan(adds, "overwrite", schema, None, info, flight.undo(adds))
                removes = self._removes(dt, uri, touched)
                return _Plan(adds + removes, "append", schema, None, info, flight.undo(adds))

            return self._commit(uri, metadata, plan)

    def rewrite(
        self,
        uri: str,
        touched: Any,
        transform: Callable[[DataFrame], DataFrame],
        *,
        metadata: dict[str, str],
    ) -> dict[str, int]:
        """Copy-on-write: the files holding a row that matches the Column ``touched`` are
        replaced by ``transform`` of their rows, in one commit; other files stay as they are.
        The commit records only ``metadata`` (no predicate, no values). Nothing matches:
        no commit."""

        def touched_files(dt: DeltaTable) -> list[str]:
            return self._files_holding(
                uri, _spark_schema(dt), dt.file_uris(), lambda rows: rows.filter(touched)
            )

        first = self._table(uri)
        counts = {"files": 0, "rows_before": 0, "rows_after": 0, "version": first.version()}
        found = {first.version(): touched_files(first)}  # the first attempt reuses this scan
        if not found[first.version()]:
            return counts
        with _InFlight(uri) as flight:

            def plan(dt: DeltaTable) -> _Plan:
                _check_supported(dt, uri)
                schema = _spark_schema(dt)
                hit = found.pop(dt.version(), None) or touched_files(dt)
                before = self._read_files(uri, schema, hit)
                adds = self._stage(
                    flight,
                    transform(before).select(*schema.fieldNames()),
                    uri,
                    list(dt.metadata().partition_columns),
                )
                counts.update(
                    files=len(hit),
                    rows_before=before.count(),
                    rows_after=sum(json.loads(a.stats)["numRecords"] for a in adds),
                )
                info = {"patternlake.rewritten_files": str(len(hit))}
                actions = adds + self._removes(dt, uri, hit)
                return _Plan(actions, "append", schema, None, info, flight.undo(adds))

            counts["version"] = self._commit(uri, metadata, plan)
        return counts

    def _files_holding(
        self,
        uri: str,
        schema: StructType,
        files: list[str],
        rows: Callable[[DataFrame], DataFrame],
    ) -> list[str]:
        """The data files (as listed in ``files``) holding a row that ``rows`` keeps."""
        if not files:  # an empty version: nothing to read (and no _metadata to select)
            return []
        current = self._read_files(uri, schema, files).select(
            "*", F.col("_metadata.file_path").alias("_pl_file")
        )
        uris = [r[0] for r in rows(current).select("_pl_file").distinct().collect()]
        by_path = {strip_file_scheme(f): f for f in files}
        return [by_path[strip_file_scheme(unquote(u))] for u in uris]

    def expire_history(self, uri: str) -> list[str]:
        """Checkpoint the current version and delete every older log entry (and checkpoint):
        afterwards only the current version can be read. Returns the log files deleted."""
        return expire_log(uri, self.storage_options)

    def delete(self, uri: str, predicate: str) -> int:
        dt = self._table(uri)
        try:
            metrics = dt.delete(predicate)
        except DeltaError as exc:
            raise PatternlakeError(
                f"delete from {uri}: bad predicate {predicate!r}: {exc}"
            ) from None
        return int(metrics.get("num_deleted_rows", 0))

    def vacuum(self, uri: str, retention_hours: int, dry_run: bool) -> list[str]:
        """A full vacuum: every file under the table that no version inside the retention
        window references and that is older than the retention, except the files of writers
        still running; then the staging folders of writers that died."""
        dt = self._table(uri)
        candidates = dt.vacuum(
            retention_hours=retention_hours,
            dry_run=True,
            enforce_retention_duration=False,
            full=True,
        )
        fs, table_path = pafs.FileSystem.from_uri(uri)
        writers = _staged_writers(fs, table_path)
        protected = {p for w in writers if w.alive for p in w.published}
        # a writer may have committed since the candidates were listed: keep what is live now
        live = {_relative(uri, f) for f in self._table(uri).file_uris()}
        removed = []
        for rel in candidates:
            if fs.get_file_info(f"{table_path}/{rel}").type != pafs.FileType.File:
                rel = unquote(rel)
            if rel in protected or rel in live:
                continue
            removed.append(f"{table_path}/{rel}")
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    fs.delete_file(f"{table_path}/{rel}")
        return removed + _sweep_staging(fs, writers, retention_hours, dry_run)

    def compact(self, uri: str, target_size: int) -> dict[str, Any]:
        return self._table(uri).optimize.compact(target_size=target_size)

    # ---- internals -----------------------------------------------------------------------

    def _commit(
        self, uri: str, metadata: dict[str, str], plan: Callable[[DeltaTable], _Plan]
    ) -> int:
        """Commit ``plan``'s actions against the snapshot they were computed from; when another
        writer committed first, compute them again from the new snapshot and retry."""
        txn = uuid.uuid4().hex
        deadline = time.monotonic() + COMMIT_DEADLINE_S
        for attempt in range(1_000_000):
            dt = self._table(uri)
            read_version = dt.version()
            p = plan(dt)
            props = CommitProperties(
                custom_metadata={**metadata, **p.metadata, TXN_KEY: txn}, max_commit_retries=0
            )
            try:
                dt.create_write_transaction(
                    p.actions,
                    p.mode,
                    _delta_schema(p.schema),
                    partition_by=list(dt.metadata().partition_columns) or None,
                    partition_filters=p.filters,
                    commit_properties=props,
                )
                return read_version + 1  # no retries inside delta-rs: it is this version or none
            except CommitFailedError:
                if self._table(uri).version() == read_version:
                    raise  # not a lost race: a real failure
                p.abandon()
                if time.monotonic() > deadline:
                    raise PatternlakeError(
                        f"commit to {uri}: other writers kept committing first for "
                        f"{COMMIT_DEADLINE_S:.0f} s ({attempt + 1} attempts); nothing was "
                        "committed, so the write can be run again"
                    ) from None
                log.info("%s: version %d taken by another writer, retrying", uri, read_version + 1)
                time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** min(attempt, 6))))
        raise AssertionError("unreachable")

    def _find_commit(self, uri: str, txn: str, after: int) -> int:
        """The version of our commit ``txn``, made after version ``after``."""
        dt = self._table(uri)
        for entry in dt.history(dt.version() - after):
            if entry.get(TXN_KEY) == txn:
                return int(entry["version"])
        raise RuntimeError(f"commit {txn} not found after version {after} of {uri}")

    def _stage(
        self, flight: _InFlight, df: DataFrame, uri: str, partition_by: list[str]
    ) -> list[AddAction]:
        """Write ``df`` as Parquet with Spark, move the files into the table, describe them."""
        staging = flight.next_data_dir()
        writer = df.write.mode("errorifexists")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(_spark_path(flight.uri_of(staging)))

        fs = flight.fs
        selector = pafs.FileSelector(staging, recursive=True)
        staged = [
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        ]
        flight.publishing([p[len(staging) :].lstrip("/") for p in staged])
        with ThreadPoolExecutor(max_workers=8) as pool:
            adds = [
                a
                for a in pool.map(
                    lambda p: self._publish(fs, p, staging, flight.table_path), staged
                )
                if a
            ]
        fs.delete_dir(staging)
        return adds

    def _publish(
        self, fs: pafs.FileSystem, path: str, staging_path: str, table_path: str
    ) -> AddAction | None:
        rel = path[len(staging_path) :].lstrip("/")  # e.g. "day=2026-01-01/part-0000-....parquet"
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        if meta.num_rows == 0:
            return None
        partition_values = {}
        for part in rel.split("/")[:-1]:
            col, _, raw = part.partition("=")
            partition_values[unquote(col)] = None if raw == HIVE_NULL else unquote(raw)
        fs.create_dir(f"{table_path}/{rel.rsplit('/', 1)[0]}" if "/" in rel else table_path)
        fs.move(path, f"{table_path}/{rel}")
        info = fs.get_file_info(f"{table_path}/{rel}")
        return AddAction(
            path=rel,  # delta-rs percent-encodes it in the log
            size=info.size,
            partition_values=partition_values,
            modification_time=int(info.mtime.timestamp() * 1000)
            if info.mtime
            else int(time.time() * 1000),
            data_change=True,
            stats=_file_stats(meta),
        )

    def _removes(self, dt: DeltaTable, uri: str, files: list[str]) -> list[RemoveAction]:
        if not files:
            return []
        actions = pa.table(dt.get_add_actions(flatten=False)).to_pydict()
        wanted = {_relative(uri, f) for f in files}
        now = int(time.time() * 1000)
        removes = []
        for i, path in enumerate(actions["path"]):
            if unquote(path) in wanted:
                pv = actions["partition"][i] if "partition" in actions else {}
                removes.append(
                    RemoveAction(
                        path=unquote(path),  # delta-rs encodes it again
                        data_change=True,
                        deletion_timestamp=now,
                        size=actions["size_bytes"][i],
                        partition_values=dict(pv),
                    )
                )
        if len(removes) != len(wanted):
            raise RuntimeError(
                f"merge: matched {len(removes)} of {len(wanted)} files in the log of {uri}"
            )
        return removes


def expire_log(uri: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """Write a checkpoint of the current version of the Delta table at ``uri`` and delete the
    log files of older versions (commit JSON, older checkpoints, checksums): what Delta's own
    log clean-up does once ``delta.logRetentionDuration`` has passed, now. Works on tables of
    either engine (same format on disk)."""
    dt = DeltaTable(uri, storage_options=storage_options)
    version = dt.version()
    dt.create_checkpoint()
    fs, table_path = pafs.FileSystem.from_uri(uri)
    log_dir = f"{table_path}/_delta_log"
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(log_dir, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        digits = info.base_name.split(".", 1)[0]
        if digits.isdigit() and int(digits) < version:
            fs.delete_file(info.path)
            removed.append(info.path)
    return removed


# ---- writers in flight ---------------------------------------------------------------------


class _InFlight:
    """One writer's staging folder ``_staging/<txn>/``: a marker saying who writes (pid, host,
    refreshed every ``HEARTBEAT_S``) and a manifest of the files it moves into the table. Both
    live until the commit is over, so ``vacuum`` can tell this writer's files from leftovers."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.table_path = pafs.FileSystem.from_uri(self.uri)
        self.txn = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        self.dir = f"{self.table_path}/{STAGING_DIR}/{self.txn}"
        self._published: list[str] = []
        self._attempts = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> _InFlight:
        self.fs.create_dir(self.dir)
        self._write_marker()
        self._beat = threading.Thread(target=self._heartbeat, name="lake-writer", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            self.fs.delete_dir(self.dir)
        except (FileNotFoundError, OSError) as e:
            log.warning("could not remove staging folder %s: %s", self.dir, e)

    def uri_of(self, path: str) -> str:
        """``path`` (on this table's filesystem) as a URI Spark can write to."""
        return self.uri + path[len(self.table_path) :]

    def next_data_dir(self) -> str:
        self._attempts += 1
        return f"{self.dir}/data-{self._attempts}"

    def publishing(self, rels: list[str]) -> None:
        """Record files about to be moved into the table (before they are moved)."""
        self._published.extend(rels)
        with self.fs.open_output_stream(f"{self.dir}/{MANIFEST}") as f:
            f.write(json.dumps(self._published).encode())

    def undo(self, adds: list[AddAction]) -> Callable[[], None]:
        """Delete files this writer moved into the table and did not commit."""

        def run() -> None:
            for a in adds:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(f"{self.table_path}/{a.path}")

        return run

    def _write_marker(self) -> None:
        marker = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "heartbeat": time.time(),
        }
        with self.fs.open_output_stream(f"{self.dir}/{MARKER}") as f:
            f.write(json.dumps(marker).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_marker()
            except OSError as e:  # the folder was removed under us: nothing to protect any more
                log.warning("lake writer heartbeat failed: %s", e)


@dataclass
class _StagedWriter:
    path: str
    alive: bool
    published: list[str]
    newest: float  # newest modification time of anything in the folder (epoch seconds)


BROADCAST_MERGE_KEYS = 1_000_000  # source keys a merge broadcasts instead of a full outer join


def _replaced(
    target: DataFrame,
    source: DataFrame,
    keyset: DataFrame,
    keys: list[str],
    schema: StructType,
) -> DataFrame:
    """``_upserted``'s rows without shuffling either side's rows: the target rows whose keys
    are not in the broadcast ``keyset`` (the source's non-null keys), then every source row,
    repeated once per target row it matches (Delta's MERGE updates each of them), at least
    once. Only the matched target rows' keys are shuffled, to count them."""
    names = schema.fieldNames()
    kept = target.join(keyset, keys, "left_anti")
    matched = (
        target.select(*keys)
        .join(keyset, keys, "left_semi")
        .groupBy(*keys)
        .agg(F.count("*").alias("_pl_matches"))
    )
    copies = F.coalesce(F.col("_pl_matches"), F.lit(1))
    inserted = (
        source.join(F.broadcast(matched), keys, "left")
        .withColumn("_pl_copy", F.explode(F.sequence(F.lit(1), copies)))
        .drop("_pl_matches", "_pl_copy")
    )
    cols = [F.col(f"`{n}`") for n in names]
    return kept.select(*cols).unionByName(inserted.select(*cols))


def _upserted(
    target: DataFrame, source: DataFrame, keys: list[str], schema: StructType
) -> DataFrame:
    """The rewritten files' rows after an upsert, in one full outer join (one shuffle of each
    side): a target row that a source row matches takes the source row's values, others stay;
    source rows that match nothing are added. Keys compare with ``=`` (null matches nothing)."""
    names = schema.fieldNames()
    t = target.select(*[F.col(f"`{n}`").alias(f"_pl_t{i}") for i, n in enumerate(names)])
    s = source.select(
        *[F.col(f"`{n}`").alias(f"_pl_s{i}") for i, n in enumerate(names)],
        F.lit(True).alias("_pl_in_source"),
    )
    position = {n.lower(): i for i, n in enumerate(names)}
    on = None
    for k in keys:
        i = position[k.lower()]
        eq = t[f"_pl_t{i}"] == s[f"_pl_s{i}"]
        on = eq if on is None else on & eq
    joined = t.join(s, on, "full_outer")
    matched = F.col("_pl_in_source").isNotNull()
    return joined.select(
        *[
            F.when(matched, F.col(f"_pl_s{i}")).otherwise(F.col(f"_pl_t{i}")).alias(n)
            for i, n in enumerate(names)
        ]
    )


def _staged_writers(fs: pafs.FileSystem, table_path: str) -> list[_StagedWriter]:
    staging = f"{table_path}/{STAGING_DIR}"
    if fs.get_file_info(staging).type != pafs.FileType.Directory:
        return []
    now = time.time()
    out = []
    for entry in fs.get_file_info(pafs.FileSelector(staging)):
        if entry.type != pafs.FileType.Directory:
            continue
        inside = fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
        times = [i.mtime.timestamp() for i in [entry, *inside] if i.mtime is not None]
        newest = max(times) if times else now
        marker = _read_json(fs, f"{entry.path}/{MARKER}")
        if marker is None:  # just created, or left by an older version: judge by age only
            alive = now - newest < STALE_AFTER_S
        elif marker.get("host") == socket.gethostname():
            alive = _pid_alive(int(marker["pid"]), marker.get("process_start"))
        else:
            alive = now - float(marker.get("heartbeat", 0)) < STALE_AFTER_S
        published = _read_json(fs, f"{entry.path}/{MANIFEST}") or []
        out.append(_StagedWriter(entry.path, alive, list(published), newest))
    return out


def _sweep_staging(
    fs: pafs.FileSystem, writers: list[_StagedWriter], retention_hours: int, dry_run: bool
) -> list[str]:
    """Delete the staging folders of dead writers untouched for ``retention_hours``."""
    cutoff = time.time() - retention_hours * 3600
    swept = []
    for w in writers:
        if w.alive or w.newest > cutoff:
            continue
        swept.append(w.path)
        if not dry_run:
            fs.delete_dir(w.path)
    return swept


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live writer from a reused pid), Linux only."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _process_start(pid) in (None, started)


# ---- table checks and conversions ------------------------------------------------------------


def _check_supported(dt: DeltaTable, uri: str) -> None:
    """Refuse tables whose data files Spark cannot read or write as plain Parquet."""
    protocol = dt.protocol()
    unsupported = {"deletionVectors", "columnMapping"} & set(protocol.reader_features or [])
    mapping = (dt.metadata().configuration or {}).get("delta.columnMapping.mode") or "none"
    if mapping != "none":  # reader version 2 has column mapping without naming features
        unsupported.add("columnMapping")
    if unsupported:
        raise PatternlakeError(
            f"{uri} uses Delta features {sorted(unsupported)} that Spark cannot read or write "
            "through plain Parquet; use lake.engine: spark-delta for this table"
        )


def _partition_filters(values: dict[str, Any] | None) -> list[tuple[str, str, Any]] | None:
    """delta-rs partition filters; a null partition value is matched by ``""``."""
    if not values:
        return None
    return [(k, "=", "" if v is None else str(v)) for k, v in values.items()]


def _spark_schema(dt: DeltaTable) -> StructType:
    return StructType.fromJson(json.loads(dt.schema().to_json()))


def _delta_schema(schema: StructType) -> Schema:
    return Schema.from_json(schema.json())


def commit_entries(uri: str, version: int) -> list[dict[str, Any]] | None:
    """The actions of the commit that made ``version`` (one JSON object per line of its log
    file), or None when that log file is gone (expired). Either engine's tables."""
    fs, table_path = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{table_path}/_delta_log/{version:020d}.json") as f:
            lines = f.read().decode("utf-8").splitlines()
    except (FileNotFoundError, OSError):
        return None
    return [json.loads(line) for line in lines if line.strip()]


def commit_rows(uri: str, version: int) -> int:
    """Rows added by the commit that made ``version``: the sum of ``numRecords`` in the
    statistics of its add actions (no data is read)."""
    entries = commit_entries(uri, version)
    if entries is None:
        raise PatternlakeError(f"{uri} version {version}: its commit is no longer in the log")
    rows = 0
    for entry in entries:
        add = entry.get("add")
        if add:
            stats = json.loads(add.get("stats") or "{}")
            if "numRecords" not in stats:
                raise PatternlakeError(f"{uri} version {version}: a file has no row count")
            rows += int(stats["numRecords"])
    return rows


def _spark_path(uri: str) -> str:
    """delta-rs names S3 ``s3://``; Hadoop's connector is ``s3a://``."""
    return "s3a://" + uri[5:] if uri.startswith("s3://") else uri


def _relative(uri: str, file_uri: str) -> str:
    """A data file's path relative to the table root, as named on disk."""
    root = strip_file_scheme(uri).rstrip("/")
    return strip_file_scheme(file_uri)[len(root) + 1 :]


# ---- statistics ------------------------------------------------------------------------------

# Types whose min/max delta-rs readers do not use (so they need none).
_NO_RANGE_TYPES = (
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_list,
    pa.types.is_large_list,
    pa.types.is_map,
    pa.types.is_fixed_size_binary,
)
MAX_STAT_STRING = 32


def _file_stats(meta: pq.FileMetaData) -> str:
    """Delta ``stats`` JSON from a Parquet footer, in the form delta-rs's own writer uses.

    A statistic is written only when it is known to be right: a null count only when every
    row group has one (Spark drops statistics of values over 4 KB), min/max only when they are
    finite and of a type with a known encoding. delta-rs readers turn ``minValues`` into a
    guarantee on *every* column (a missing one reads as ``>= null``, which drops the file),
    so min/max are written for all columns of the file or for none.
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    ranges_ok = True
    arrow = meta.schema.to_arrow_schema()
    top = {f.name: f.type for f in arrow}
    if any(pa.types.is_struct(t) for t in top.values()):
        ranges_ok = False  # nested statistics are not written, and readers would want them
    schema = meta.schema
    for i in range(meta.num_columns):
        column = schema.column(i)
        if "." in column.path:  # nested: no stats
            continue
        name = column.path
        count: int | None = 0
        lo = hi = None
        bounded = True
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(i)
            st = chunk.statistics
            if st is None or not st.has_null_count:
                count = None
                bounded = False
                break
            count += st.null_count
            if st.null_count == chunk.num_values:
                continue  # only nulls in this row group: no range needed
            if not st.has_min_max:
                bounded = False
                continue
            try:
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
            except (UnicodeDecodeError, TypeError, ValueError):
                bounded = False
        if count is not None:
            nulls[name] = count
        if any(pred(top[name]) for pred in _NO_RANGE_TYPES):
            continue
        if count is not None and count == meta.num_rows:
            continue  # all null: the null count says it all
        encoded = _encode_range(top[name], lo, hi) if bounded and lo is not None else None
        if encoded is None:
            ranges_ok = False
        else:
            mins[name], maxs[name] = encoded
    stats: dict[str, Any] = {"numRecords": meta.num_rows}
    if ranges_ok and mins:
        stats["minValues"], stats["maxValues"] = mins, maxs
    stats["nullCount"] = nulls
    return json.dumps(stats, allow_nan=False)


def _encode_range(typ: pa.DataType, lo: Any, hi: Any) -> tuple[Any, Any] | None:
    """(min, max) as delta-rs writes them, or None when they cannot be written exactly."""
    if pa.types.is_boolean(typ) or (pa.types.is_integer(typ) and pa.types.is_signed_integer(typ)):
        return lo, hi
    if pa.types.is_floating(typ):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None  # NaN (Spark ranks it highest) or infinity: not JSON
        return float(lo), float(hi)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if not isinstance(lo, str) or not isinstance(hi, str):
            return None
        lo = lo[:MAX_STAT_STRING]  # a prefix is still a lower bound
        if len(hi) > MAX_STAT_STRING:  # a bound above every string with this prefix
            last = ord(hi[MAX_STAT_STRING - 1])
            if last in (0xD7FF, 0x10FFFF):
                return None
            hi = hi[: MAX_STAT_STRING - 1] + chr(last + 1)
        return lo, hi
    if pa.types.is_date32(typ):
        return lo.isoformat(), hi.isoformat()
    if pa.types.is_timestamp(typ) and typ.unit in ("ms", "us"):
        # milliseconds, truncated (readers add 1 ms to the max, as for Delta on Spark)
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
        suffix = "Z" if typ.tz is not None else ""
        return (
            lo.strftime(fmt)[:-3] + suffix,
            hi.strftime(fmt)[:-3] + suffix,
        )
    if pa.types.is_decimal(typ):
        if typ.precision > 15:  # written as a JSON double: exact up to 15 digits only
            return None
        return float(decimal.Decimal(lo)), float(decimal.Decimal(hi))
    return None
