"""End to end on `patternlake generate` data at default settings: the daily pipeline must
find the planted rules (recall >= 0.9) in the segment their users landed in."""

import json

import pytest
from pyspark.sql import functions as F

from patternlake.cli import main
from patternlake.synthetic.truth import score_rules


@pytest.mark.slow
def test_planted_rules_are_recalled_with_reported_precision(daily_lake, capsys):
    work, lake = daily_lake
    patterns = lake.read("segment_patterns")
    mined = [r.asDict() for r in patterns.filter("kind = 'sequential'").collect()]
    assignments = {r.user_id: r.segment_id for r in lake.read("segments").collect()}
    score = score_rules(work / "data" / "truth", mined, assignments)
    with capsys.disabled():
        print(
            f"\nplanted-rule recall {score.recall:.3f} ({score.found}/{score.planted}), "
            f"precision {score.precision:.3f} of {score.mined} mined sequential rules"
        )
    assert score.recall >= 0.9
    assert score.precision >= 0.5
    assert len(set(score.segment_map.values())) == len(
        score.segment_map
    )  # latent segments kept apart


@pytest.mark.slow
def test_rules_carry_support_confidence_lift_and_cooccurrence(daily_lake):
    _, lake = daily_lake
    patterns = lake.read("segment_patterns")
    row = patterns.filter("kind = 'sequential'").orderBy(F.desc("lift")).first()
    assert 0 < row.support <= 1 and 0 < row.confidence <= 1 and row.lift > 1
    assert row.support_count >= 20 and len(row.antecedent) == len(row.antecedent_idx) >= 1
    assert patterns.filter("kind = 'cooccurrence'").count() > 0
    assert patterns.filter(F.col("confidence") < 0.3).count() == 0
    # every rule is labelled with the item ids its idx have in item_index
    index = {r.item_idx: r.item_id for r in lake.read("item_index").collect()}
    for r in patterns.collect():
        assert r.antecedent == [index[i] for i in r.antecedent_idx]
        assert r.consequent == index[r.consequent_idx]


@pytest.mark.slow
def test_daily_run_is_idempotent_and_keeps_the_invariant(daily_lake):
    work, lake = daily_lake
    before = lake.read("silver_events").count()
    assert (
        main(
            [
                "--set",
                f"lake.root={lake.root}",
                "run",
                "daily",
                "--input",
                str(work / "data" / "events"),
            ]
        )
        == 0
    )
    assert lake.read("silver_events").count() == before
    meta = json.loads((work / "data" / "truth" / "meta.json").read_text())
    v = lake.read("validation_results").collect()
    assert sum(r.bronze_rows for r in v) == meta["rows"]
    assert sum(r.silver_rows + r.quarantined_rows + r.duplicate_rows for r in v) == meta["rows"]
    assert sum(r.duplicate_rows for r in v) == meta["duplicates"]
