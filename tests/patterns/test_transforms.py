"""The mining transforms on tiny hand-made frames: sessions, and support, confidence and lift
worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from patternlake.patterns.transforms import (
    best_rules,
    cooccurrence_rules,
    item_names,
    pattern_rows,
    sequential_rules,
    training_sessions,
)

SEQUENCES = "user_id string, item_seq array<int>, time_seq array<bigint>, valid_item int"
NOW = datetime(2026, 1, 2, tzinfo=UTC)


@pytest.fixture
def sequences(spark):
    return spark.createDataFrame(
        [
            # evaluable: the last two (validation and test targets) are left out -> 1 2 3 | 4
            ("u1", [1, 2, 3, 4, 5, 6], [0, 60, 120, 10_000, 10_060, 10_120], 5),
            # not evaluable: all of it; a gap of exactly 30 minutes breaks -> 7 | 8 9
            ("u2", [7, 8, 9], [0, 1_800, 1_860], None),
            ("u3", [1, 2, 3], [0, 1, 2], None),  # no segment
            ("u4", [1, 2, 3, 4, 5], [0, 1, 2, 3, 4], None),
        ],
        SEQUENCES,
    )


@pytest.fixture
def segments(spark):
    return spark.createDataFrame(
        [("u1", 1, 9), ("u2", 2, 9), ("u4", 1, 9)], "user_id string, segment_id int, x int"
    )


def sessions_of(df):
    return sorted((r.user_id, r.segment_id, tuple(r["items"])) for r in df.collect())


def test_training_sessions_leave_out_targets_cut_at_gaps_and_drop_single_events(
    sequences, segments
):
    out = training_sessions(sequences, segments, session_gap_minutes=30)
    assert sessions_of(out) == [
        ("u1", 1, (1, 2, 3)),
        ("u2", 2, (8, 9)),
        ("u4", 1, (1, 2, 3, 4, 5)),
    ]


def test_training_sessions_keep_the_last_recent_events_of_the_training_part(sequences, segments):
    out = training_sessions(sequences, segments, session_gap_minutes=30, recent_events=3)
    # u1: training part 1 2 3 4, its last three 2 3 | 4; u4: 3 4 5
    assert sessions_of(out) == [("u1", 1, (2, 3)), ("u2", 2, (8, 9)), ("u4", 1, (3, 4, 5))]


def items_frame(spark, sessions):
    return spark.createDataFrame([(s,) for s in sessions], "items array<int>")


# five sessions: pattern counts 1:3 2:3 3:2 4:2 5:2, [1 2]:3 [1 3]:2 [2 3]:2 [4 5]:2 [1 2 3]:2
FIVE = [[1, 2, 3], [1, 2, 3], [1, 2], [4, 5], [4, 5]]


def by_rule(rules):
    return {(tuple(a), c): (count, conf, lift, sup) for a, c, count, conf, lift, sup in rules}


def test_sequential_rules_support_confidence_and_lift(spark):
    rules, n = sequential_rules(
        items_frame(spark, FIVE), min_support=0.1, min_count=2, max_len=3, min_extension_share=0.9
    )
    assert n == 5
    got = by_rule(rules)
    expected = {
        # (count, confidence = count / antecedent's, lift = confidence / (consequent's / 5), support)
        ((1,), 2): (3, 3 / 3, 1 / (3 / 5), 3 / 5),
        ((1,), 3): (2, 2 / 3, (2 / 3) / (2 / 5), 2 / 5),
        ((2,), 3): (2, 2 / 3, (2 / 3) / (2 / 5), 2 / 5),
        ((4,), 5): (2, 2 / 2, 1 / (2 / 5), 2 / 5),
        ((1, 2), 3): (2, 2 / 3, (2 / 3) / (2 / 5), 2 / 5),
    }
    assert set(got) == set(expected)
    for rule, values in expected.items():
        assert got[rule] == pytest.approx(values), rule


def test_a_longer_antecedent_needs_min_extension_share_of_its_shorter_rules(spark):
    # a sixth session 2 3: [2 3] holds in 3 sessions, [1 2 3] still in 2 (2 < 0.9 * 3)
    sessions = items_frame(spark, [*FIVE, [2, 3]])
    strict, n = sequential_rules(sessions, 0.1, 2, 3, min_extension_share=0.9)
    assert n == 6 and ((1, 2), 3) not in by_rule(strict) and ((2,), 3) in by_rule(strict)
    loose, _ = sequential_rules(sessions, 0.1, 2, 3, min_extension_share=0.5)  # 2 >= 1.5
    assert by_rule(loose)[((1, 2), 3)] == pytest.approx((2, 2 / 3, (2 / 3) / (3 / 6), 2 / 6))


def test_sequential_rules_below_min_count_sessions_find_nothing(spark):
    assert sequential_rules(items_frame(spark, FIVE), 0.1, 6, 3, 0.9) == ([], 5)


def test_cooccurrence_rules_ignore_order_and_keep_one_item_consequents(spark):
    # order and repeats do not matter: 3 2 1 1 is the item set {1, 2, 3}
    sessions = items_frame(spark, [[1, 2, 3], [3, 2, 1, 1], [1, 2], [4, 5], [5, 4]])
    got = {
        (tuple(sorted(a)), c): v
        for (a, c), v in by_rule(cooccurrence_rules(sessions, 0.4, 0.9, n=5)).items()
    }
    expected = {
        ((1,), 2): (3, 1.0, 1 / (3 / 5), 3 / 5),
        ((2,), 1): (3, 1.0, 1 / (3 / 5), 3 / 5),
        ((3,), 1): (2, 1.0, 1 / (3 / 5), 2 / 5),
        ((3,), 2): (2, 1.0, 1 / (3 / 5), 2 / 5),
        ((1, 3), 2): (2, 1.0, 1 / (3 / 5), 2 / 5),
        ((2, 3), 1): (2, 1.0, 1 / (3 / 5), 2 / 5),
        ((4,), 5): (2, 1.0, 1 / (2 / 5), 2 / 5),
        ((5,), 4): (2, 1.0, 1 / (2 / 5), 2 / 5),
    }  # [1 2] -> 3 has confidence 2/3 < 0.9; 3 -> [1 2] has two consequents
    assert set(got) == set(expected)
    for rule, values in expected.items():
        assert got[rule] == pytest.approx(values), rule


def test_best_rules_apply_thresholds_rank_by_lift_then_confidence_and_cap():
    rules = [
        ([1], 2, 9, 0.50, 2.0, 0.1),
        ([1], 3, 5, 0.90, 2.0, 0.1),  # same lift, more confidence (fewer sessions): first
        ([2], 3, 9, 0.50, 3.0, 0.1),  # best lift
        ([3], 4, 9, 0.20, 9.0, 0.1),  # confidence too low
        ([4], 5, 9, 0.90, 1.1, 0.1),  # lift too low
        ([0], 4, 9, 0.50, 2.0, 0.1),  # ties with [1] -> 2 but for the items: antecedent first
    ]
    got = best_rules(rules, min_confidence=0.3, min_lift=1.5, max_rules=10)
    assert [(r[0], r[1]) for r in got] == [([2], 3), ([1], 3), ([0], 4), ([1], 2)]
    assert [(r[0], r[1]) for r in best_rules(rules, 0.3, 1.5, max_rules=2)] == [([2], 3), ([1], 3)]


def test_pattern_rows_name_the_items(spark):
    index = spark.createDataFrame(
        [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)], "item_id string, item_idx int"
    )
    rules = [([1, 2], 3, 7, 0.5, 2.5, 0.25)]
    names = item_names(index, rules)
    assert names == {1: "a", 2: "b", 3: "c"}  # only the items the rules mention
    rows = pattern_rows(4, "sequential", rules, names, 28, 6, NOW)
    assert rows == [(4, "sequential", ["a", "b"], "c", [1, 2], 3, 0.25, 7, 0.5, 2.5, 28, 6, NOW)]
    assert item_names(index, []) == {}


def test_item_names_collect_only_the_rules_items(spark, monkeypatch):
    """The catalogue never comes to the driver: what is collected is one row per item the
    rules mention, however large ``item_index`` is."""
    index = spark.range(5000).selectExpr(
        "concat('i', id) AS item_id", "CAST(id AS int) AS item_idx"
    )
    collected = []
    frame = type(index)
    collect = frame.collect
    monkeypatch.setattr(frame, "collect", lambda df: collected.append(collect(df)) or collected[-1])
    rules = [([10, 20], 30, 5, 0.5, 2.0, 0.1), ([4999], 10, 5, 0.5, 2.0, 0.1)]
    assert item_names(index, rules) == {10: "i10", 20: "i20", 30: "i30", 4999: "i4999"}
    assert max(len(rows) for rows in collected) == 4
