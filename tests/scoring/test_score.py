"""score: pure pieces on hand-made values, then user_patterns from the trained daily lake
(real teacher, students, Spark, Delta) read back through Spark SQL and DuckDB."""

from __future__ import annotations

import pytest
import torch
from pyspark.sql import functions as F

from patternlake.models.ranking import DenseRanker, delete_positions, top_k
from patternlake.scoring.transforms import (
    best_rule,
    deletion_curve,
    in_order,
    normalise,
    occlusion,
    rule_book,
    windows,
)
from tests.conftest import with_overrides


def test_windows_keep_the_last_events_and_pad_unknown_items():
    x = windows([[1, 2, 3, 4], [9, 50]], [[1, 1, 2, 2], [1, 1]], [[0, 1, 2, 3], [0, 4]], 3, 10)
    assert x.shape == (2, 3, 3)
    assert x[0, 0].tolist() == [2, 3, 4] and x[0, 1].tolist() == [1, 2, 2]
    assert x[1, 0].tolist() == [0, 9, 0]  # 50 is newer than the model: padding
    assert x[1, 2].tolist() == [0, 0, 0]


def test_top_k_never_returns_padding_or_excluded_items():
    s = torch.tensor([[9.0, 1, 5, 3, 4], [9.0, 4, 3, 2, 1]])
    ranker = DenseRanker(lambda x: s)
    state = ranker.encode(torch.zeros((2, 3, 1), dtype=torch.int64))
    _, ids = top_k(ranker, state, 2)
    assert ids.tolist() == [[2, 4], [1, 2]]
    _, ids = top_k(ranker, state, 2, exclude=torch.tensor([[2, 0], [1, 2]]))
    assert ids.tolist() == [[4, 3], [3, 4]]


def test_delete_positions_shifts_the_history():
    x = torch.tensor([[[0, 5, 6, 7], [0, 1, 1, 1], [0, 2, 3, 4]]])
    mask = torch.tensor([[False, False, True, False]])
    assert delete_positions(x, mask)[0].tolist() == [[0, 0, 5, 7], [0, 0, 1, 1], [0, 0, 2, 4]]


def _bag_model(weights: torch.Tensor):
    """Score of item j = sum over the history of weights[history item, j] (a known truth)."""

    def score(x: torch.Tensor) -> torch.Tensor:
        return weights[x[:, 0]].sum(1)

    return score


def test_occlusion_finds_the_event_that_drives_the_score():
    w = torch.zeros(6, 6)
    w[3, 5] = 2.0  # item 3 in the history drives item 5
    w[1, 5] = 0.5
    x = torch.tensor([[[1, 2, 3, 4], [1, 1, 1, 1], [0, 0, 0, 0]]])
    drops = occlusion(_bag_model(w), x, torch.tensor([[5]]), 4)
    idx, weight = normalise(drops, 2)
    assert idx[0, 0].tolist() == [1, 3]  # 1 event ago (item 3), then 3 ago (item 1)
    assert torch.allclose(weight[0, 0], torch.tensor([0.8, 0.2]))


def test_deletion_curve_falls_faster_for_the_true_order():
    w = torch.zeros(6, 6)
    w[3, 5], w[1, 5] = 2.0, 0.5
    x = torch.tensor([[[1, 2, 3, 4], [1, 1, 1, 1], [0, 0, 0, 0]]])
    item = torch.tensor([5])
    good = deletion_curve(_bag_model(w), x, item, torch.tensor([[1, 3, 0, 2]]), 2)
    bad = deletion_curve(_bag_model(w), x, item, torch.tensor([[0, 2, 1, 3]]), 2)
    assert good.tolist() == [2.5, 0.5, 0.0] and bad.tolist() == [2.5, 2.5, 2.5]


def test_in_order_and_best_pattern_per_item():
    def rule(seg, ante, cons, ante_idx, cons_idx, sup, conf, lift, kind="sequential"):
        return dict(
            segment_id=seg, kind=kind, antecedent=ante, consequent=cons,
            antecedent_idx=ante_idx, consequent_idx=cons_idx, support=sup,
            confidence=conf, lift=lift,
        )  # fmt: skip

    book = rule_book(
        [
            rule(1, ["a", "b"], "g", [1, 2], 7, 0.1, 0.5, 3.0),  # in order: matches
            rule(1, ["b", "a"], "g", [2, 1], 7, 0.2, 0.9, 4.0),  # wrong order for u
            rule(1, ["x"], "h", [4], 8, 0.3, 0.9, 5.0),  # 4 not in u's history
            rule(1, ["a"], "h", [1], 8, 0.3, 0.9, 5.0, kind="cooccurrence"),  # not sequential
            rule(2, ["b", "a"], "g", [2, 1], 7, 0.2, 0.6, 4.0),  # v's segment
        ]
    )
    assert best_rule(book, 1, 7, [1, 5, 2, 9])["antecedent"] == ["a", "b"]
    assert best_rule(book, 1, 7, [1, 5, 2, 9])["confidence"] == 0.5
    assert best_rule(book, 1, 8, [1, 5, 2, 9]) is None
    assert best_rule(book, 2, 7, [2, 1])["antecedent"] == ["b", "a"]
    assert best_rule(book, 1, 7, [2, 1, 2])["confidence"] == 0.9  # both match: the best
    assert [in_order(a, h) for a, h in [([1, 2], [3, 1, 4, 2]), ([1, 2], [2, 1]), ([], [5])]] == [
        True,
        False,
        True,
    ]


# ---- on the trained daily lake ------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(spark, trained_lake):
    from patternlake.scoring.score import score_users

    cfg, lake, *_ = trained_lake
    first = score_users(spark, lake, cfg, "run-a")
    rows_a = sorted(
        tuple(r)
        for r in lake.read("user_patterns")
        .where("run_id = 'run-a'")
        .drop("scored_at")
        .select("user_id", "rank", "item_id", "score")
        .collect()
    )
    again = score_users(spark, lake, cfg, "run-a")  # idempotent rerun
    cold = with_overrides(cfg, score={"min_history": 40})
    other = score_users(spark, lake, cold, "run-b")
    return cfg, lake, first, rows_a, again, other


@pytest.mark.slow
def test_every_user_gets_k_rows_with_the_contract_schema(scored):
    cfg, lake, first, *_ = scored
    df = lake.read("user_patterns").where("run_id = 'run-a'")
    names = [f.name for f in df.schema.fields]
    for col in (
        "user_id",
        "segment_id",
        "rank",
        "item_id",
        "score",
        "pattern",
        "explanation",
        "model_name",
        "model_version",
        "data_version",
        "run_id",
        "scored_at",
    ):
        assert col in names
    per_user = df.groupBy("user_id").agg(F.count("*").alias("n"), F.collect_set("rank").alias("r"))
    bad = per_user.where(f"n != {cfg.score.top_k}").count()
    assert bad == 0 and first["users"] == lake.read("user_sequences").count()
    assert per_user.first().r and sorted(per_user.first().r) == list(range(1, cfg.score.top_k + 1))
    assert df.where("item_id IS NULL").count() == 0
    champion_names = set(first["models"].values())
    used = {
        f"{r.model_name} v{r.model_version}"
        for r in df.select("model_name", "model_version").distinct().collect()
    }
    assert used <= champion_names


@pytest.mark.slow
def test_rerunning_a_run_id_replaces_only_that_run(scored):
    _, lake, first, rows_a, again, other = scored
    after = sorted(
        tuple(r)
        for r in lake.read("user_patterns")
        .where("run_id = 'run-a'")
        .select("user_id", "rank", "item_id", "score")
        .collect()
    )
    assert after == rows_a and again["rows"] == first["rows"]
    assert lake.read("user_patterns").where("run_id = 'run-b'").count() == other["rows"]


@pytest.mark.slow
def test_users_with_too_little_history_get_flagged_segment_popularity(scored):
    _, lake, *_ = scored
    df = lake.read("user_patterns").where("run_id = 'run-b'")
    lengths = lake.read("user_sequences").select("user_id", F.size("item_seq").alias("n"))
    joined = df.join(lengths, "user_id")
    assert joined.where("n < 40 AND NOT fallback").count() == 0
    assert joined.where("n >= 40 AND fallback").count() == 0
    fb = joined.where("fallback")
    assert fb.count() > 0
    assert fb.where("model_name != 'segment_popularity' OR size(explanation) > 0").count() == 0


@pytest.mark.slow
def test_patterns_are_rules_of_the_segment_met_in_order(scored):
    _, lake, *_ = scored
    df = lake.read("user_patterns").where("run_id = 'run-a' AND pattern IS NOT NULL")
    assert df.count() > 0  # planted chains: some recommended items are a rule's consequent
    rules = lake.read("segment_patterns").where("kind = 'sequential'")
    rows = df.select("segment_id", "item_id", "pattern").collect()
    mined = {(r.segment_id, tuple(r.antecedent), r.consequent) for r in rules.collect()}
    for r in rows:
        assert r.pattern.consequent == r.item_id
        assert (r.segment_id, tuple(r.pattern.antecedent), r.pattern.consequent) in mined


@pytest.mark.slow
def test_explanations_are_past_events_with_normalised_weights(scored):
    _, lake, *_ = scored
    df = lake.read("user_patterns").where("run_id = 'run-a' AND NOT fallback")
    # a fixed sample (an unordered limit took whichever 200 rows the partitions gave first)
    rows = df.orderBy("user_id", "rank").select("user_id", "explanation").limit(200).collect()
    hist = {r.user_id: r.item_seq for r in lake.read("user_sequences").collect()}
    items = {r.item_idx: r.item_id for r in lake.read("item_index").collect()}
    explained = 0
    for r in rows:
        if not r.explanation:
            continue
        explained += 1
        assert abs(sum(e.weight for e in r.explanation) - 1) < 1e-3
        seq = hist[r.user_id]
        for e in r.explanation:
            assert seq[len(seq) - 1 - e.events_ago] == e.item_idx and items[e.item_idx] == e.item_id
    assert explained > 0.9 * len(rows)


@pytest.mark.slow
def test_occlusion_is_more_faithful_than_random_deletion(trained_lake):
    """The faithfulness check: deleting each user's top-3 occlusion-weighted events lowers
    the top item's score more than deleting 3 random recent events (averaged over users)."""
    from patternlake import registry
    from patternlake.scoring.transforms import windows

    cfg, lake, *_ = trained_lake
    teacher, _ = registry.load_teacher(cfg)
    seqs = lake.read("user_sequences").limit(300).collect()
    x = windows(
        [r.item_seq for r in seqs],
        [r.type_seq for r in seqs],
        [r.gap_seq for r in seqs],
        teacher.config.max_len,
        teacher.config.n_items,
    )

    def score(z):
        with torch.no_grad():
            return teacher.last_scores(z[:, 0], z[:, 1], z[:, 2])

    top = score(x).topk(1).indices  # (B, 1)
    drops = occlusion(score, x, top, 20)[:, 0]  # (B, 20)
    order = drops.argsort(dim=1, descending=True)
    rand = torch.stack(
        [torch.randperm(20, generator=torch.Generator().manual_seed(i)) for i in range(len(x))]
    )
    ours = deletion_curve(score, x, top[:, 0], order, 3)
    random = deletion_curve(score, x, top[:, 0], rand, 3)
    assert (ours[0] - ours[3]) > 1.5 * (random[0] - random[3]), (ours, random)


@pytest.mark.slow
def test_sql_and_duckdb_read_user_patterns(scored, capsys):
    import duckdb
    from deltalake import DeltaTable

    from patternlake.cli import main

    cfg, lake, first, *_ = scored
    root = lake.root
    assert (
        main(
            [
                "--set",
                f"lake.root={root}",
                "sql",
                "--json",
                "SELECT run_id, count(*) AS n FROM user_patterns GROUP BY run_id ORDER BY run_id",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert '"run_id": "run-a"' in out
    dt = DeltaTable(lake.uri("user_patterns"))
    con = duckdb.connect()
    con.register("user_patterns", dt.to_pyarrow_dataset())
    n = con.execute("SELECT count(*) FROM user_patterns WHERE run_id = 'run-a'").fetchone()[0]
    assert n == first["rows"]
    assert main(["--set", f"lake.root={root}", "sql", "SELEC nonsense"]) == 2


@pytest.mark.slow
def test_planted_chains_come_back_as_the_rule_behind_their_consequent(scored, daily_lake):
    """Every recommended item that is the consequent of a mined rule met in order in the
    user's recent events carries a rule (the best one), and planted chains are among them."""
    import json

    work, _ = daily_lake
    cfg, lake, *_ = scored
    planted = {
        (tuple(r["antecedent"]), r["consequent"])
        for r in json.loads((work / "data" / "truth" / "rules.json").read_text())
    }
    rules: dict[tuple[int, str], list] = {}
    for r in lake.read("segment_patterns").where("kind = 'sequential'").collect():
        rules.setdefault((r.segment_id, r.consequent), []).append(r)
    recent = {
        r.user_id: list(r.item_seq)[-cfg.score.pattern_window :]
        for r in lake.read("user_sequences").select("user_id", "item_seq").collect()
    }

    def met(ante, hist):
        it = iter(hist)
        return all(any(x == a for x in it) for a in ante)

    rows = lake.read("user_patterns").where("run_id = 'run-a'").collect()
    from_planted = 0
    for r in rows:
        candidates = [
            p
            for p in rules.get((r.segment_id, r.item_id), [])
            if met(list(p.antecedent_idx), recent[r.user_id])
        ]
        if not candidates:
            assert r.pattern is None
            continue
        assert r.pattern is not None
        assert r.pattern.confidence == max(p.confidence for p in candidates)
        from_planted += (tuple(r.pattern.antecedent), r.pattern.consequent) in planted
    assert from_planted > 0


def test_model_inputs_cut_histories_and_name_the_recent_events_in_spark(spark):
    from patternlake.scoring.score import model_inputs

    seqs = spark.createDataFrame(
        [("u", [1, 2, 3, 4, 5], [1] * 5, [0] * 5), ("v", [7], [1], [0])],
        "user_id string, item_seq array<int>, type_seq array<int>, gap_seq array<int>",
    )
    segments = spark.createDataFrame([("u", 3)], "user_id string, segment_id int")
    items = spark.createDataFrame(
        [(i, f"i{i}") for i in range(1, 8)], "item_idx int, item_id string"
    )
    rows = {r.user_id: r for r in model_inputs(seqs, segments, items, 3, 2).collect()}
    assert rows["u"].item_seq == [3, 4, 5] and rows["u"].gap_seq == [0, 0, 0]
    assert rows["u"].segment_id == 3 and rows["v"].segment_id is None
    assert dict(rows["u"].recent_names) == {4: "i4", 5: "i5"}
    assert rows["v"].item_seq == [7] and dict(rows["v"].recent_names) == {7: "i7"}  # shorter
