"""Native Delta Lake on Spark: ``format("delta")`` and ``delta.tables.DeltaTable``.

Chosen by ``lake.engine: auto`` when the Delta jars are on the classpath (Databricks, or a
cluster started with ``--packages io.delta:delta-spark_2.13:<version>``). Writes the same
tables on disk as the delta-rs engine; the contract tests run against both where both exist.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from patternlake.errors import PatternlakeError, TableNotFoundError
from patternlake.lake.engine import WriteMode

log = logging.getLogger(__name__)


class SparkDeltaEngine:
    name = "spark-delta"

    def __init__(self, spark: SparkSession):
        from delta.tables import DeltaTable  # the delta-spark Python package

        self.spark = spark
        self._DeltaTable = DeltaTable

    def _table(self, uri: str) -> Any:
        if not self.exists(uri):
            raise TableNotFoundError(f"no Delta table at {uri}: run the job that writes it first")
        return self._DeltaTable.forPath(self.spark, uri)

    def exists(self, uri: str) -> bool:
        return bool(self._DeltaTable.isDeltaTable(self.spark, uri))

    def schema(self, uri: str) -> StructType:
        return self._table(uri).toDF().schema

    def partition_columns(self, uri: str) -> list[str]:
        detail = self._table(uri).detail().collect()[0]
        return list(detail["partitionColumns"])

    def version(self, uri: str) -> int:
        return int(self._table(uri).history(1).collect()[0]["version"])

    def read_range(self, uri: str, column: str, lo: Any, hi: Any) -> DataFrame:
        # Delta's data skipping prunes files by the same log statistics
        return self.read(uri, None, None).filter(F.col(f"`{column}`").between(lo, hi))

    def read(self, uri: str, version: int | None, timestamp: datetime | None) -> DataFrame:
        self._table(uri)
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        if timestamp is not None:
            reader = reader.option("timestampAsOf", timestamp.isoformat())
        try:
            return reader.load(uri)
        except Exception as exc:  # Delta resolves the version here, when the plan is built
            if timestamp is not None and "earliest" in str(exc).lower():
                raise PatternlakeError(
                    f"{uri}: no version at or before {timestamp.isoformat()} ({exc})"
                ) from None
            raise

    def files(self, uri: str, version: int | None) -> list[str]:
        return list(self.read(uri, version, None).inputFiles())

    def history(self, uri: str, limit: int | None) -> list[dict[str, Any]]:
        rows = self._table(uri).history(limit) if limit else self._table(uri).history()
        return [r.asDict(recursive=True) for r in rows.collect()]

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
        writer = df.write.format("delta").mode(mode)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if add_columns is not None:
            writer = writer.option("mergeSchema", "true")
        if overwrite_schema:
            writer = writer.option("overwriteSchema", "true")
        if replace_where:
            writer = writer.option("replaceWhere", _where(replace_where))
        writer = writer.option("userMetadata", json.dumps(metadata, sort_keys=True))
        writer.save(uri)
        return self.version(uri)

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
        if add_columns is not None:
            self.spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        key = "spark.databricks.delta.commitInfo.userMetadata"
        self.spark.conf.set(key, json.dumps(metadata, sort_keys=True))
        try:
            (
                self._table(uri)
                .alias("t")
                .merge(df.alias("s"), cond)
                .whenMatchedUpdateAll()
                .whenNotMatchedInsertAll()
                .execute()
            )
        finally:
            self.spark.conf.unset(key)
        return self.version(uri)

    def rewrite(
        self,
        uri: str,
        touched: Any,
        transform: Callable[[DataFrame], DataFrame],
        *,
        metadata: dict[str, str],
    ) -> dict[str, int]:
        """Native Delta has no "replace these files" API: when any row matches ``touched``,
        the whole table is overwritten with ``transform`` of its rows (which must leave the
        other rows as they are), one commit without predicate or values."""
        current = self.read(uri, None, None)
        if not current.filter(touched).limit(1).count():
            return {"files": 0, "rows_before": 0, "rows_after": 0, "version": self.version(uri)}
        before = current.count()
        files = len(self.files(uri, None))
        after = transform(current).select(*current.columns).localCheckpoint()
        (
            after.write.format("delta")
            .mode("overwrite")
            .option("userMetadata", json.dumps(metadata, sort_keys=True))
            .save(uri)
        )
        return {
            "files": files,
            "rows_before": before,
            "rows_after": after.count(),
            "version": self.version(uri),
        }

    def commit_rows(self, uri: str, version: int) -> int:
        from patternlake.lake.deltars import commit_rows  # the log has one format on disk

        return commit_rows(uri, version)

    def expire_history(self, uri: str) -> list[str]:
        from patternlake.lake.deltars import expire_log

        return expire_log(uri)

    def delete(self, uri: str, predicate: str) -> int:
        table = self._table(uri)
        try:
            table.delete(predicate)
        except Exception as exc:
            raise PatternlakeError(
                f"delete from {uri}: bad predicate {predicate!r}: {exc}"
            ) from None
        last = table.history(1).collect()[0]
        return int((last["operationMetrics"] or {}).get("numDeletedRows", 0))

    def vacuum(self, uri: str, retention_hours: int, dry_run: bool) -> list[str]:
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        if dry_run:
            rows = self.spark.sql(
                f"VACUUM delta.`{uri}` RETAIN {retention_hours} HOURS DRY RUN"
            ).collect()
            return [r[0] for r in rows]
        before = set(_all_files(self.spark, uri))
        self._table(uri).vacuum(retention_hours)
        return sorted(before - set(_all_files(self.spark, uri)))

    def compact(self, uri: str, target_size: int) -> dict[str, Any]:
        self.spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(target_size))
        row = self._table(uri).optimize().executeCompaction().collect()[0]
        return row.asDict(recursive=True)


def _where(values: dict[str, Any]) -> str:
    return " AND ".join(
        f"`{k}` IS NULL" if v is None else f"`{k}` = {_sql_literal(v)}" for k, v in values.items()
    )


def _sql_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return "'" + str(v).replace("'", "''") + "'"


def _all_files(spark: SparkSession, uri: str) -> list[str]:
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    path = jvm.org.apache.hadoop.fs.Path(uri)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[attr-defined]
    it = fs.listFiles(path, True)
    out = []
    while it.hasNext():
        p = it.next().getPath().toString()
        if "/_delta_log/" not in p:
            out.append(p)
    return out
