"""Sharding of a pinned ``user_sequences`` version across training ranks: every rank runs
exactly the same number of steps, and every training example is trained every epoch, on
one file of a single piece as on uneven files."""

import pytest

from patternlake.errors import PatternlakeError
from patternlake.sequence_reader import (
    ShardedSequences,
    example_counts,
    read_table,
    training_arrays,
    training_example_counts,
)
from tests.training import handmade

MAX_LEN, BATCH = 8, 16


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return handmade.layouts(tmp_path_factory.mktemp("layouts"))


def trained_users(batches) -> list[int]:
    """The user of each example: the last target names it (items are 1000 u + j + 1)."""
    return [int(t[t > 0].max()) // 1000 for b in batches for t in b.targets.numpy()]


@pytest.mark.parametrize("layout", ["one_file", "uneven"])
@pytest.mark.parametrize("world,stride", [(2, None), (3, None), (2, 3)])
def test_every_rank_runs_the_same_steps_and_every_example_is_trained_every_epoch(
    layouts, layout, world, stride
):
    files = layouts[layout]
    table = read_table(files, handmade.SCHEMA.names)
    assert handmade.trainable_users(table)  # the layout has something to train
    n_examples = int(training_example_counts(table, MAX_LEN, stride).sum())
    every_target = set(training_arrays(table, MAX_LEN, stride)[3].ravel().tolist()) - {0}
    ranks = [
        ShardedSequences(files, r, world, MAX_LEN, BATCH, seed=7, stride=stride)
        for r in range(world)
    ]
    for epoch in range(3):
        batches = [list(r.epoch(epoch)) for r in ranks]
        steps = [len(b) for b in batches]
        assert steps == [ranks[0].batches_per_epoch()] * world, (epoch, steps)
        examples = [sum(len(b.targets) for b in rb) for rb in batches]
        # the same number of examples on every rank: the last batches match in size too
        assert len(set(examples)) == 1
        trained = set().union(
            *(set(b.targets.numpy().ravel().tolist()) for rb in batches for b in rb)
        )
        assert trained - {0} == every_target, epoch  # every training target, every epoch
        repeated = sum(examples) - n_examples
        assert 0 <= repeated < world  # only the short rank's wrap-around repeats examples


def test_the_plan_counts_exactly_the_examples_training_arrays_gives():
    table = handmade.sequences(
        list(range(40)), lambda u: u % 9, handmade.user_id_item
    )  # 0 to 8 events: no, one or several training events, evaluable or not
    counts = training_example_counts(table, MAX_LEN)
    assert counts.sum() == len(training_arrays(table, MAX_LEN)[0])
    assert counts.tolist() == [
        -(-max((n - 2 if n >= 3 else n) - 1, 0) // MAX_LEN) for n in (u % 9 for u in range(40))
    ]


def test_no_user_with_a_training_pair_is_a_clear_error(tmp_path):
    table = handmade.sequences(list(range(10)), lambda u: 3, handmade.user_id_item)
    files = [handmade.write(table, tmp_path / "part-0.parquet")]
    with pytest.raises(PatternlakeError, match="no user with the 2 training events"):
        ShardedSequences(files, 0, 2, MAX_LEN, BATCH, seed=7)


def test_fewer_examples_than_workers_still_gives_every_rank_a_step(tmp_path):
    table = handmade.sequences([1], lambda u: 5, handmade.user_id_item)  # one example
    files = [handmade.write(table, tmp_path / "part-0.parquet")]
    ranks = [ShardedSequences(files, r, 3, MAX_LEN, BATCH, seed=7) for r in range(3)]
    for r in ranks:
        (batch,) = list(r.epoch(0))
        assert trained_users([batch]) == [1]


def test_counts_handed_in_plan_like_counting_and_another_windows_are_refused(layouts):
    files = layouts["uneven"]
    counted = example_counts(files, MAX_LEN, stride=3)
    given = ShardedSequences(files, 1, 2, MAX_LEN, BATCH, seed=7, stride=3, counts=counted)
    own = ShardedSequences(files, 1, 2, MAX_LEN, BATCH, seed=7, stride=3)
    assert given.counts.tolist() == own.counts.tolist()
    assert given.assignment(2) == own.assignment(2)
    with pytest.raises(ValueError, match="do not fit"):
        ShardedSequences(files, 1, 2, MAX_LEN, BATCH, seed=7, counts=counted)  # stride 8
