"""Training windows over the whole history: every training interaction is a target exactly
once per epoch, with the events just before it as input; validation and test targets never
reach training."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from patternlake.sequence_reader import training_arrays, training_example_counts

L = 5


def _table(lengths: list[int]) -> tuple[pa.Table, dict[int, tuple[int, int]]]:
    """Rows of distinct item ids (id -> (row, position)); rows with >= 3 events are
    evaluable (valid = second to last, test = last)."""
    rows, where, next_id = [], {}, 1
    for r, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        next_id += n
        rows.append(ids)
        for p, i in enumerate(ids):
            where[i] = (r, p)
    table = pa.table(
        {
            "user_id": [f"u{r}" for r in range(len(rows))],
            "item_seq": rows,
            "type_seq": [[1] * len(x) for x in rows],
            "gap_seq": [[i % 8 for i in x] for x in rows],  # a per-item value to check alignment
            "valid_item": [x[-2] if len(x) >= 3 else None for x in rows],
            "test_item": [x[-1] if len(x) >= 3 else None for x in rows],
        }
    )
    return table, where


def test_every_training_interaction_is_a_target_exactly_once():
    lengths = [0, 1, 2, 3, 4, 7, 12, 13, 23, 2 * L + 3]
    table, where = _table(lengths)
    items, types, gaps, targets = training_arrays(table, L)
    counts = training_example_counts(table, L)
    assert len(items) == counts.sum()
    # training part: evaluable rows (>= 3 events) lose their last two events
    train_len = [n - 2 if n >= 3 else n for n in lengths]
    expected = sorted(
        i for i, (r, p) in where.items() if 0 < p < train_len[r]
    )  # every training event but each user's first
    got = sorted(targets[targets > 0].tolist())
    assert got == expected  # each once: sorted lists equal, no duplicates
    assert counts.tolist() == [-(-max(t - 1, 0) // L) for t in train_len]


def test_inputs_are_the_events_just_before_each_target_and_never_evaluation_targets():
    table, where = _table([23, 9, 3, 14])
    items, types, gaps, targets = training_arrays(table, L)
    held_out = set(table.column("valid_item").to_pylist()) | set(
        table.column("test_item").to_pylist()
    )
    assert not (held_out & set(items.ravel().tolist()))
    assert not (held_out & set(targets.ravel().tolist()))
    filled = targets > 0
    assert ((items > 0) == filled).all()  # an input exactly where there is a target
    for x, y in zip(items[filled], targets[filled], strict=True):
        (rx, px), (ry, py) = where[int(x)], where[int(y)]
        assert rx == ry and px == py - 1
    assert (gaps[filled] == items[filled] % 8).all()  # side columns aligned with items
    for row in items:  # left-padded and contiguous in time
        ids = row[row > 0]
        assert (row[: L - len(ids)] == 0).all()
        assert (np.diff(ids) == 1).all()


def test_popularity_counts_every_training_event_once_with_windows():
    from patternlake.models.baselines import Popularity
    from patternlake.sequence_reader import first_training_items

    table, where = _table([23, 9, 3, 14, 1])
    items, _, _, targets = training_arrays(table, L)
    pop = Popularity(200).fit(items, targets, first_training_items(table))
    train_len = [21, 7, 1, 12, 1]  # evaluable rows lose valid and test targets
    expected = sorted(i for i, (r, p) in where.items() if p < train_len[r])
    assert sorted(np.flatnonzero(pop.counts).tolist()) == expected
    assert set(pop.counts[pop.counts > 0].tolist()) == {1.0}


def test_overlapping_windows_keep_every_target_once_and_give_each_the_context_before_it():
    """``stride`` < max_len: windows share context; each training interaction is still the
    target of exactly one position, and every target but those of a user's oldest window
    sees at least max_len - stride earlier events of its own user, in order."""
    stride = 2
    lengths = [0, 1, 2, 3, 4, 7, 12, 13, 23, 2 * L + 3]
    table, where = _table(lengths)
    items, types, gaps, targets = training_arrays(table, L, stride)
    counts = training_example_counts(table, L, stride)
    assert len(items) == counts.sum()
    train_len = [n - 2 if n >= 3 else n for n in lengths]
    assert counts.tolist() == [-(-max(t - 1, 0) // stride) for t in train_len]
    expected = sorted(i for i, (r, p) in where.items() if 0 < p < train_len[r])
    assert sorted(targets[targets > 0].tolist()) == expected
    held_out = set(table.column("valid_item").to_pylist()) - {None}
    held_out |= set(table.column("test_item").to_pylist()) - {None}
    assert not (held_out & set(items.ravel().tolist()))
    for row_in, row_out in zip(items, targets, strict=True):
        ids = row_in[row_in > 0]
        assert (np.diff(ids) == 1).all() and (row_in[: L - len(ids)] == 0).all()
        at = np.flatnonzero(row_out)
        assert 1 <= len(at) <= stride and (at == np.arange(L - len(at), L)).all()
        for c in at:  # the input at a target's position is the event just before it
            (rx, px), (ry, py) = where[int(row_in[c])], where[int(row_out[c])]
            assert rx == ry and px == py - 1
        context = int((row_in[: at[0]] > 0).sum())
        first_pos = where[int(row_out[at[0]])][1]
        assert context == min(L - len(at), first_pos - 1)  # all it can have, up to the window
    assert (gaps[items > 0] == items[items > 0] % 8).all()


def test_stride_equal_to_max_len_is_the_side_by_side_windows():
    table, _ = _table([23, 9, 3, 14])
    for a, b in zip(training_arrays(table, L), training_arrays(table, L, L), strict=True):
        assert np.array_equal(a, b)
