"""From a pinned Delta version of ``user_sequences`` to torch tensors.

The lake layer gives the Parquet files of one table version; every worker reads only its
shard, as Arrow record batches, straight from those files:

* the rows are cut into pieces (file, row group, offset, length) from the footers alone;
* each epoch the pieces are shuffled with ``seed + epoch`` (the same order on every rank)
  and dealt round-robin to the ranks, then rows are shuffled inside a bounded buffer;
* every rank stops after the same number of batches (the smallest shard's), so collective
  operations never wait for a rank that has run out of data.

Nothing is materialised on one node except a bounded buffer per worker.

Per user the protocol splits the (time-ordered) sequence: the last item is the test target,
the one before it the validation target, the rest is training data. Sequences are
left-padded with 0 to ``max_len``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

COLUMNS = ["user_id", "item_seq", "type_seq", "gap_seq", "valid_item", "test_item"]


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    offset: int
    length: int


@dataclass
class Batch:
    items: torch.Tensor  # (B, L) inputs, left-padded
    types: torch.Tensor
    gaps: torch.Tensor
    targets: torch.Tensor  # (B, L) next items (training) or (B,) one target (evaluation)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.items, self.types, self.gaps, self.targets)
            )
        )


def pad_left(
    column: pa.ListArray | pa.ChunkedArray, max_len: int, drop_last: np.ndarray | int = 0
) -> np.ndarray:
    """Lists -> (n, max_len) int64, keeping the last ``max_len`` values of each list after
    dropping its last ``drop_last`` values; padding (0) on the left."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = offsets[1:] - np.asarray(drop_last)
    starts = np.maximum(offsets[:-1], ends - max_len)
    lengths = np.maximum(ends - starts, 0)
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    cols = np.arange(max_len)
    first = max_len - lengths  # first filled column of each row
    idx = starts[:, None] + (cols[None, :] - first[:, None])
    keep = cols[None, :] >= first[:, None]
    out[keep] = values[idx[keep]]
    return out


def training_arrays(table: pa.Table, max_len: int) -> tuple[np.ndarray, ...]:
    """Inputs and next-item targets from each user's training part (validation and test
    targets dropped for evaluable users). Rows with fewer than 2 training events vanish."""
    evaluable = table.column("valid_item").is_valid().to_numpy(zero_copy_only=False)
    drop = np.where(evaluable, 2, 0)
    # inputs: training part without its last event; targets: training part without its first
    items_in = pad_left(table.column("item_seq"), max_len, drop + 1)
    types_in = pad_left(table.column("type_seq"), max_len, drop + 1)
    gaps_in = pad_left(table.column("gap_seq"), max_len, drop + 1)
    targets = pad_left(table.column("item_seq"), max_len + 1, drop)[:, 1:]
    targets = np.where(items_in > 0, targets, 0)
    keep = (targets > 0).any(axis=1)
    return items_in[keep], types_in[keep], gaps_in[keep], targets[keep]


def evaluation_arrays(table: pa.Table, max_len: int, split: str) -> tuple[np.ndarray, ...]:
    """(user_ids, items, types, gaps, target) for evaluable users: ``valid`` predicts the
    validation target from the training part, ``test`` the test target from everything
    before it."""
    evaluable = table.column("valid_item").is_valid()
    t = table.filter(evaluable)
    drop = 2 if split == "valid" else 1
    target = t.column("valid_item" if split == "valid" else "test_item").to_numpy(
        zero_copy_only=False
    )
    return (
        np.asarray(t.column("user_id").to_pylist(), dtype=object),
        pad_left(t.column("item_seq"), max_len, drop),
        pad_left(t.column("type_seq"), max_len, drop),
        pad_left(t.column("gap_seq"), max_len, drop),
        target.astype(np.int64),
    )


def item_id_count(lake: Any) -> int:
    """Item ids the models score: the largest ``item_index.item_idx`` plus padding id 0."""
    from pyspark.sql import functions as F

    return (lake.read("item_index").agg(F.max("item_idx")).first()[0] or 0) + 1


def read_table(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """A whole (small) table version, e.g. for evaluation on one node."""
    tables = [pq.read_table(f, columns=columns or COLUMNS) for f in files]
    if not tables:
        raise ValueError("no files")
    return pa.concat_tables(tables, promote_options="default")


def plan_pieces(files: list[str], chunk_rows: int = 1024) -> list[Piece]:
    pieces = []
    for path in sorted(files):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for off in range(0, n, chunk_rows):
                pieces.append(Piece(path, rg, off, min(chunk_rows, n - off)))
    return pieces


class ShardedSequences:
    """Per-rank iterator of training batches over a pinned table version."""

    def __init__(
        self,
        files: list[str],
        rank: int,
        world: int,
        max_len: int,
        batch_size: int,
        seed: int,
        chunk_rows: int = 1024,
        buffer_rows: int = 8192,
    ):
        self.pieces = plan_pieces(files, chunk_rows)
        if not self.pieces:
            raise ValueError("user_sequences has no rows")
        self.rank, self.world = rank, world
        self.max_len, self.batch_size, self.seed = max_len, batch_size, seed
        self.buffer_rows = max(buffer_rows, batch_size)

    def _deal(self, epoch: int) -> list[list[Piece]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.pieces))
        return [[self.pieces[i] for i in order[r :: self.world]] for r in range(self.world)]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """The same for every rank: the smallest shard's row count decides (rows, not
        training examples: a lower bound, the loop also stops early if a shard runs dry)."""
        rows = min(sum(p.length for p in shard) for shard in self._deal(epoch))
        return max(1, rows // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        mine = self._deal(epoch)[self.rank]
        rng = np.random.default_rng((self.seed + epoch) * 1009 + self.rank)
        limit = self.batches_per_epoch(epoch)
        produced = 0
        buffer: list[tuple[np.ndarray, ...]] = []
        buffered = 0
        for piece in self._read(mine):
            arrays = training_arrays(piece, self.max_len)
            buffer.append(arrays)
            buffered += len(arrays[0])
            if buffered < self.buffer_rows:
                continue
            for batch in self._flush(buffer, rng, keep_tail=True):
                yield batch
                produced += 1
                if produced >= limit:
                    return
            buffered = sum(len(a[0]) for a in buffer)
        for batch in self._flush(buffer, rng, keep_tail=False):
            yield batch
            produced += 1
            if produced >= limit:
                return

    def _flush(self, buffer: list, rng: np.random.Generator, keep_tail: bool) -> Iterator[Batch]:
        if not buffer:
            return
        cat = [np.concatenate(parts) for parts in zip(*buffer, strict=True)]
        buffer.clear()
        perm = rng.permutation(len(cat[0]))
        cat = [a[perm] for a in cat]
        n_full = len(perm) // self.batch_size
        for b in range(n_full):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield Batch(*(torch.from_numpy(a[s]) for a in cat))
        tail = n_full * self.batch_size
        if tail < len(perm):
            if keep_tail:
                buffer.append(tuple(a[tail:] for a in cat))
            else:
                yield Batch(*(torch.from_numpy(a[tail:]) for a in cat))

    def _read(self, pieces: list[Piece]) -> Iterator[pa.Table]:
        cached: tuple[str, int] | None = None
        group: pa.Table | None = None
        for p in pieces:
            if cached != (p.path, p.row_group):
                group = pq.ParquetFile(p.path).read_row_group(p.row_group, columns=COLUMNS[1:])
                cached = (p.path, p.row_group)
            yield group.slice(p.offset, p.length)
