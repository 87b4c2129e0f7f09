"""Delta tables with Spark doing the Parquet I/O and delta-rs committing the log.

A write goes in three steps, so that no reader ever sees half of it:

1. Spark writes the DataFrame as Parquet into ``<table>/_staging/<txn>/`` (a folder of its
   own per transaction, so concurrent writers never share Spark's ``_temporary``);
2. each file's statistics are read from its footer and the file is moved next to the
   table's other files (``col=value/`` folders for partitioned tables);
3. delta-rs commits Add (and Remove) actions in one atomic transaction, retrying on
   concurrent appends.

A writer killed before step 3 leaves only files that no version references: the table
stays at its previous version, and ``vacuum`` removes the leftovers.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.exceptions import DeltaError
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFound
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from patternlake.errors import PatternlakeError, TableNotFoundError
from patternlake.lake.engine import WriteMode

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
TXN_KEY = "patternlake.txn"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


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
        protocol = dt.protocol()
        unsupported = {"deletionVectors", "columnMapping"} & set(protocol.reader_features or [])
        if unsupported:
            raise PatternlakeError(
                f"{uri} uses Delta features {sorted(unsupported)} that Spark cannot read through "
                "plain Parquet; read it with lake.engine: spark-delta"
            )
        return dt

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
        adds = self._stage(df, uri, partition_by)
        txn = uuid.uuid4().hex
        props = CommitProperties(custom_metadata={**metadata, TXN_KEY: txn})
        if overwrite_schema or not self.exists(uri):
            try:
                create_table_with_add_actions(
                    uri,
                    _delta_schema(schema),
                    adds,
                    mode="overwrite" if overwrite_schema else "error",
                    partition_by=partition_by or None,
                    storage_options=self.storage_options,
                    commit_properties=props,
                )
                return self._committed_version(uri, txn)
            except DeltaError as exc:  # another writer created it first: commit on top
                if overwrite_schema or "exist" not in str(exc).lower():
                    raise
                log.info("%s was created concurrently; appending", uri)
        dt = self._table(uri)
        _add_columns(dt, add_columns)
        filters = None
        if replace_where:
            filters = [
                (k, "=", HIVE_NULL if v is None else str(v)) for k, v in replace_where.items()
            ]
        dt.create_write_transaction(
            adds,
            mode,
            _delta_schema(schema),
            partition_by=partition_by or None,
            partition_filters=filters,
            commit_properties=props,
        )
        return self._committed_version(uri, txn)

    def merge(
        self,
        df: DataFrame,
        uri: str,
        keys: list[str],
        *,
        schema: StructType,
        add_columns: StructType | None,
        metadata: dict[str, str],
    ) -> int:
        """Copy-on-write upsert computed by Spark: files holding a matching key are rewritten."""
        dt = self._table(uri)
        before = StructType(
            [
                f
                for f in schema.fields
                if add_columns is None or f.name not in add_columns.fieldNames()
            ]
        )
        partition_by = list(dt.metadata().partition_columns)
        files = dt.file_uris()
        current = self._read_files(uri, before, files).select(
            "*", F.col("_metadata.file_path").alias("_pl_file")
        )
        source_keys = df.select(*keys).distinct()
        touched_uris = [
            r[0]
            for r in current.join(source_keys, keys, "left_semi")
            .select("_pl_file")
            .distinct()
            .collect()
        ]
        by_path = {_strip_scheme(f): f for f in files}
        touched = [by_path[_strip_scheme(unquote(u))] for u in touched_uris]
        kept = self._read_files(uri, schema, touched).join(source_keys, keys, "left_anti")
        adds = self._stage(kept.unionByName(df), uri, partition_by)
        _add_columns(dt, add_columns)
        removes = self._removes(dt, uri, touched)
        txn = uuid.uuid4().hex
        dt.create_write_transaction(
            adds + removes,
            "append",
            _delta_schema(schema),
            partition_by=partition_by or None,
            commit_properties=CommitProperties(
                custom_metadata={
                    **metadata,
                    TXN_KEY: txn,
                    "patternlake.rewritten_files": str(len(removes)),
                }
            ),
        )
        return self._committed_version(uri, txn)

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
        dt = self._table(uri)
        removed = dt.vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False
        )
        removed += self._sweep_staging(uri, retention_hours, dry_run)
        return removed

    def compact(self, uri: str, target_size: int) -> dict[str, Any]:
        return self._table(uri).optimize.compact(target_size=target_size)

    # ---- internals -----------------------------------------------------------------------

    def _committed_version(self, uri: str, txn: str) -> int:
        """The version our commit got (others may have committed before or after it)."""
        for entry in self._table(uri).history(100):
            if entry.get(TXN_KEY) == txn:
                return int(entry["version"])
        raise RuntimeError(f"commit {txn} not found in the last 100 versions of {uri}")

    def _stage(self, df: DataFrame, uri: str, partition_by: list[str]) -> list[AddAction]:
        """Write ``df`` as Parquet with Spark, move the files into the table, describe them."""
        txn = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        staging = f"{uri.rstrip('/')}/{STAGING_DIR}/{txn}"
        writer = df.write.mode("errorifexists")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(_spark_path(staging))

        fs, staging_path = pafs.FileSystem.from_uri(staging)
        _, table_path = pafs.FileSystem.from_uri(uri)
        selector = pafs.FileSelector(staging_path, recursive=True)
        staged = [
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        ]
        with ThreadPoolExecutor(max_workers=8) as pool:
            adds = [
                a
                for a in pool.map(lambda p: self._publish(fs, p, staging_path, table_path), staged)
                if a
            ]
        fs.delete_dir(staging_path)
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
        root = _strip_scheme(uri).rstrip("/")
        wanted = {_strip_scheme(f)[len(root) + 1 :] for f in files}
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

    def _sweep_staging(self, uri: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Delete staging folders of writers that died more than ``retention_hours`` ago."""
        fs, table_path = pafs.FileSystem.from_uri(uri)
        staging = f"{table_path}/{STAGING_DIR}"
        if fs.get_file_info(staging).type != pafs.FileType.Directory:
            return []
        cutoff = time.time() - retention_hours * 3600
        swept = []
        for info in fs.get_file_info(pafs.FileSelector(staging)):
            started_ms = info.base_name.split("-", 1)[0]
            if started_ms.isdigit() and int(started_ms) / 1000 <= cutoff:
                swept.append(info.path)
                if not dry_run:
                    fs.delete_dir(info.path)
        return swept


def _add_columns(dt: DeltaTable, add_columns: StructType | None) -> None:
    """Schema evolution: add new (nullable) columns to the table's metadata."""
    if add_columns is None or not add_columns.fields:
        return
    dt.alter.add_columns(_delta_schema(add_columns).fields)
    dt.update_incremental()


def _spark_schema(dt: DeltaTable) -> StructType:
    return StructType.fromJson(json.loads(dt.schema().to_json()))


def _delta_schema(schema: StructType) -> Schema:
    return Schema.from_json(schema.json())


def _spark_path(uri: str) -> str:
    """delta-rs names S3 ``s3://``; Hadoop's connector is ``s3a://``."""
    return "s3a://" + uri[5:] if uri.startswith("s3://") else uri


def _strip_scheme(path: str) -> str:
    """``file:///a/b`` and ``/a/b`` name the same local file; other schemes are kept."""
    for prefix in ("file://", "file:"):
        if path.startswith(prefix):
            return "/" + path[len(prefix) :].lstrip("/")
    return path


def _file_stats(meta: pq.FileMetaData) -> str:
    """Delta ``stats`` JSON from a Parquet footer: row count, min/max and null counts of the
    top-level primitive columns (what readers use for data skipping)."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    schema = meta.schema
    for i in range(meta.num_columns):
        column = schema.column(i)
        if "." in column.path:  # nested: no stats
            continue
        name = column.path
        logical = str(column.logical_type)
        physical = column.physical_type
        lo = hi = None
        null_count = 0
        usable = usable_range = True
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(i).statistics
            if st is None:
                usable = False
                break
            null_count += st.null_count or 0
            if st.has_min_max and usable_range:
                try:
                    lo = st.min if lo is None else min(lo, st.min)
                    hi = st.max if hi is None else max(hi, st.max)
                except (UnicodeDecodeError, TypeError):  # raw bytes that are not UTF-8: no range
                    usable_range = False
                    lo = hi = None
        if not usable:
            continue
        nulls[name] = null_count
        kind = _stat_kind(physical, logical)
        if kind and lo is not None:
            if kind == "string":
                if isinstance(lo, bytes) or isinstance(hi, bytes) or len(hi) > 32:
                    continue  # Delta truncates long strings; skip rather than get max wrong
            elif kind == "date":
                lo, hi = lo.isoformat(), hi.isoformat()
            mins[name], maxs[name] = lo, hi
    return json.dumps(
        {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        default=str,
    )


def _stat_kind(physical: str, logical: str) -> str | None:
    if physical in ("INT32", "INT64") and logical in (
        "None",
        "Int(bitWidth=32, isSigned=true)",
        "Int(bitWidth=64, isSigned=true)",
        "Int(bitWidth=16, isSigned=true)",
        "Int(bitWidth=8, isSigned=true)",
    ):
        return "int"
    if physical in ("FLOAT", "DOUBLE"):
        return "float"
    if physical == "BYTE_ARRAY" and logical == "String":
        return "string"
    if physical == "INT32" and logical == "Date":
        return "date"
    return None
