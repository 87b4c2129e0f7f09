"""From a pinned Delta version of ``user_sequences`` to torch tensors.

The lake layer gives the Parquet files of one table version; every worker reads only its
shard, as Arrow record batches, straight from those files:

* the rows are cut into pieces (file, row group, offset, length) from the footers, and the
  training examples of each piece are counted once per training run, by one process (from
  two columns: ``item_seq``'s list lengths and ``valid_item``'s validity;
  ``example_counts``), and handed to every rank (``ExampleCounts``), so every rank knows
  every piece's size without reading the table to plan;
* each epoch the pieces are shuffled with ``seed + epoch`` (the same order on every rank),
  which lines all N examples up in one stream; rank r takes the ``ceil(N / world)``
  examples from position ``r * ceil(N / world)`` on, wrapping around to the start of the
  stream for the last rank(s). Every rank so gets exactly the same number of examples and
  runs exactly the same number of steps (no collective ever waits for a rank that ran
  dry), and every example is trained every epoch (a handful, at most ``world - 1``, twice);
  this holds for one file of a single piece as for many files of uneven sizes;
* rows are shuffled inside a bounded buffer.

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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from patternlake.errors import PatternlakeError

COLUMNS = ["user_id", "item_seq", "type_seq", "gap_seq", "valid_item", "test_item"]
# a distillation table (``students.topk``): the sequences plus, per user, the teacher's K best
# items and their logits at every training target, targets in order, K values each
SOFT_COLUMNS = ["topk_items", "topk_logits"]


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
    # distillation: the teacher's K best items (B, L, K) and their logits (-inf: none) at
    # every target position (``soft_arrays``); None when training on the targets alone
    soft_items: torch.Tensor | None = None
    soft_logits: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                None if t is None else t.to(device, non_blocking=True)
                for t in (
                    self.items,
                    self.types,
                    self.gaps,
                    self.targets,
                    self.soft_items,
                    self.soft_logits,
                )
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


def training_lengths(table: pa.Table) -> np.ndarray:
    """Events in each row's training part: the whole sequence, less the validation and test
    targets of evaluable users (those with a ``valid_item``)."""
    lengths = pc.list_value_length(table.column("item_seq")).fill_null(0)
    evaluable = table.column("valid_item").is_valid().to_numpy(zero_copy_only=False)
    return np.maximum(lengths.to_numpy(zero_copy_only=False) - np.where(evaluable, 2, 0), 0)


def training_example_counts(table: pa.Table, max_len: int, stride: int | None = None) -> np.ndarray:
    """How many training examples (rows of ``training_arrays``) each user row gives: a
    training part of T events has T - 1 targets (every event but the first), cut into
    ``ceil((T - 1) / stride)`` windows (``stride`` targets each, ``max_len`` by default);
    rows with fewer than 2 training events give none. The sharding plan counts with this,
    so it must agree with ``training_arrays``."""
    step = window_stride(max_len, stride)
    targets = np.maximum(training_lengths(table) - 1, 0)
    return -(-targets // step)


def training_item_counts(files: list[str], n_items: int) -> np.ndarray:
    """(n_items,) how often each item occurs in the users' training parts (validation and
    test targets left out): the popularity a sampled softmax draws negatives from. Reads
    the ``item_seq`` and ``valid_item`` columns only, once, on one process."""
    counts = np.zeros(n_items, dtype=np.int64)
    for f in files:  # a file's row groups at a time: memory bounded by the largest one
        source = pq.ParquetFile(f)
        for g in range(source.num_row_groups):
            table = source.read_row_group(g, columns=["item_seq", "valid_item"])
            keep_n = training_lengths(table)
            column = table.column("item_seq").combine_chunks()
            lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            row_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
            position = np.arange(len(values)) - row_start
            kept = values[position < np.repeat(keep_n, lengths)]
            counts += np.bincount(kept[kept < n_items], minlength=n_items)
    counts[0] = 0
    return counts


def window_stride(max_len: int, stride: int | None) -> int:
    """Targets per training window: ``stride`` when set (1 <= stride <= max_len), else
    ``max_len`` (windows side by side, no shared context)."""
    if stride is None or stride <= 0:
        return max_len
    if stride > max_len:
        raise ValueError(f"window stride {stride} exceeds max_len {max_len}")
    return stride


def first_training_items(table: pa.Table) -> np.ndarray:
    """Each user's first training event (never a target), for rows with a training part."""
    has = training_lengths(table) > 0
    firsts = pc.list_element(table.filter(pa.array(has)).column("item_seq"), 0)
    return firsts.to_numpy(zero_copy_only=False).astype(np.int64)


def _window_bounds(
    table: pa.Table, max_len: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, context start, target start, end) of every window: the row it belongs to and
    flat positions in the rows' values, in row order and, within a row, oldest window first. Windows are cut from the
    end of the training part backwards, ``stride`` targets apart: window k's targets are
    ``[end - stride, end)`` and its inputs reach back ``max_len`` events, so with a stride
    below ``max_len`` every target after the first window sees at least
    ``max_len - stride`` earlier events (the context of the evaluation) while each target
    still belongs to exactly one window. The oldest window may be short."""
    step = window_stride(max_len, stride)
    counts = training_example_counts(table, max_len, step)
    offsets = _offsets(table)
    lengths = training_lengths(table)
    row = np.repeat(np.arange(len(counts)), counts)
    # k: 0 for a row's oldest window ... counts - 1 for its newest
    first_of_row = np.cumsum(counts) - counts
    k = np.arange(len(row)) - first_of_row[row]
    from_end = counts[row] - 1 - k
    end = offsets[row] + lengths[row] - from_end * step  # exclusive
    first = offsets[row] + 1  # a user's first event is never a target
    context = np.maximum(end - max_len, first)
    target_start = np.maximum(end - step, first)
    return row, context, target_start, end


def _offsets(table: pa.Table) -> np.ndarray:
    """Where each row's events start in the rows' flat ``item_seq`` values (n + 1,)."""
    column = table.column("item_seq")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def _gather(values: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """values[start:end] of every window, left-padded with 0 to ``width``."""
    out = np.zeros((len(start), width), dtype=np.int64)
    lengths = end - start
    cols = np.arange(width)
    first = width - lengths
    keep = cols[None, :] >= first[:, None]
    idx = start[:, None] + (cols[None, :] - first[:, None])
    out[keep] = values[idx[keep]]
    return out


def _flat(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def training_arrays(
    table: pa.Table, max_len: int, stride: int | None = None
) -> tuple[np.ndarray, ...]:
    """Inputs and next-item targets over each user's whole training part (validation and
    test targets dropped for evaluable users), in windows of ``max_len`` positions with
    ``stride`` targets each (``_window_bounds``): every training event but a user's first is
    the target of exactly one window position, so one epoch over these examples trains
    every training interaction once; positions before a window's targets are context only
    (target 0, ignored by the loss). A window's inputs are the events just before its
    targets. Rows with fewer than 2 training events give nothing. Examples follow the
    rows' order (the sharding plan relies on it)."""
    _, context, target_start, end = _window_bounds(table, max_len, stride)
    items = _flat(table, "item_seq")
    targets = _gather(items, context, end, max_len)
    # context positions are inputs only: the first (end - target_start) columns from the
    # right are this window's targets
    n_targets = end - target_start
    targets[np.arange(max_len)[None, :] < (max_len - n_targets)[:, None]] = 0
    items_in = _gather(items, context - 1, end - 1, max_len)
    types_in = _gather(_flat(table, "type_seq"), context - 1, end - 1, max_len)
    gaps_in = _gather(_flat(table, "gap_seq"), context - 1, end - 1, max_len)
    return items_in, types_in, gaps_in, targets


def soft_arrays(
    table: pa.Table, max_len: int, k: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The stored teacher top-K of a distillation table laid out like ``training_arrays``'
    targets: (windows, max_len, k) int32 items and float16 logits; positions without a
    target hold item 0 and logit -inf. Per row, ``topk_items`` / ``topk_logits`` hold k
    values for each training target in order (the row's training events but its first)."""
    row, _, target_start, end = _window_bounds(table, max_len, stride)
    offsets = _offsets(table)
    n_targets = np.maximum(training_lengths(table) - 1, 0)
    first_target = np.cumsum(n_targets) - n_targets  # the row's first target among all
    soft_items = _flat(table, "topk_items")
    soft_logits = table.column("topk_logits")
    if isinstance(soft_logits, pa.ChunkedArray):
        soft_logits = soft_logits.combine_chunks()
    logits = soft_logits.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
    if len(soft_items) != int(n_targets.sum()) * k or len(logits) != len(soft_items):
        raise PatternlakeError(
            f"distillation table: {len(soft_items)} stored teacher values for "
            f"{int(n_targets.sum())} training targets x k={k}; it was written for another "
            "user_sequences version or k (rerun `patternlake distill`)"
        )
    cols = np.arange(max_len)
    n = len(end)
    first_col = max_len - (end - target_start)  # the window's first target column
    has = cols[None, :] >= first_col[:, None]
    position = target_start[:, None] + (cols[None, :] - first_col[:, None])  # flat item index
    target_no = first_target[row][:, None] + position - offsets[row][:, None] - 1
    items_out = np.zeros((n, max_len, k), dtype=np.int32)
    logits_out = np.full((n, max_len, k), -np.inf, dtype=np.float16)
    idx = target_no[has][:, None] * k + np.arange(k)[None, :]
    items_out[has] = soft_items[idx]
    logits_out[has] = logits[idx]
    return items_out, logits_out


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


def item_id_count(lake: Any, version: int | None = None) -> int:
    """Item ids the models score: the largest ``item_index.item_idx`` (of ``version``, or
    the latest) plus padding id 0."""
    from pyspark.sql import functions as F

    items = lake.read("item_index", version=version)
    return (items.agg(F.max("item_idx")).first()[0] or 0) + 1


def read_table(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """A whole (small) table version, e.g. for evaluation on one node."""
    tables = [pq.read_table(f, columns=columns or COLUMNS) for f in files]
    if not tables:
        raise ValueError("no files")
    return pa.concat_tables(tables, promote_options="default")


CHUNK_ROWS = 1024  # rows per piece of the sharding plan


def plan_pieces(files: list[str], chunk_rows: int = CHUNK_ROWS) -> list[Piece]:
    pieces = []
    for path in sorted(files):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for off in range(0, n, chunk_rows):
                pieces.append(Piece(path, rg, off, min(chunk_rows, n - off)))
    return pieces


@dataclass(frozen=True)
class ExampleCounts:
    """The training examples of every piece of a table version's sharding plan
    (``plan_pieces(files, chunk_rows)``, in its order) for one window (``max_len``,
    ``stride``): counted once and handed to every rank, which then plans from the footers
    alone. Plain values (``asdict`` / ``ExampleCounts(**d)``), so it travels in a spec."""

    max_len: int
    stride: int  # normalised: window_stride(max_len, stride)
    chunk_rows: int
    counts: list[int]

    def fits(self, max_len: int, stride: int | None, chunk_rows: int = CHUNK_ROWS) -> bool:
        """Whether these are the counts of that window and piece size."""
        return (self.max_len, self.stride, self.chunk_rows) == (
            max_len,
            window_stride(max_len, stride),
            chunk_rows,
        )


def example_counts(
    files: list[str], max_len: int, stride: int | None = None, chunk_rows: int = CHUNK_ROWS
) -> ExampleCounts:
    """Counts the training examples of every piece of ``files`` (``count_examples``: the
    ``item_seq`` and ``valid_item`` columns, one row group at a time). Training calls it
    once per run (on the driver in ``train_spec.build_spec``, else on rank 0) and gives the
    result to every rank's ``ShardedSequences``."""
    step = window_stride(max_len, stride)
    counts = count_examples(plan_pieces(files, chunk_rows), max_len, step)
    return ExampleCounts(max_len, step, chunk_rows, counts)


class ShardedSequences:
    """Per-rank iterator of training batches over a pinned table version: every rank yields
    exactly ``batches_per_epoch()`` batches of ``batch_size`` examples (the last one may be
    short) every epoch (see the module's docstring). ``counts``: the plan's example counts
    (``example_counts``), the same object on every rank; without them this process counts
    (tests, one-process tools)."""

    def __init__(
        self,
        files: list[str],
        rank: int,
        world: int,
        max_len: int,
        batch_size: int,
        seed: int,
        chunk_rows: int = CHUNK_ROWS,
        buffer_rows: int = 8192,
        stride: int | None = None,
        counts: ExampleCounts | None = None,
        soft_k: int = 0,
    ):
        """``soft_k`` > 0: ``files`` are a distillation table and every batch carries the
        teacher's stored top ``soft_k`` (``soft_arrays``)."""
        pieces = plan_pieces(files, chunk_rows)
        self.stride = window_stride(max_len, stride)
        plan = counts or example_counts(files, max_len, self.stride, chunk_rows)
        if not plan.fits(max_len, self.stride, chunk_rows) or len(plan.counts) != len(pieces):
            raise ValueError(
                f"example counts of {len(plan.counts)} pieces (max_len {plan.max_len}, "
                f"stride {plan.stride}, {plan.chunk_rows} rows) do not fit a plan of "
                f"{len(pieces)} pieces (max_len {max_len}, stride {self.stride}, "
                f"{chunk_rows} rows)"
            )
        counts = plan.counts
        # pieces without a training example take no part in the stream
        self.pieces = [p for p, n in zip(pieces, counts, strict=True) if n > 0]
        self.counts = np.array([n for n in counts if n > 0], dtype=np.int64)
        self.examples = int(self.counts.sum())
        if self.examples == 0:
            raise PatternlakeError(
                f"train: user_sequences has {sum(p.length for p in pieces)} rows but no user "
                "with the 2 training events (an input and a target) training needs, beyond "
                "the validation and test targets; ingest more events"
            )
        self.rank, self.world = rank, world
        self.max_len, self.batch_size, self.seed = max_len, batch_size, seed
        self.soft_k = soft_k
        if soft_k:  # a window's soft targets are max_len x k values: a smaller buffer
            buffer_rows = min(buffer_rows, max(2048, batch_size))
        self.buffer_rows = max(buffer_rows, batch_size)

    @property
    def examples_per_rank(self) -> int:
        return -(-self.examples // self.world)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """The same for every rank and every epoch: ``ceil(ceil(N / world) / batch_size)``."""
        return -(-self.examples_per_rank // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.pieces))

    def assignment(self, epoch: int, rank: int | None = None) -> list[tuple[Piece, int, int]]:
        """(piece, first, end) example ranges of one rank in one epoch: positions
        ``[r * per, (r + 1) * per)`` of the epoch's example stream, modulo its length."""
        rank = self.rank if rank is None else rank
        order = self._order(epoch)
        ends = np.cumsum(self.counts[order])
        starts = ends - self.counts[order]
        per, n = self.examples_per_rank, self.examples
        begin = (rank * per) % n
        spans = [(begin, min(begin + per, n))]
        if begin + per > n:  # the tail of the stream wraps around to its start
            spans.append((0, begin + per - n))
        out = []
        for lo, hi in spans:
            first = int(np.searchsorted(ends, lo, side="right"))
            for k in range(first, len(order)):
                if starts[k] >= hi:
                    break
                a, b = max(lo, starts[k]), min(hi, ends[k])
                out.append((self.pieces[order[k]], int(a - starts[k]), int(b - starts[k])))
        return out

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng((self.seed + epoch) * 1009 + self.rank)
        buffer: list[tuple[np.ndarray, ...]] = []
        buffered = 0
        for piece, (first, end) in self._read(self.assignment(epoch)):
            arrays = training_arrays(piece, self.max_len, self.stride)
            if self.soft_k:
                arrays = (*arrays, *soft_arrays(piece, self.max_len, self.soft_k, self.stride))
            buffer.append(tuple(a[first:end] for a in arrays))
            buffered += end - first
            if buffered < self.buffer_rows:
                continue
            yield from self._flush(buffer, rng, keep_tail=True)
            buffered = sum(len(a[0]) for a in buffer)
        yield from self._flush(buffer, rng, keep_tail=False)

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
            yield _batch([a[s] for a in cat])
        tail = n_full * self.batch_size
        if tail < len(perm):
            if keep_tail:
                buffer.append(tuple(a[tail:] for a in cat))
            else:
                yield _batch([a[tail:] for a in cat])

    def _read(
        self, ranges: list[tuple[Piece, int, int]]
    ) -> Iterator[tuple[pa.Table, tuple[int, int]]]:
        groups = _RowGroups(COLUMNS[1:] + (SOFT_COLUMNS if self.soft_k else []))
        for p, first, end in ranges:
            yield groups.slice(p), (first, end)


def _batch(arrays: list[np.ndarray]) -> Batch:
    """A batch from the windows' arrays: inputs and targets int64, soft targets as stored
    (int32 ids, float16 logits) widened here, on the prefetch thread."""
    out = [torch.from_numpy(a) for a in arrays[:4]]
    if len(arrays) > 4:
        out += [torch.from_numpy(arrays[4].astype(np.int64)), torch.from_numpy(arrays[5]).float()]
    return Batch(*out)


def count_examples(pieces: list[Piece], max_len: int, stride: int | None = None) -> list[int]:
    """Training examples in each piece, read from two columns only."""
    groups = _RowGroups(["item_seq", "valid_item"])
    return [int(training_example_counts(groups.slice(p), max_len, stride).sum()) for p in pieces]


class _RowGroups:
    """Reads pieces, keeping the last row group read (consecutive pieces often share it)."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.key: tuple[str, int] | None = None
        self.group: pa.Table | None = None

    def slice(self, p: Piece) -> pa.Table:
        if self.key != (p.path, p.row_group):
            self.group = pq.ParquetFile(p.path).read_row_group(p.row_group, columns=self.columns)
            self.key = (p.path, p.row_group)
        return self.group.slice(p.offset, p.length)
