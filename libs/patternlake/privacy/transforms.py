"""Pure parts of forgetting a user: which rows are theirs, scrubbing recorded samples, hashing.

A row belongs to a user when one of ``user_columns`` equals (after trimming) one of the ids,
or, for rows whose user columns are all null or blank (unparsable input), when one of
``raw_columns`` holds an id as a token: delimited by anything but a letter, a digit, ``_`` or
``-`` (``u12`` is not a token of ``u123`` nor of ``u12-b``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from typing import Any

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructType

# characters that continue a token around an id
_WORD = "A-Za-z0-9_\\-"


def clean_ids(ids: Iterable[str]) -> list[str]:
    """Distinct ids, trimmed, in the order given; empty ones are a user error."""
    out: list[str] = []
    for raw in ids:
        u = str(raw).strip()
        if not u:
            raise ValueError("forget-user: an empty user id matches nothing; give real ids")
        if u not in out:
            out.append(u)
    if not out:
        raise ValueError("forget-user: give at least one user id")
    return out


def token_regex(ids: list[str]) -> str:
    """A regex (Java and Python) that finds any of ``ids`` as a token."""
    alternatives = "|".join(re.escape(u) for u in sorted(ids, key=len, reverse=True))
    return f"(?<![{_WORD}])(?:{alternatives})(?![{_WORD}])"


def user_rows(
    schema: StructType, ids: list[str], user_columns: list[str], raw_columns: list[str]
) -> Column | None:
    """The Column that is true on the users' rows of a table with ``schema``, or None when
    the table has no user column (nothing of a user can be in it by row)."""
    names = {f.name.lower(): f for f in schema.fields}
    users = [names[c.lower()] for c in user_columns if c.lower() in names]
    if not users:
        return None
    strings = [f for f in users if isinstance(f.dataType, StringType)]
    cond = F.lit(False)
    for f in strings:
        cond = cond | F.trim(F.col(f"`{f.name}`")).isin(ids)
    raws = [names[c.lower()] for c in raw_columns if c.lower() in names]
    if raws:
        blank = F.lit(True)
        for f in strings:
            blank = blank & (F.col(f"`{f.name}`").isNull() | (F.trim(F.col(f"`{f.name}`")) == ""))
        pattern = token_regex(ids)
        mention = F.lit(False)
        for f in raws:
            mention = mention | F.coalesce(F.col(f"`{f.name}`").rlike(pattern), F.lit(False))
        cond = cond | (blank & mention)
    return F.coalesce(cond, F.lit(False))


def scrub_samples(doc: Any, pattern: re.Pattern[str], columns: set[str]) -> tuple[Any, int]:
    """Drop, from a recorded Great Expectations result (parsed JSON), every sampled value
    that mentions an id (``partial_unexpected_list``, ``partial_unexpected_counts``,
    ``partial_unexpected_index_list``, ...) in the results of expectations on ``columns``.
    Returns the scrubbed document and how many values were dropped."""
    dropped = 0

    def scrub(value: Any) -> Any:
        nonlocal dropped
        if isinstance(value, list):
            kept = []
            for v in value:
                if pattern.search(json.dumps(v, default=str)):
                    dropped += 1
                else:
                    kept.append(scrub(v))
            return kept
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return value

    if isinstance(doc, dict):
        for res in doc.get("results") or []:
            kwargs = (res.get("expectation_config") or {}).get("kwargs") or {}
            if str(kwargs.get("column", "")).lower() in columns and "result" in res:
                res["result"] = scrub(res["result"])
    return doc, dropped


def scrub_json_text(text: str | None, ids: list[str], columns: list[str]) -> str | None:
    """``scrub_samples`` on a JSON string column value; other text is returned unchanged."""
    if text is None:
        return None
    pattern = re.compile(token_regex(ids))
    if not pattern.search(text):
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        return pattern.sub("[forgotten]", text)
    doc, _ = scrub_samples(doc, pattern, {c.lower() for c in columns})
    out = json.dumps(doc, default=str)
    # whatever still names an id (a sample of another column, a message) is redacted
    return pattern.sub("[forgotten]", out)


def salted_hash(user_id: str, salt: bytes) -> str:
    """HMAC-SHA256 of the id under the lake's secret salt: the same id always gives the same
    hash (a repeated request can be recognised), the hash alone does not give the id back."""
    return hmac.new(salt, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
