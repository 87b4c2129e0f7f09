"""What the Delta engine behind the lake layer provides.

The engine works on table URIs and Spark DataFrames; the `Lake` facade resolves names from
conf, checks schemas against the catalog, retries commit conflicts and logs. The engine is
``delta-spark`` (``lake.delta_spark``): ``format("delta")`` and ``delta.tables`` with the
Delta jars on Spark's classpath, locally, on clusters and on Databricks alike. Readers
without Spark (pandas, DuckDB, BI tools) read the same tables with delta-rs (``deltalake``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

from pyspark.sql import Column, DataFrame
from pyspark.sql.types import StructType

WriteMode = Literal["append", "overwrite"]


class DeltaEngine(Protocol):
    name: str

    def exists(self, uri: str) -> bool: ...

    def schema(self, uri: str) -> StructType: ...

    def partition_columns(self, uri: str) -> list[str]: ...

    def version(self, uri: str) -> int: ...

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
        """Write ``df``, already aligned to ``schema`` (the table's schema after this write,
        ``add_columns`` being the new ones); return the new version."""
        ...

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
        """Upsert ``df`` on ``keys`` (update matching rows, insert the rest); return the version.
        ``source_keys``: how many distinct non-null keys ``df`` has, when the caller knows."""
        ...

    def read(self, uri: str, version: int | None, timestamp: datetime | None) -> DataFrame: ...

    def read_range(self, uri: str, column: str, lo: Any, hi: Any) -> DataFrame:
        """The latest version's rows with ``lo <= column <= hi``, reading only the files whose
        min/max statistics in the log overlap that range."""
        ...

    def commit_rows(self, uri: str, version: int) -> int:
        """Rows added by the commit that made ``version``, from its log statistics."""
        ...

    def files(self, uri: str, version: int | None) -> list[str]:
        """Absolute paths of the Parquet files of one version."""
        ...

    def history(self, uri: str, limit: int | None) -> list[dict[str, Any]]: ...

    def delete(
        self, uri: str, predicate: str | Column, metadata: dict[str, str] | None = None
    ) -> dict[str, int]:
        """Delete rows matching a SQL predicate or Column; return rows deleted and version."""
        ...

    def update(
        self, uri: str, predicate: Column, values: dict[str, Column], metadata: dict[str, str]
    ) -> int | None:
        """Set ``values`` on the rows matching ``predicate``; the version, or None if none."""
        ...

    def purge(self, uri: str) -> None:
        """Rewrite the files with deletion vectors without the rows they hide."""
        ...

    def vacuum(self, uri: str, retention_hours: int, dry_run: bool, lite: bool) -> list[str]:
        """Delete files no longer referenced by versions inside the retention window."""
        ...

    def compact(self, uri: str, target_size: int) -> dict[str, Any]: ...

    def expire_history(self, uri: str) -> list[str]:
        """Checkpoint the current version and delete older log entries; return them."""
        ...
