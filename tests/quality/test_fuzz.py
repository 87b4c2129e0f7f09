"""A generative test of the data stages: random batches through ingest + validate.

Every batch (csv, tsv, jsonl or parquet, with a random column mapping as ``--map`` gives it)
mixes valid rows, exact duplicates, missing and null keys, wrong types, unparsable and
out-of-range times, overlong and non-UTF-8 ids, nested values and truncated lines. Each row
carries a tag (a property column) so its fate can be checked:

* ``bronze = silver + quarantine + duplicates`` (the tables and validate's report agree);
* a row built valid reaches silver once (its exact copies are counted as duplicates);
* a row built invalid is quarantined with at least one reason, never in silver;
* nothing crashes: an input that is not a table at all may raise a ``PatternlakeError``,
  nothing else.

A fixed seed and a few batches in CI; a longer run (docs/data-path.md):

    PATTERNLAKE_FUZZ_EXAMPLES=500 PATTERNLAKE_FUZZ_SEED=7 \\
        .venv/bin/python -m pytest tests/quality/test_fuzz.py
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from patternlake.errors import PatternlakeError
from patternlake.ingest.ingest import ingest, parse_mapping
from patternlake.quality.validate import validate_pending
from tests.conftest import with_overrides
from tests.quality.test_validate import check_invariant

EXAMPLES = int(os.environ.get("PATTERNLAKE_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("PATTERNLAKE_FUZZ_SEED", "32"))
FORMATS = ("csv", "tsv", "jsonl", "parquet")
FIELDS = ("user_id", "item_id", "event_time", "event_type", "event_id")
NAMES = {  # candidate source column names per contract field
    "user_id": ["user_id", "uid", "User", "customer id", "cust.id", "usuário"],
    "item_id": ["item_id", "sku", "Item", "product-id", "art.nr"],
    "event_time": ["event_time", "ts", "Time Stamp", "when.utc"],
    "event_type": ["event_type", "kind", "Action"],
    "event_id": ["event_id", "eid", "Event ID"],
}
TAG = "fz_tag"
GOOD_TIMES = [
    lambda r: (
        f"202{r.randint(0, 5)}-0{r.randint(1, 9)}-1{r.randint(0, 9)}T0{r.randint(0, 9)}:00:00Z"
    ),
    lambda r: f"2024-05-0{r.randint(1, 9)}T12:30:00+02:00",
    lambda r: str(r.randint(1_600_000_000, 1_750_000_000)),  # epoch seconds
    lambda r: str(r.randint(1_600_000_000_000, 1_750_000_000_000)),  # epoch millis
    lambda r: "2023-07-04 08:15:00",
]
BAD_TIMES = ["yesterday", "2024-13-45T99:00:00Z", "1970-01-02T00:00:00Z", "2999-01-01T00:00:00Z",
             "12", "not a time at all", "--"]  # fmt: skip


@dataclass
class Batch:
    fmt: str
    names: dict[str, str]  # contract field -> source column
    rows: list[dict] = field(default_factory=list)  # field -> value (absent: no key)
    valid: dict[str, int] = field(default_factory=dict)  # tag -> copies written
    invalid: set[str] = field(default_factory=set)  # tags of rows built invalid
    unparsable: set[str] = field(default_factory=set)  # tags of lines cut or not UTF-8
    not_a_table: bool = False


def _row(rng: random.Random, tag: str, batch: Batch) -> tuple[dict, bool]:
    """One row (as contract field -> value) and whether it is built valid."""
    row: dict = {
        "user_id": f"u{rng.randint(1, 50)}",
        "item_id": f"i{rng.randint(1, 80)}",
        "event_time": rng.choice(GOOD_TIMES)(rng),
        "event_type": rng.choice(["view", "click", "cart", "buy", "VIEW", " rate "]),
        "event_id": f"{tag}-id",
        TAG: tag,
    }
    if rng.random() < 0.15:
        del row["event_id"]  # a stable hash of the row stands in
    if rng.random() < 0.2:
        row["p_extra"] = rng.choice(["9.5", "a,b", "", "x" * 300, "ü"])
    if batch.fmt == "jsonl" and rng.random() < 0.3:
        row["p_nested"] = {"page": "home", "n": [1, 2, {"k": None}]}  # nested: a property
    if batch.fmt in ("jsonl", "parquet") and rng.random() < 0.2:
        row["user_id"] = rng.randint(1, 99)  # a number where text is usual: still an id
    if batch.fmt in ("jsonl", "parquet") and rng.random() < 0.1:
        row["event_time"] = rng.randint(1_600_000_000, 1_750_000_000)
    if rng.random() < 0.55:
        return row, True
    breaks = rng.choice(
        ["missing", "null", "bad_time", "overlong", "bad_chars", "bad_type_value", "wrong_type"]
    )
    key = rng.choice(["user_id", "item_id", "event_time"])
    if breaks == "missing":
        row.pop(key)
    elif breaks == "null" or (breaks == "wrong_type" and batch.fmt not in ("jsonl",)):
        row[key] = None if batch.fmt in ("jsonl", "parquet") else ""
    elif breaks == "bad_time":
        row["event_time"] = rng.choice(BAD_TIMES)
    elif breaks == "overlong":
        row[rng.choice(["user_id", "item_id"])] = "x" * rng.choice([129, 500, 5000])
    elif breaks == "bad_chars":
        row[rng.choice(["user_id", "item_id"])] = rng.choice(["u 7", "i\u00e9", "a|b", "\u2603"])
    elif breaks == "bad_type_value":
        row["event_type"] = rng.choice(["hover", "purchase", "?"])
    else:  # jsonl: a value of the wrong JSON type (``true`` would pass as an id)
        row[key] = rng.choice([{"at": 5}, [1, 2, None], True] if key == "event_time" else [[1, 2]])
    return row, False


def _batch(rng: random.Random, n: int) -> Batch:
    fmt = rng.choice(FORMATS)
    names = {f: rng.choice(NAMES[f]) for f in FIELDS}
    batch = Batch(fmt, names)
    if n % 6 == 5 or rng.random() < 0.05:
        batch.not_a_table = True
        return batch
    for k in range(rng.randint(5, 60)):
        tag = f"b{n}r{k}"
        if batch.rows and rng.random() < 0.12:  # an exact copy of an earlier valid row
            copies = [r for r in batch.rows if r[TAG] in batch.valid]
            if copies:
                copy = rng.choice(copies)
                batch.rows.append(copy)
                batch.valid[copy[TAG]] += 1
                continue
        row, ok = _row(rng, tag, batch)
        if k == 0:  # the first row names every column (a mapped column must exist)
            row, ok = {f: f"{f[0]}1" for f in ("user_id", "item_id")}, True
            row.update(event_time="2024-01-01T00:00:00Z", event_type="view")
            row.update({"event_id": f"{tag}-id", TAG: tag, "p_extra": "1"})
        batch.rows.append(row)
        if ok:
            batch.valid[tag] = 1
        else:
            batch.invalid.add(tag)
    return batch


def _source(name: str, names: dict[str, str]) -> str:
    return names.get(name, name)


def _write(batch: Batch, rng: random.Random, path) -> None:
    if batch.not_a_table:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
        return
    columns = [*FIELDS, TAG, "p_extra", "p_nested"]
    present = [c for c in columns if any(c in r for r in batch.rows)]
    if batch.fmt == "parquet":
        table = {
            _source(c, batch.names): [
                None if r.get(c) is None else str(r[c]) if c != "user_id" else r[c]
                for r in batch.rows
            ]
            for c in present
        }
        # a user column of mixed numbers and text is stored as text
        users = table.get(batch.names["user_id"])
        if users is not None and not all(isinstance(u, int) or u is None for u in users):
            table[batch.names["user_id"]] = [None if u is None else str(u) for u in users]
        pq.write_table(pa.table(table), path)
        return
    lines: list[bytes] = []
    if batch.fmt == "jsonl":
        for r in batch.rows:
            lines.append(json.dumps({_source(k, batch.names): v for k, v in r.items()}).encode())
    else:
        sep = "," if batch.fmt == "csv" else "\t"
        header = [_source(c, batch.names) for c in present]
        lines.append(sep.join(header).encode())
        for r in batch.rows:
            out = io.StringIO()
            csv.writer(out, delimiter=sep, lineterminator="").writerow(
                ["" if r.get(c) is None else r[c] for c in present]
            )
            lines.append(out.getvalue().encode())
    first = 0 if batch.fmt == "jsonl" else 1
    for i in range(first, len(lines)):
        tag = batch.rows[i - first][TAG]
        if tag in batch.valid and batch.valid[tag] > 1:
            continue  # keep exact copies exact
        if rng.random() < 0.06 and batch.fmt == "jsonl":  # a truncated line: not JSON
            cut = lines[i].index(tag.encode()) + len(tag) + 1
            lines[i] = lines[i][:cut]
            batch.valid.pop(tag, None)
            batch.invalid.discard(tag)
            batch.unparsable.add(tag)
        elif rng.random() < 0.05:  # a user id that is not UTF-8
            old = str(batch.rows[i - first].get("user_id") or "u")
            if lines[i].count(old.encode()) == 1 and old and old != tag:
                lines[i] = lines[i].replace(old.encode(), old.encode() + b"\xff\xfe")
                batch.valid.pop(tag, None)
                if batch.fmt == "jsonl":
                    batch.invalid.discard(tag)
                    batch.unparsable.add(tag)
                else:
                    batch.invalid.add(tag)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_random_batches_lose_no_row_and_quarantine_every_invalid_one(spark, stage, tmp_path):
    config, lake = stage
    config = with_overrides(config, validate={"max_invalid_share": 1.0})
    rng = random.Random(SEED)
    checked = 0
    for n in range(EXAMPLES):
        batch = _batch(rng, n)
        ext = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "parquet": "parquet"}[batch.fmt]
        path = tmp_path / f"batch{n}.{ext}"
        _write(batch, rng, path)
        mapping = parse_mapping(",".join(f"{f}={c}" for f, c in batch.names.items()))
        where = f"batch {n} ({batch.fmt}, seed {SEED}, {path})"
        try:
            result = ingest(spark, lake, config, str(path), batch.fmt, mapping)
            reports = validate_pending(spark, lake, config)
        except PatternlakeError:
            assert batch.not_a_table, where
            continue
        if result.batch_id is None:  # an empty file
            assert batch.not_a_table, where
            continue
        assert [r.batch_id for r in reports] == [result.batch_id], where
        report = check_invariant(lake, result.batch_id)
        if batch.not_a_table:
            continue
        _check_rows(lake, batch, result.batch_id, report, where)
        checked += 1
    assert checked >= EXAMPLES // 2


def _check_rows(lake, batch: Batch, batch_id: str, report, where: str) -> None:
    this = F.col("_batch_id") == batch_id
    tag = F.col("properties")[TAG]
    bronze = lake.read("bronze_events").where(this).count()
    assert bronze == len(batch.rows), where  # every line is a row, none lost
    silver = [r[0] for r in lake.read("silver_events").where(this).select(tag).collect()]
    quarantine = (
        lake.read("quarantine_events").where(this).select(tag.alias("tag"), "reasons", "_raw")
    )
    quarantined = quarantine.collect()
    assert all(r.reasons for r in quarantined), where
    in_quarantine = {r.tag for r in quarantined if r.tag}
    odd = set(silver) ^ set(batch.valid)
    rows = {r[TAG]: r for r in batch.rows}
    reasons = {r.tag: list(r.reasons) for r in quarantined}
    assert sorted(silver) == sorted(batch.valid), (
        where,
        [
            (t, t in batch.valid, reasons.get(t), {k: str(v)[:40] for k, v in rows[t].items()})
            for t in sorted(odd)
        ],
    )
    assert report.duplicate_rows == sum(batch.valid.values()) - len(batch.valid), where
    assert batch.invalid <= in_quarantine, (where, sorted(batch.invalid - in_quarantine))
    for t in batch.unparsable:
        assert any(
            r._raw and f'"{t}' in r._raw and "unparsable_row" in r.reasons for r in quarantined
        ), (where, t)
    assert len(quarantined) == len(batch.invalid) + len(batch.unparsable), where


def test_input_that_is_not_a_table_is_a_clear_error_or_rows(spark, stage, tmp_path):
    """Random bytes in each format: a PatternlakeError, or rows that keep the invariant."""
    config, lake = stage
    config = with_overrides(config, validate={"max_invalid_share": 1.0})
    rng = random.Random(SEED)
    for fmt in FORMATS:
        path = tmp_path / f"garbage.{fmt}"
        path.write_bytes(b"\x00PAR1" + bytes(rng.randrange(256) for _ in range(300)))
        mapping = parse_mapping("user_id=user_id,item_id=item_id,event_time=event_time")
        try:
            result = ingest(spark, lake, config, str(path), fmt, mapping)
        except PatternlakeError as exc:
            assert str(exc).startswith("ingest: "), exc
            continue
        if result.batch_id is not None:
            validate_pending(spark, lake, config)
            check_invariant(lake, result.batch_id)
