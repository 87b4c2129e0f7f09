"""The Delta log and the table's files, read and written through Spark's Hadoop file system
(so the same code works on ``file:``, ``dbfs:``, ``abfss:`` and ``s3a:``): a version's
``commitInfo``, text files in the log, Delta's ``DeltaLog`` class (open source or
Databricks), the table's data files, and deleting log entries older than a checkpoint. The
engine (``delta_spark``) uses these for what delta-spark's API does not offer."""

from __future__ import annotations

import json
import re
from typing import Any

from pyspark.sql import SparkSession

from patternlake.errors import PatternlakeError


def file_system(spark: SparkSession, uri: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    path = jvm.org.apache.hadoop.fs.Path(uri)
    conf = spark._jsparkSession.sessionState().newHadoopConf()  # type: ignore[attr-defined]
    return path.getFileSystem(conf), path


def read_text(spark: SparkSession, uri: str) -> str:
    fs, path = file_system(spark, uri)
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    stream = fs.open(path)
    try:
        return jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()


def commit_info(spark: SparkSession, uri: str, version: int) -> dict[str, Any]:
    """The ``commitInfo`` action of the log entry of ``version`` (empty when it has none)."""
    text = read_text(spark, f"{uri}/_delta_log/{version:020d}.json")
    for line in text.splitlines():
        if '"commitInfo"' in line:
            return json.loads(line).get("commitInfo") or {}
    return {}


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    fs, path = file_system(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def delta_log_class(spark: SparkSession) -> Any:
    """Delta's ``DeltaLog`` class: open-source Delta's, or the Databricks runtime's."""
    from py4j.java_gateway import JavaClass

    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    for name in (
        "org.apache.spark.sql.delta.DeltaLog",
        "com.databricks.sql.transaction.tahoe.DeltaLog",
    ):
        found: Any = jvm
        for part in name.split("."):
            found = getattr(found, part)
        if isinstance(found, JavaClass):
            return found
    raise PatternlakeError("the Spark session has no Delta Lake DeltaLog class on its classpath")


def data_files(spark: SparkSession, uri: str) -> list[str]:
    """Every file under the table folder but its log."""
    fs, path = file_system(spark, uri)
    it = fs.listFiles(path, True)
    out = []
    while it.hasNext():
        p = it.next().getPath().toString()
        if "/_delta_log/" not in p:
            out.append(p)
    return out


LOG_FILE = re.compile(r"^(\d{20})\.(json|crc|checkpoint\..*parquet|checkpoint\.parquet)$")


def delete_log_before(spark: SparkSession, uri: str, version: int) -> list[str]:
    """Delete the log entries, checksums and checkpoints of versions before ``version`` (its
    checkpoint now holds the table's state; its own entry stays for ``history``)."""
    fs, path = file_system(spark, f"{uri}/_delta_log")
    removed = []
    for status in fs.listStatus(path):
        name = status.getPath().getName()
        m = LOG_FILE.match(name)
        if not m:
            continue
        v = int(m.group(1))
        if v < version:
            fs.delete(status.getPath(), False)
            removed.append(name)
    return sorted(removed)
