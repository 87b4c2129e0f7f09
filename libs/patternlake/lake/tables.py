"""The lake layer every stage uses: named Delta tables under one root.

>>> lake = Lake(spark, config.lake)
>>> lake.write(df, "silver_events", mode="append")
>>> lake.read("silver_events", version=3)
>>> lake.merge(updates, "item_index", keys=["item_id"])

Names come from ``lake.tables`` in conf. An absolute path or URI also works (notebooks,
ad-hoc tables). Schema rules follow Delta's: columns are matched by name (case-insensitive),
a column missing from the data is written as null, a new column needs
``merge_schema=True``, and a column whose type differs is rejected.

A write or merge to a catalogued table (``lake.catalog``: its schema and producing stage)
is checked against its contract first: a column it does not name, a ``NOT NULL`` one
missing, a type that differs or a null in a ``NOT NULL`` column raise
``SchemaMismatchError`` and nothing is written (the rules: ``lake.catalog``).
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructField, StructType

from patternlake.config import LakeConfig
from patternlake.errors import (
    ConcurrentCommitError,
    ConfigError,
    PatternlakeError,
    SchemaMismatchError,
    UndeclaredTableError,
)
from patternlake.lake.catalog import CATALOG, CONTRACTS, Contract, type_text
from patternlake.lake.engine import DeltaEngine, WriteMode
from patternlake.lake.paths import strip_file_scheme
from patternlake.spark import delta_jars_loaded, job_label

log = logging.getLogger(__name__)


def make_engine(spark: SparkSession, conf: LakeConfig) -> DeltaEngine:
    """The lake's engine: Delta Lake on Spark (``lake.engine``: ``auto`` or ``delta-spark``)."""
    from patternlake.lake.delta_spark import DeltaSparkEngine

    if not delta_jars_loaded(spark):
        raise ConfigError(
            "lake.engine: delta-spark needs the Delta Lake jars on the Spark classpath: run "
            "`make setup`, or start Spark with --packages io.delta:delta-spark_2.13:<version>"
        )
    return DeltaSparkEngine(spark)


# How long a write or merge keeps retrying after commit conflicts with other writers.
RETRY_DEADLINE_S = 600.0


def _retrying(what: str, attempt: Callable[[], int]) -> int:
    """Run ``attempt`` (one whole write: read the table's state, write, commit) again after
    each commit conflict, with jittered backoff, until it commits or the deadline passes."""
    deadline = time.monotonic() + RETRY_DEADLINE_S
    conflicts = 0
    while True:
        try:
            return attempt()
        except ConcurrentCommitError as exc:
            conflicts += 1
            if time.monotonic() > deadline:
                raise ConcurrentCommitError(
                    f"{what}: {conflicts} commit conflicts in {RETRY_DEADLINE_S:.0f} s, "
                    f"nothing was committed; the last: {exc}"
                ) from None
            pause = min(5.0, 0.2 * 2 ** min(conflicts, 5)) * (0.5 + random.random())
            log.info("%s: conflict with another writer, retrying in %.1fs (%s)", what, pause, exc)
            time.sleep(pause)


def _labelled(verb: str, position: int) -> Callable:
    """Run a table operation under the Spark job label ``<verb> <table>`` (the table name is
    argument ``position`` or ``name=``)."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: Lake, *args: Any, **kwargs: Any) -> Any:
            table = kwargs.get("name", args[position] if len(args) > position else "?")
            with job_label(self.spark, f"{verb} {table}"):
                return method(self, *args, **kwargs)

        return run

    return wrap


class Lake:
    def __init__(self, spark: SparkSession, conf: LakeConfig, engine: DeltaEngine | None = None):
        self.spark = spark
        self.conf = conf
        self.root = _resolve_root(conf.root)
        self.engine = engine or make_engine(spark, conf)
        self.contracts = CONTRACTS
        self.scope: tuple[str, frozenset[str]] | None = None  # (stage, the tables it declares)

    def scoped(self, stage: str, tables: Iterable[str]) -> Lake:
        """This lake as stage ``stage`` sees it: every catalogued table outside ``tables``
        (what its declaration reads and writes) raises ``UndeclaredTableError``."""
        view = copy.copy(self)
        view.scope = (stage, frozenset(tables))
        return view

    def contract(self, name: str) -> Contract | None:
        """The contract writes to table ``name`` are checked against (None: a path, or a
        table of conf that the catalog does not know)."""
        return self.contracts.get(name) if name in self.conf.tables else None

    # ---- names ---------------------------------------------------------------------------

    def uri(self, name: str) -> str:
        """Where table ``name`` lives: ``lake.root/<path from conf>``, or ``name`` itself when
        it is an absolute path or URI."""
        if name in self.conf.tables:
            if self.scope and name not in self.scope[1]:
                stage, tables = self.scope
                raise UndeclaredTableError(
                    f"stage {stage} used table {name}, which its declaration does not name "
                    f"(it declares {', '.join(sorted(tables)) or 'none'}); add {name} to its "
                    "inputs or outputs in its package's stage.py"
                )
            return f"{self.root}/{self.conf.tables[name].path}"
        if name.startswith("/") or "://" in name:
            return _resolve_root(name)
        known = ", ".join(sorted(self.conf.tables))
        raise ConfigError(
            f"table {name!r} is not in lake.tables (known: {known}) and is not a path"
        )

    def local_path(self, name: str | None = None) -> Path | None:
        """The lake root (or table ``name``) as a local folder; None on an object store."""
        uri = self.root if name is None else self.uri(name)
        return None if "://" in uri or uri.startswith("dbfs:") else Path(uri)

    def exists(self, name: str) -> bool:
        return self.engine.exists(self.uri(name))

    # ---- reading -------------------------------------------------------------------------

    def read(
        self, name: str, version: int | None = None, timestamp: datetime | str | None = None
    ) -> DataFrame:
        """The latest version, or the one given by ``version`` or ``timestamp`` (time travel)."""
        if version is not None and timestamp is not None:
            raise PatternlakeError("read: give version or timestamp, not both")
        if isinstance(timestamp, str):
            try:
                timestamp = datetime.fromisoformat(timestamp)
            except ValueError:
                raise PatternlakeError(f"read: timestamp {timestamp!r} is not ISO-8601") from None
        return self.engine.read(self.uri(name), version, timestamp)

    def read_range(self, name: str, column: str, lo: Any, hi: Any) -> DataFrame:
        """Rows with ``lo <= column <= hi``, reading only the files whose min/max statistics in
        the log overlap the range (a key-range lookup: cheap when the key grows with time)."""
        return self.engine.read_range(self.uri(name), column, lo, hi)

    def commit_rows(self, name: str, version: int) -> int:
        """Rows added by the commit that made ``version`` (from the ``numRecords`` statistics of
        its add actions in the log; no data is read)."""
        return self.engine.commit_rows(self.uri(name), version)

    def version(self, name: str) -> int:
        return self.engine.version(self.uri(name))

    def schema(self, name: str) -> StructType:
        return self.engine.schema(self.uri(name))

    def files(self, name: str, version: int | None = None) -> list[str]:
        """Absolute paths of the Parquet files making up one version (for loaders)."""
        return self.engine.files(self.uri(name), version)

    def history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits, newest first: version, timestamp, operation, parameters, metrics."""
        return self.engine.history(self.uri(name), limit)

    def register_views(self) -> list[str]:
        """Expose every existing table as a temp view named after it (for SQL / notebooks)."""
        names = [n for n in sorted(self.conf.tables) if self.exists(n)]
        for n in names:
            self.read(n).createOrReplaceTempView(n)
        return names

    # ---- writing -------------------------------------------------------------------------

    @_labelled("write", 1)
    def write(
        self,
        df: DataFrame,
        name: str,
        mode: WriteMode = "append",
        *,
        partition_by: list[str] | None = None,
        replace_where: dict[str, Any] | None = None,
        merge_schema: bool = False,
        overwrite_schema: bool = False,
        commit_info: dict[str, str] | None = None,
    ) -> int:
        """Append or overwrite; ``replace_where={"day": "2026-01-02"}`` overwrites only that
        partition. Returns the table version written."""
        if mode not in ("append", "overwrite"):
            raise PatternlakeError(
                f"write {name}: mode must be 'append' or 'overwrite', not {mode!r}"
            )
        if overwrite_schema and mode != "overwrite":
            raise PatternlakeError(f"write {name}: overwrite_schema needs mode='overwrite'")
        if replace_where and mode != "overwrite":
            raise PatternlakeError(f"write {name}: replace_where needs mode='overwrite'")
        started = time.monotonic()
        uri = self.uri(name)
        version = _retrying(
            f"write {name}",
            lambda: self._write_once(
                df,
                name,
                uri,
                mode,
                partition_by=partition_by,
                replace_where=replace_where,
                merge_schema=merge_schema,
                overwrite_schema=overwrite_schema,
                metadata={
                    "patternlake.operation": "write",
                    "patternlake.mode": mode,
                    **(commit_info or {}),
                },
            ),
        )
        log.info(
            "lake write %s mode=%s -> version %d (%.1fs)",
            name,
            mode,
            version,
            time.monotonic() - started,
        )
        return version

    def _write_once(
        self,
        df: DataFrame,
        name: str,
        uri: str,
        mode: WriteMode,
        *,
        partition_by: list[str] | None,
        replace_where: dict[str, Any] | None,
        merge_schema: bool,
        overwrite_schema: bool,
        metadata: dict[str, str],
    ) -> int:
        """One attempt at a write, against the table as it is now (``write`` retries it)."""
        exists = self.engine.exists(uri)
        if replace_where and not exists:
            # replaceWhere needs a table: create it empty first, so that two writers creating
            # it at once each replace their own partition (never the whole table)
            self._create_empty(df, name, uri, partition_by, metadata)
            exists = True
        df, guards = self._conform(df, name, creates=overwrite_schema or not exists)
        spec = self.conf.tables.get(name)
        partition_by = list(partition_by or (spec.partition_by if spec else []))
        if exists and not overwrite_schema:
            table_parts = self.engine.partition_columns(uri)
            if partition_by and [p.lower() for p in partition_by] != [
                p.lower() for p in table_parts
            ]:
                raise SchemaMismatchError(
                    f"write {name}: table is partitioned by {table_parts}, not {partition_by}"
                )
            partition_by = table_parts
            aligned, target, added = _align(df, self.engine.schema(uri), merge_schema, name)
        else:
            aligned, target, added = _align(df, StructType([]), True, name)
            added = None
        missing = [p for p in partition_by if p not in target.fieldNames()]
        if missing:
            raise SchemaMismatchError(
                f"write {name}: partition columns {missing} are not in the data"
            )
        outside = None
        if replace_where:
            aligned, outside = self._guard_replace_where(aligned, name, partition_by, replace_where)
        try:
            return self.engine.write(
                aligned,
                uri,
                mode=mode,
                partition_by=partition_by,
                replace_where=replace_where,
                schema=target,
                add_columns=added,
                overwrite_schema=overwrite_schema,
                metadata=metadata,
            )
        except ConcurrentCommitError:
            raise
        except Exception as exc:
            if outside and outside in str(exc):
                raise PatternlakeError(outside) from None
            _raise_guard(exc, guards)
            raise

    def _create_empty(
        self,
        df: DataFrame,
        name: str,
        uri: str,
        partition_by: list[str] | None,
        metadata: dict[str, str],
    ) -> None:
        """Create table ``name`` with ``df``'s columns and no rows. An empty append: when
        another writer created the table meanwhile, it adds nothing (or conflicts and is
        retried), so creating never races with a creator."""
        empty, _ = self._conform(df.limit(0), name, creates=True)
        spec = self.conf.tables.get(name)
        parts = list(partition_by or (spec.partition_by if spec else []))
        aligned, target, _ = _align(empty, StructType([]), True, name)
        self.engine.write(
            aligned,
            uri,
            mode="append",
            partition_by=parts,
            replace_where=None,
            schema=target,
            add_columns=None,
            overwrite_schema=False,
            metadata={**metadata, "patternlake.operation": "create"},
        )

    @_labelled("merge", 1)
    def merge(
        self,
        df: DataFrame,
        name: str,
        keys: list[str],
        *,
        merge_schema: bool = False,
        commit_info: dict[str, str] | None = None,
    ) -> int:
        """Upsert on ``keys`` with Delta's MERGE semantics: every table row whose keys equal a
        row of ``df`` takes that row's values (all of them, when several match), the rows of
        ``df`` that match nothing are inserted. Creates the table when it does not exist.

        Keys compare with SQL ``=``: a null never equals anything, not even another null. A
        row of ``df`` with a null key therefore never matches and is always inserted (merging
        it twice gives two rows); filter such rows out first when that is not wanted. Two rows
        of ``df`` with the same non-null keys are an error."""
        started = time.monotonic()
        uri = self.uri(name)
        self._check_contract(df, name)  # before the duplicate check's pass over the data
        missing = [k for k in keys if k not in df.columns]
        if not keys or missing:
            raise SchemaMismatchError(
                f"merge into {name}: key columns {missing or keys} are not in the data"
            )
        per_key = df.dropna(subset=keys).groupBy(*keys).count()  # null keys never collide
        stats = per_key.agg(F.count("*").alias("keys"), F.max("count").alias("most")).first()
        if stats["most"] is not None and stats["most"] > 1:
            dup = per_key.filter("count > 1").limit(1).collect()
            sample = {k: dup[0][k] for k in keys}
            raise PatternlakeError(
                f"merge into {name}: the data has more than one row for key {sample}"
            )
        metadata = {
            "patternlake.operation": "merge",
            "patternlake.keys": ",".join(keys),
            **(commit_info or {}),
        }

        def attempt() -> int:
            if not self.engine.exists(uri):
                # a merge into a new table: create it empty, then merge, so that two writers
                # merging the same new key never both insert it
                self._create_empty(df, name, uri, None, metadata)
            conformed, guards = self._conform(df, name, creates=False)
            aligned, target, added = _align(conformed, self.engine.schema(uri), merge_schema, name)
            try:
                return self.engine.merge(
                    aligned,
                    uri,
                    keys,
                    schema=target,
                    add_columns=added,
                    source_keys=int(stats["keys"]),
                    metadata=metadata,
                )
            except ConcurrentCommitError:
                raise
            except Exception as exc:
                _raise_guard(exc, guards)
                raise

        version = _retrying(f"merge into {name}", attempt)
        log.info(
            "lake merge %s keys=%s -> version %d (%.1fs)",
            name,
            keys,
            version,
            time.monotonic() - started,
        )
        return version

    @_labelled("delete", 0)
    def delete(
        self, name: str, predicate: str | Column, commit_info: dict[str, str] | None = None
    ) -> int:
        """Delete rows matching a SQL predicate (e.g. ``user_id = 'u1'``) or a Column; returns
        rows deleted. The data stays in old files until ``vacuum``, and the predicate stays in
        the commit's log entry until ``expire_history``."""
        started = time.monotonic()
        meta = {"patternlake.operation": "delete", **(commit_info or {})}
        out = _retrying(
            f"delete from {name}",
            lambda: self.engine.delete(self.uri(name), predicate, meta)["rows"],
        )
        log.info("lake delete %s: %d rows (%.1fs)", name, out, time.monotonic() - started)
        return out

    @_labelled("update", 0)
    def update(
        self,
        name: str,
        predicate: Column,
        values: dict[str, Column],
        commit_info: dict[str, str] | None = None,
    ) -> int | None:
        """Set columns to ``values`` (Column expressions of the row) on the rows matching
        ``predicate``; returns the version, or None when no row matched."""
        meta = {"patternlake.operation": "update", **(commit_info or {})}

        def attempt() -> int:
            version = self.engine.update(self.uri(name), predicate, values, meta)
            return -1 if version is None else version

        version = _retrying(f"update {name}", attempt)
        return None if version < 0 else version

    def purge(self, name: str) -> None:
        """Rewrite the files that have deletion vectors without the rows they hide (Delta's
        ``REORG TABLE ... APPLY (PURGE)``): deleted rows leave the current files."""
        self.engine.purge(self.uri(name))

    def expire_history(self, name: str) -> list[str]:
        """Checkpoint the current version and delete the log of every older one: time travel
        to them ends (use after ``vacuum(name, 0, lite=True)`` when old data must be gone for
        good: the old log entries hold predicates and per-file statistics)."""
        removed = self.engine.expire_history(self.uri(name))
        log.info("lake expire history %s: %d log files", name, len(removed))
        return removed

    def vacuum(
        self,
        name: str,
        retention_hours: int | None = None,
        dry_run: bool = False,
        lite: bool = False,
    ) -> list[str]:
        """Physically delete files not needed by versions newer than the retention window.

        A full vacuum deletes every file the table does not reference and that is older than
        the retention, the leftovers of killed writers included; with a retention shorter
        than the longest write, it can delete the files of a writer still running. ``lite``
        deletes only the files the log removed, so it never touches a running writer: use
        it for a short retention (``forget-user`` runs it with 0)."""
        hours = self.conf.vacuum_retention_hours if retention_hours is None else retention_hours
        removed = self.engine.vacuum(self.uri(name), hours, dry_run, lite)
        log.info(
            "lake vacuum %s retention=%dh: %d files%s",
            name,
            hours,
            len(removed),
            " (dry run)" if dry_run else "",
        )
        return removed

    def compact(self, name: str, target_mb: int | None = None) -> dict[str, Any]:
        """Rewrite small files into files of about ``target_mb`` (same rows, new version)."""
        mb = target_mb or self.conf.compact_target_mb
        metrics = self.engine.compact(self.uri(name), mb * 1024 * 1024)
        log.info("lake compact %s: %s", name, metrics)
        return metrics

    def _check_contract(self, df: DataFrame, name: str) -> Contract | None:
        """Raise SchemaMismatchError when ``df`` does not fit the contract of ``name``."""
        contract = self.contract(name)
        if contract is not None:
            problems = contract.mismatches(df.schema)
            if problems:
                raise SchemaMismatchError(
                    f"write {name}: the data does not match the table's contract in {CATALOG}: "
                    + "; ".join(problems)
                    + "; nothing was written"
                )
        return contract

    def _conform(self, df: DataFrame, name: str, creates: bool) -> tuple[DataFrame, list[str]]:
        """``df`` checked against the contract of ``name``: with the nullable contract
        columns it lacks as nulls when the write creates the table's schema, and a check
        made by the write itself that no ``NOT NULL`` column holds a null (a failing row
        stops it before anything is committed); and the messages those checks fail with."""
        contract = self._check_contract(df, name)
        if contract is None:
            return df, []
        present = {c.lower() for c in df.columns}
        if creates:
            absent = [c for c in contract.columns if c.name.lower() not in present]
            df = df.select("*", *[F.lit(None).cast(c.type).alias(c.name) for c in absent])
        required = {c.name.lower() for c in contract.columns if not c.nullable}
        messages: dict[str, str] = {}
        cols = []
        for f in df.schema.fields:
            col = F.col(f"`{f.name}`")
            if f.name.lower() in required and f.nullable:  # Spark cannot tell: check the rows
                message = messages[f.name] = (
                    f"write {name}: column {f.name} is NOT NULL in the table's contract "
                    f"({CATALOG}) but the data holds a null; nothing was written"
                )
                col = F.when(col.isNull(), F.raise_error(F.lit(message))).otherwise(col)
            cols.append(col.alias(f.name, metadata=f.metadata))  # column metadata is kept
        if not messages:
            return df, []
        return df.select(*cols), list(messages.values())

    def _guard_replace_where(
        self, df: DataFrame, name: str, partition_by: list[str], replace_where: dict[str, Any]
    ) -> tuple[DataFrame, str]:
        """``df`` with a check that every row lies inside ``replace_where``, made by the write
        itself (a failing row stops it before anything is committed), and the message it
        fails with."""
        not_parts = [k for k in replace_where if k not in partition_by]
        if not_parts:
            raise PatternlakeError(
                f"write {name}: replace_where keys {not_parts} are not partition columns {partition_by}"
            )
        message = f"write {name}: some rows fall outside replace_where {replace_where}"
        # a projection, not a filter: a filter's condition would join the plan's constraints,
        # and constraint inference over wide upstream expressions (validate's reason array)
        # can take minutes to optimise
        checked = {
            k: F.when(F.col(k).eqNullSafe(F.lit(v)), F.col(k))  # a null partition is a value too
            .otherwise(F.raise_error(F.lit(message)))
            .alias(k)
            for k, v in replace_where.items()
        }
        guarded = df.select(*[checked.get(c, F.col(f"`{c}`")) for c in df.columns])
        return guarded, message


def batches_in_order(df: DataFrame) -> list[str]:
    """The ``_batch_id`` values of an event table in ingest order (``_ingested_at``, then id)."""
    rows = (
        df.groupBy("_batch_id")
        .agg(F.min("_ingested_at").alias("t"))
        .orderBy("t", "_batch_id")
        .collect()
    )
    return [r["_batch_id"] for r in rows]


def _resolve_root(root: str) -> str:
    root = strip_file_scheme(root)
    if "://" in root or root.startswith("dbfs:"):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def _align(
    df: DataFrame, table: StructType, merge_schema: bool, name: str
) -> tuple[DataFrame, StructType, StructType | None]:
    """Match ``df``'s columns to the table's by name; return (aligned df, target schema, added)."""
    by_lower = {f.name.lower(): f for f in table.fields}
    seen: dict[str, str] = {}
    mismatched, new = [], []
    for f in df.schema.fields:
        low = f.name.lower()
        if low in seen:
            raise SchemaMismatchError(
                f"write {name}: columns {seen[low]!r} and {f.name!r} differ only in case"
            )
        seen[low] = f.name
        if low in by_lower:
            want = by_lower[low].dataType
            if type_text(f.dataType) != type_text(want):
                mismatched.append(
                    f"{f.name}: table has {want.simpleString()}, data has {f.dataType.simpleString()}"
                )
        else:
            new.append(StructField(f.name, f.dataType, True, f.metadata))
    if mismatched:
        raise SchemaMismatchError(
            f"write {name}: column types differ from the table: " + "; ".join(mismatched)
        )
    if new and not merge_schema:
        raise SchemaMismatchError(
            f"write {name}: columns {[f.name for f in new]} are not in the table; "
            "pass merge_schema=True to add them"
        )
    target = StructType(list(table.fields) + new)
    cols = []
    for f in target.fields:
        src = seen.get(f.name.lower())
        cols.append(
            F.col(f"`{src}`").alias(f.name) if src else F.lit(None).cast(f.dataType).alias(f.name)
        )
    return df.select(*cols), target, StructType(new) if new else None


def _raise_guard(exc: Exception, messages: list[str]) -> None:
    """A write stopped by one of the contract's row checks: raise its message alone."""
    text = str(exc)
    for message in messages:
        if message in text:
            raise SchemaMismatchError(message) from None
