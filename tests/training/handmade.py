"""Hand-made ``user_sequences`` files and frames (the featurize output's columns), so that
training and evaluation tests control exactly how many rows, pieces and training pairs
each file holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("n_events", pa.int32()),
        ("item_seq", pa.list_(pa.int32())),
        ("type_seq", pa.list_(pa.int32())),
        ("gap_seq", pa.list_(pa.int32())),
        ("time_seq", pa.list_(pa.int64())),
        ("valid_item", pa.int32()),
        ("test_item", pa.int32()),
    ]
)


def user_id_item(u: int, j: int) -> int:
    """Items that name their user (for tracing examples): user u's j-th event is item
    1000 u + j + 1."""
    return 1000 * u + j + 1


def sequences(
    users: list[int], length: Callable[[int], int], item: Callable[[int, int], int]
) -> pa.Table:
    """One row per user, ``length(u)`` events of items ``item(u, j)``; users with >= 3 events
    get the protocol's validation and test targets (their last two items)."""
    rows = []
    for u in users:
        n = length(u)
        items = [item(u, j) for j in range(n)]
        rows.append(
            {
                "user_id": f"u{u:05d}",
                "n_events": n,
                "item_seq": items,
                "type_seq": [1 + j % 2 for j in range(n)],
                "gap_seq": [0] + [1 + j % 7 for j in range(1, n)],
                "time_seq": [1_700_000_000 + 60 * j for j in range(n)],
                "valid_item": items[-2] if n >= 3 else None,
                "test_item": items[-1] if n >= 3 else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write(table: pa.Table, path: Path, row_group_size: int | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def trainable_users(table: pa.Table) -> set[int]:
    """Users whose training part (events before the validation target) has >= 2 events."""
    out = set()
    for uid, n in zip(table["user_id"].to_pylist(), table["n_events"].to_pylist(), strict=True):
        if (n - 2 if n >= 3 else n) >= 2:
            out.add(int(uid[1:]))
    return out


def layouts(root: Path, item: Callable[[int, int], int] = user_id_item) -> dict[str, list[str]]:
    """Files that used to give two ranks different numbers of batches.

    * ``one_file``: 300 users in one file, one row group, fewer pieces than workers (what
      ``lake compact`` leaves behind);
    * ``uneven``: a large file, a small one, and a file whose users (3 events each) give no
      training pair at all.
    """

    def varied(u: int) -> int:
        return 1 + (u * 7) % 12

    one = sequences(list(range(300)), varied, item)
    big = sequences(list(range(0, 400)), varied, item)
    small = sequences(list(range(400, 420)), lambda u: 9, item)
    none = sequences(list(range(420, 520)), lambda u: 3, item)
    return {
        "one_file": [write(one, root / "one" / "part-0.parquet")],
        "uneven": [
            write(big, root / "uneven" / "part-0.parquet", row_group_size=100),
            write(small, root / "uneven" / "part-1.parquet"),
            write(none, root / "uneven" / "part-2.parquet"),
        ],
    }
