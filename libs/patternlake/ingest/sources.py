"""Reading raw event files of any layout into the bronze shape.

Any CSV/TSV, JSON-lines or Parquet file or folder is read with every value as a string; a
column mapping names the source columns of the contract fields (``user_id``, ``item_id``,
``event_time`` required; ``event_type``, ``event_id`` optional). All other columns go into a
``properties`` map. Rows Spark cannot parse keep their raw text in ``_raw``.

For headerless files (MovieLens ``u.data``: ``user item rating timestamp``, tab separated)
the mapping names columns by 0-based position: ``user_id=0,item_id=1,event_time=3``; any
other position becomes a property named ``cN``, or the name given in the mapping
(``rating=2``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from patternlake.errors import PatternlakeError

CONTRACT_FIELDS = ("user_id", "item_id", "event_time", "event_type", "event_id")
REQUIRED_FIELDS = ("user_id", "item_id", "event_time")
CORRUPT = "_corrupt_record"
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "jsonl",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path or URI
    size: int
    fingerprint: str  # sha256 of the content


def list_source_files(path: str) -> list[str]:
    """The data files of ``path`` (a file, or a folder searched recursively)."""
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    fs, root = _fs(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise PatternlakeError(f"ingest: {path} does not exist")
    if info.type == pafs.FileType.File:
        return [path]
    found = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File
        and not any(
            part.startswith((".", "_")) for part in PurePosixPath(f.path[len(root) :]).parts
        )
    ]
    if not found:
        raise PatternlakeError(f"ingest: no files under {path}")
    return sorted(_with_scheme(path, f) for f in found)


def detect_format(files: list[str], wanted: str) -> str:
    if wanted != "auto":
        return wanted
    kinds = {EXTENSIONS.get(PurePosixPath(f).suffix.lower()) for f in files}
    if None in kinds:
        odd = sorted(
            {
                PurePosixPath(f).suffix or "(none)"
                for f in files
                if EXTENSIONS.get(PurePosixPath(f).suffix.lower()) is None
            }
        )
        raise PatternlakeError(
            f"ingest: cannot tell the format of files with extension {', '.join(odd)}; pass --format csv|tsv|jsonl|parquet"
        )
    if len(kinds) > 1:
        raise PatternlakeError(
            f"ingest: the input mixes formats {sorted(kinds)}; ingest them separately"
        )
    return kinds.pop()


def fingerprint(path: str) -> SourceFile:
    fs, p = _fs(path)
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_stream(p) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return SourceFile(path=path, size=size, fingerprint=digest.hexdigest())


def read_events(
    spark: SparkSession,
    files: list[SourceFile],
    fmt: str,
    mapping: dict[str, str],
    explicit: set[str],
    header: str,
    sep: str | None,
) -> DataFrame:
    """Read ``files`` into: user_id, item_id, event_time, event_type, event_id (strings as
    received), properties map<string,string>, _raw (text of unparsable rows), _source_file.

    ``explicit`` names the mapping entries the user gave (``--map``): those must exist in the
    data; conf defaults for optional fields may be absent.
    """
    paths = [f.path for f in files]
    for field in REQUIRED_FIELDS:
        if field not in mapping:
            raise PatternlakeError(
                f"ingest: the mapping has no column for required field {field!r}; add --map {field}=COLUMN"
            )
    if fmt in ("csv", "tsv"):
        df, mapping = _read_delimited(spark, paths, fmt, mapping, header, sep)
    elif fmt == "jsonl":
        df = (
            spark.read.option("primitivesAsString", "true")
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .json(paths)
        )
        df = df.select(
            *[_as_string(df, c).alias(c) for c in df.columns]
        )  # nested values -> JSON text
    elif fmt == "parquet":
        df = _read_parquet(spark, paths)
        df = df.select(*[_as_string(df, c).alias(c) for c in df.columns])
    else:
        raise PatternlakeError(f"ingest: unknown format {fmt!r}")
    if CORRUPT not in df.columns:
        df = df.withColumn(CORRUPT, F.lit(None).cast("string"))
    return _map_columns(
        df, {k: v for k, v in mapping.items() if k in CONTRACT_FIELDS}, explicit, source_file(df)
    )


def _read_parquet(spark: SparkSession, paths: list[str]) -> DataFrame:
    """The files' merged schema is read up front: a file that is not Parquet (its footer
    has no magic number) fails here, as one clear line rather than a Java stack trace."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        return spark.read.option("mergeSchema", "true").parquet(*paths)
    except (Py4JJavaError, PySparkException) as exc:
        text = str(exc)
        hint = next(
            (line.strip() for line in text.splitlines() if "not a Parquet file" in line),
            text.strip().splitlines()[0] if text.strip() else type(exc).__name__,
        )
        raise PatternlakeError(
            f"ingest: cannot read {', '.join(paths)} as Parquet ({hint[:300]}); "
            "pass --format csv|tsv|jsonl for text files"
        ) from None


def _read_delimited(
    spark: SparkSession,
    paths: list[str],
    fmt: str,
    mapping: dict[str, str],
    header: str,
    sep: str | None,
) -> tuple[DataFrame, dict[str, str]]:
    sep = sep or ("\t" if fmt == "tsv" else ",")
    first = _first_line(paths)
    fields = (
        next(csv.reader(io.StringIO(first), delimiter=sep[0]), [])
        if len(sep) == 1
        else first.split(sep)
    )
    fields = [f.strip() for f in fields]
    by_position = all(v.isdigit() for v in mapping.values() if v)
    has_header = header == "true" or (header == "auto" and not by_position)
    if has_header:
        if not fields or not any(fields):
            raise PatternlakeError(f"ingest: {paths[0]} is empty or has an empty header line")
        names = _unique_names(fields)
    else:
        # headerless: columns are c0, c1, ...; a mapping key that is not a contract field
        # names a positional property (rating=2 -> "rating")
        extra = {int(v): k for k, v in mapping.items() if k not in CONTRACT_FIELDS and v.isdigit()}
        names = [extra.get(i, f"c{i}") for i in range(len(fields))]
    schema = StructType(
        [StructField(n, StringType()) for n in names] + [StructField(CORRUPT, StringType())]
    )
    df = (
        spark.read.schema(schema)
        .option("header", str(has_header).lower())
        .option("sep", sep)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("multiLine", "false")
        .option("maxCharsPerColumn", "-1")
        .csv(paths)
    )
    if has_header:
        return df, mapping
    positional = {}
    for k, v in mapping.items():
        if k in CONTRACT_FIELDS:
            if not v.isdigit() or int(v) >= len(names):
                raise PatternlakeError(
                    f"ingest: {k}={v}: a file without a header has columns 0..{len(names) - 1}; map by position"
                )
            positional[k] = names[int(v)]
    return df, positional


def _map_columns(
    df: DataFrame, mapping: dict[str, str], explicit: set[str], source_path: Column
) -> DataFrame:
    columns = [c for c in df.columns if c != CORRUPT]
    lower = {c.lower(): c for c in columns}
    chosen: dict[str, str | None] = {}
    for field in CONTRACT_FIELDS:
        source = mapping.get(field)
        if source is None:
            chosen[field] = None
            continue
        actual = source if source in columns else lower.get(source.lower())
        if actual is None and (field in REQUIRED_FIELDS or field in explicit) and _has_rows(df):
            raise PatternlakeError(
                f"ingest: column {source!r} (mapped to {field}) is not in the input; "
                f"its columns are: {', '.join(columns) or '(none)'}"
            )
        chosen[field] = actual
    used = {c for c in chosen.values() if c}
    prop_cols = [c for c in columns if c not in used]
    if prop_cols:
        # the non-null values only, in column order; array_except drops the nulls with
        # compiled code (map_filter's lambda is interpreted per entry: ~20% of the ingest)
        entry = "struct<key:string,value:string>"
        entries = F.array(
            *[
                F.when(
                    F.col(f"`{c}`").isNotNull(),
                    F.struct(F.lit(c).alias("key"), F.col(f"`{c}`").alias("value")),
                )
                for c in prop_cols
            ]
        )
        props = F.map_from_entries(F.array_except(entries, F.array(F.lit(None).cast(entry)))).cast(
            "map<string,string>"
        )
    else:
        props = F.create_map().cast("map<string,string>")
    out = [
        (F.col(f"`{chosen[f]}`") if chosen[f] else F.lit(None).cast("string")).alias(f)
        for f in CONTRACT_FIELDS
    ]
    return df.select(
        *out,
        props.alias("properties"),
        F.col(CORRUPT).alias("_raw"),
        source_path.alias("_source_file"),
        line_ordinal().alias("_line_ordinal"),
    )


SOURCE_FILE_LOOKUP = 256  # up to this many files, their decoded paths are looked up per row
# (a literal map is searched key by key: beyond a few hundred keys decoding per row is cheaper)


def _decoded_path(uri: Column) -> Column:
    """A file URI as a path: percent-escapes decoded, ``file:`` dropped. ``url_decode`` decodes
    a form (``+`` is a space), so a literal ``+`` in the path is escaped first."""
    return F.regexp_replace(
        F.url_decode(F.replace(uri, F.lit("+"), F.lit("%2B"))), "^file:(//)?", ""
    )


def source_file_lookup(df: DataFrame) -> Column | None:
    """A literal map from each input file's URI, as ``_metadata.file_path`` spells it, to its
    decoded path (``_decoded_path``, run once per file in a one-row job); None for no files or
    more than ``SOURCE_FILE_LOOKUP``."""
    # inputFiles spells a local file file:///p, _metadata.file_path file:/p
    uris = sorted(
        {
            "file:/" + u[len("file:///") :] if u.startswith("file:///") else u
            for u in df.inputFiles()
        }
    )
    if not uris or len(uris) > SOURCE_FILE_LOOKUP:
        return None
    decoded = df.sparkSession.range(1).select(*[_decoded_path(F.lit(u)) for u in uris]).first()
    return F.create_map(
        *[x for u, d in zip(uris, decoded, strict=True) for x in (F.lit(u), F.lit(d))]
    )


def source_file(df: DataFrame) -> Column:
    """Each row's source file as ingest records it: the path URL-decoded, without ``file:``.

    Decoding a URI per row cost about a third of ingest's lineage columns. The files are known
    before the read, so their paths are decoded once and looked up per row
    (``source_file_lookup``); a path the lookup lacks (Spark spelled it another way) is still
    decoded per row, so the value never depends on the lookup.
    """
    raw = F.col("_metadata.file_path")
    lookup = source_file_lookup(df)
    return _decoded_path(raw) if lookup is None else F.coalesce(lookup[raw], _decoded_path(raw))


def line_ordinal() -> Column:
    """A number that grows with a row's position inside its source file.

    Spark reads a file in splits (``_metadata.file_block_start`` is the split's byte offset)
    and every split is read front to back, so (split offset, row number inside the Spark
    partition) orders the rows of one file as they are written. Packed into one long: the
    offset in the high bits (files up to 512 GiB), the row number in the low 24 bits (a split
    holds far fewer rows than bytes). Ties in event time are ordered by it downstream.
    """
    row_in_partition = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))
    return (F.col("_metadata.file_block_start").cast("long") * F.lit(1 << 24)) + row_in_partition


def _has_rows(df: DataFrame) -> bool:
    """A file with no rows (blank lines only) names no columns; that is not an error."""
    return bool(df.limit(1).count())


def _as_string(df: DataFrame, column: str) -> Column:
    dtype = df.schema[column].dataType.simpleString()
    c = F.col(f"`{column}`")
    if dtype.startswith("timestamp"):
        return F.date_format(c, "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
    if dtype == "string":
        return c
    if dtype.startswith(("struct", "array", "map")):
        return F.to_json(c)
    return c.cast("string")


def _first_line(paths: list[str]) -> str:
    """The first line of the first non-empty file, decoded leniently."""
    for path in paths:
        fs, p = _fs(path)
        with fs.open_input_stream(p) as f:
            head = f.read(1 << 20)
        if head.strip():
            text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
            return text.splitlines()[0] if text.splitlines() else ""
    return ""


def _unique_names(fields: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(fields):
        name = name or f"c{i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(path if "://" in path else str(PurePosixPath(path)))
    except (ValueError, OSError) as exc:
        raise PatternlakeError(f"ingest: cannot open {path}: {exc}") from None


def _with_scheme(original: str, found: str) -> str:
    if "://" in original:
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{found}"
    return found
