"""Writes the bad-input corpus in bad_input/ (committed; rerun after editing this file).

    python tests/data/make_bad_input.py

Each row's expected quarantine reasons (by event_id) are in bad_input/expected.json; rows
listed with [] must reach silver (or be counted as duplicates).
"""

import json
from pathlib import Path

HERE = Path(__file__).parent / "bad_input"
T = "2026-03-01T10:00:00Z"


def line(d: dict) -> bytes:
    return json.dumps(d).encode()


def ev(**kw) -> dict:
    base = {"user_id": "u1", "item_id": "i1", "event_type": "view", "event_time": T}
    base.update(kw)
    return base


rows: list[bytes] = []
expected: dict[str, list[str]] = {}


def add(reasons: list[str], raw: bytes | None = None, **kw) -> None:
    rows.append(raw if raw is not None else line(ev(**kw)))
    if "event_id" in kw:
        expected[kw["event_id"]] = reasons


add([], event_id="ok-iso-z")
add(
    [],
    event_id="ok-iso-offset",
    event_time="2026-03-01T12:00:00+02:00",
    item_id="i2",
    event_type="cart",
)
add([], event_id="ok-epoch-s", event_time=1772359200, user_id="u2", event_type="buy")
add(
    [],
    event_id="ok-epoch-ms",
    event_time="1772359200123",
    user_id="u2",
    item_id="i3",
    event_type="VIEW",
)
add(
    [],
    event_id="ok-space-iso",
    event_time="2026-03-01 08:00:00",
    user_id="u3",
    item_id="i4",
    event_type=None,
)
add([], event_id="ok-numeric-ids", user_id=123, item_id=456)
add([], event_id="ok-extra-props", price=9.5, tags=["a", "b"], ctx={"page": "home"})
# duplicates: same event_id again (exact copy, and a different payload) -> counted, not quarantined
add([], event_id="ok-iso-z")
add([], event_id="ok-iso-z", user_id="u9")
add(["missing_user_id"], event_id="bad-no-user", user_id=None)
add(["missing_item_id"], event_id="bad-null-item", item_id=None)
add(["bad_event_time"], event_id="bad-time-text", event_time="yesterday")
add(["bad_event_time"], event_id="bad-time-object", event_time={"at": 5})
add(["event_time_in_future"], event_id="bad-future", event_time="2999-01-01T00:00:00Z")
add(["event_time_too_old"], event_id="bad-old", event_time="1970-01-02T00:00:00Z")
add(["unknown_event_type"], event_id="bad-type", event_type="hover")
add(["missing_event_time"], event_id="bad-no-time", event_time=None)
add(["bad_user_id_length"], event_id="bad-huge", user_id="x" * (1 << 20))
add(["bad_user_id_chars"], event_id="bad-space", user_id="u 7")
add(
    ["missing_user_id", "unknown_event_type", "bad_event_time"],
    event_id="bad-multi",
    user_id=None,
    event_type="hover",
    event_time="nope",
)
add(["bad_event_id_length"], event_id="e" * 200)
# not JSON at all, and JSON cut off: the raw line is kept, every field is missing
rows.append(
    b'{"user_id": "u4", "item_id": "i5", "event_type": "view", "event_time": "2026-03-01T10:00:00Z"'
)
rows.append(b"this is not json")
# invalid UTF-8 inside an id: JSON must be UTF-8, so the whole line is unparsable
rows.append(
    b'{"user_id": "u6", "item_id": "i\xff\xfe9", "event_type": "view", "event_time": "2026-03-01T10:00:00Z", "event_id": "bad-bytes"}'
)
UNPARSABLE = ["unparsable_row", "missing_user_id", "missing_item_id", "missing_event_time"]
by_raw = {
    '{"user_id": "u4", "item_id": "i5"': UNPARSABLE,
    "this is not json": UNPARSABLE,
    '{"user_id": "u6", "item_id": "i': UNPARSABLE,
}
(HERE / "jsonl" / "events.jsonl").write_bytes(b"\n".join(rows) + b"\n")

csv_rows = [
    b"user_id,item_id,event_type,event_time,event_id,price",
    b"u1,i1,view,1772359200000,c-ok,5.0",
    b"u2,,view,1772359200000,c-no-item,5",
    b"u3,i2,view,not-a-time,c-bad-time,5",
    b'u4,"i,3",cart,1772359200,c-quoted-comma,7',
    b"u5,i4,hover,1772359200,c-bad-type,1",
    b",,,,,",
]
(HERE / "csv" / "events.csv").write_bytes(b"\n".join(csv_rows) + b"\n")
(HERE / "csv" / "header_only.csv").write_bytes(
    b"user_id,item_id,event_type,event_time,event_id,price\n"
)
(HERE / "csv" / "empty.csv").write_bytes(b"")
(HERE / "empty" / "empty.jsonl").write_bytes(b"")
expected.update(
    {
        "c-ok": [],
        "c-no-item": ["missing_item_id"],
        "c-bad-time": ["bad_event_time"],
        "c-quoted-comma": ["bad_item_id_chars"],
        "c-bad-type": ["unknown_event_type"],
    }
)
(HERE / "expected.json").write_text(
    json.dumps({"by_event_id": expected, "by_raw_prefix": by_raw}, indent=1) + "\n"
)
print(f"wrote {len(rows)} jsonl rows, {len(csv_rows) - 1} csv rows, {len(expected)} expectations")
