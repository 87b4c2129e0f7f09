import shutil

import pytest
from pyspark.sql import functions as F

from patternlake.features.featurize import featurize
from patternlake.features.transforms import GAP_EDGES
from patternlake.ingest.ingest import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from patternlake.sequence_schema import SequenceVocabulary, read_vocabulary
from tests.conftest import with_overrides

TABLES = {"item_index": "item_id", "user_sequences": "user_id", "user_features": "user_id"}


def rows(lake, table):
    return sorted(
        (r.asDict(recursive=True) for r in lake.read(table).collect()),
        key=lambda r: r[TABLES[table]],
    )


@pytest.fixture(scope="module")
def two_batch_lakes(spark, config, small_events, tmp_path_factory):
    """The same two daily batches featurized incrementally (after each) and fully (once)."""
    files = sorted((small_events / "events").iterdir())
    lakes = {}
    for mode in ("incremental", "full"):
        root = tmp_path_factory.mktemp(mode)
        cfg = config.model_copy(update={"lake": config.lake.model_copy(update={"root": str(root)})})
        lake = Lake(spark, cfg.lake)
        results = []
        for f in files:
            ingest(spark, lake, cfg, str(f))
            validate_pending(spark, lake, cfg)
            if mode == "incremental":
                results.append(featurize(spark, lake, cfg))
        if mode == "full":
            results.append(featurize(spark, lake, cfg, full=True))
        lakes[mode] = (cfg, lake, results)
    return lakes


def test_incremental_featurize_equals_a_full_rebuild(two_batch_lakes):
    _, inc, inc_results = two_batch_lakes["incremental"]
    _, full, _ = two_batch_lakes["full"]
    assert [r.mode for r in inc_results] == [
        "full",
        "incremental",
    ]  # first run builds, second updates
    second = inc_results[1]
    assert 0 < second.users_updated < 300  # only users touched by the new batch
    for table in TABLES:
        assert rows(inc, table) == rows(full, table), table


def test_item_ids_are_stable_and_new_items_are_appended(two_batch_lakes):
    _, lake, results = two_batch_lakes["incremental"]
    index = lake.read("item_index")
    first_version = {r.item_id: r.item_idx for r in lake.read("item_index", version=0).collect()}
    now = {r.item_id: r.item_idx for r in index.collect()}
    assert all(now[i] == idx for i, idx in first_version.items())
    assert sorted(now.values()) == list(range(1, len(now) + 1))  # dense, 0 is padding
    assert len(now) - len(first_version) == results[1].new_items


def test_sequences_follow_the_protocol(two_batch_lakes):
    config, lake, _ = two_batch_lakes["incremental"]
    silver = lake.read("silver_events")
    index = {r.item_id: r.item_idx for r in lake.read("item_index").collect()}
    user = silver.groupBy("user_id").count().orderBy(F.desc("count")).first().user_id
    events = sorted(
        silver.filter(F.col("user_id") == user).collect(), key=lambda r: (r.event_time, r.event_id)
    )
    seq = lake.read("user_sequences").filter(F.col("user_id") == user).first()
    n = config.features.max_history
    assert seq.n_events == len(events) > n
    assert seq.item_seq == [index[e.item_id] for e in events[-n:]]
    assert (seq.valid_item, seq.test_item) == (seq.item_seq[-2], seq.item_seq[-1])
    types = config.validate_.allowed_event_types
    assert seq.type_seq == [types.index(e.event_type) + 1 for e in events[-n:]]
    gaps = [
        (b.event_time - a.event_time).total_seconds()
        for a, b in zip(events, events[1:], strict=False)
    ][-n:]
    expected = [1 + sum(g >= edge for edge in GAP_EDGES) for g in gaps]
    assert seq.gap_seq == expected
    short = lake.read("user_sequences").filter("n_events < 3").collect()
    assert all(r.valid_item is None and r.test_item is None for r in short)


def test_features_describe_the_user(two_batch_lakes):
    config, lake, _ = two_batch_lakes["incremental"]
    silver = lake.read("silver_events")
    user = silver.first().user_id
    events = silver.filter(F.col("user_id") == user).collect()
    f = lake.read("user_features").filter(F.col("user_id") == user).first()
    assert f.n_events == len(events)
    assert f.n_items == len({e.item_id for e in events})
    assert f.share_view == pytest.approx(sum(e.event_type == "view" for e in events) / len(events))
    cats = {}
    for e in events:
        cats[e.properties["category"]] = cats.get(e.properties["category"], 0) + 1
    assert f.category_counts == cats
    assert f.top_categories[0] == max(cats, key=lambda c: (cats[c], -ord(c[-1])))
    assert 1 <= f.n_sessions <= f.n_events


def test_featurize_again_is_a_noop(spark, two_batch_lakes):
    config, lake, _ = two_batch_lakes["incremental"]
    before = {t: lake.version(t) for t in TABLES}
    assert featurize(spark, lake, config).mode == "noop"
    assert {t: lake.version(t) for t in TABLES} == before


def test_every_version_of_user_sequences_records_its_vocabulary(two_batch_lakes):
    cfg, lake, _ = two_batch_lakes["incremental"]
    want = SequenceVocabulary(
        tuple(cfg.validate_.allowed_event_types), cfg.features.max_history, GAP_EDGES
    )
    versions = list(range(lake.version("user_sequences") + 1))
    assert versions == [0, 1]  # the first run's overwrite, the second's merge
    assert [read_vocabulary(lake, v) for v in versions] == [want, want]


def test_a_changed_vocabulary_rebuilds_everything(spark, two_batch_lakes, tmp_path):
    cfg, lake, _ = two_batch_lakes["full"]
    shutil.copytree(lake.root, tmp_path / "lake")
    cfg = with_overrides(cfg, lake={"root": str(tmp_path / "lake")}, features={"max_history": 4})
    copy = Lake(spark, cfg.lake)
    result = featurize(spark, copy, cfg)  # no new batch, but conf keeps fewer events now
    assert result.mode == "full" and result.users_updated == 300
    assert read_vocabulary(copy).max_len == 4
    assert (
        max(r.n for r in copy.read("user_sequences").selectExpr("size(item_seq) n").collect()) == 4
    )
    assert featurize(spark, copy, cfg).mode == "noop"


def test_tied_times_keep_the_order_of_the_source_file(spark, stage, tmp_path):
    """MovieLens-style data has many events in the same second: their order must be the
    order of the lines in the file (then earlier batch first), not the event-id hash."""
    cfg, lake = stage
    items = ["z9", "a1", "m5", "b2", "y8", "c3", "q7"]
    lines = ["user\titem\trating\tts"]
    lines += [f"u1\t{item}\t4\t881250949" for item in items]  # seven events, one second
    lines += [f"u2\t{item}\t3\t881250949" for item in reversed(items)]
    first = tmp_path / "day1.tsv"
    first.write_text("\n".join(lines) + "\n")
    second = tmp_path / "day2.tsv"  # a later batch with the same second: after day 1
    second.write_text("user\titem\trating\tts\nu1\tk0\t5\t881250949\n")
    mapping = {"user_id": "user", "item_id": "item", "event_time": "ts"}
    for f in (first, second):
        ingest(spark, lake, cfg, str(f), fmt="tsv", mapping=mapping)
        validate_pending(spark, lake, cfg)
    featurize(spark, lake, cfg)
    name = {r.item_idx: r.item_id for r in lake.read("item_index").collect()}
    seqs = {r.user_id: [name[i] for i in r.item_seq] for r in lake.read("user_sequences").collect()}
    assert seqs["u1"] == [*items, "k0"]
    assert seqs["u2"] == list(reversed(items))


def _tsv(path, rows):
    path.write_text("user\titem\tts\ttype\tcategory\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("lookup", ["broadcast", "shuffle"])
def test_appended_days_equal_a_full_rebuild(spark, config, tmp_path, lookup, monkeypatch):
    """Days featurized one at a time (new events appended to the stored rows) give what one
    full run over the same days gives, in every case a day can bring: later events (with a
    tie on the stored last second, a session gap, a new day, repeated and new items), an
    event older than the stored history (that user is rebuilt from silver), a new user, an
    untouched user, and a user whose stored sequence is cut at max_history. Both ways of
    finding the touched users' stored rows: broadcast ids (a small
    day) and shuffles (a day with more users than BROADCAST_USERS)."""
    if lookup == "shuffle":
        from patternlake.features import featurize as featurize_module

        monkeypatch.setattr(featurize_module, "BROADCAST_USERS", -1)
    day = 86_400
    t0 = 1_767_225_600  # 2026-01-01
    day1 = [
        ("u1", "a", str(t0), "view", "x"),
        ("u1", "b", str(t0 + 60), "click", "y"),
        ("u1", "c", str(t0 + 120), "view", "x"),
        ("u2", "a", str(t0 + 5 * day), "view", "x"),
        ("u2", "d", str(t0 + 5 * day + 30), "buy", "z"),
        ("u4", "e", str(t0 + 10), "view", "y"),
        *[("u5", f"i{k}" if k < 2 else "r", str(t0 + 600 * k), "view", "x") for k in range(7)],
    ]
    day2 = [
        ("u1", "z", str(t0 + 120), "cart", "x"),  # same second as the stored last event
        ("u1", "a", str(t0 + day + 7200), "view", ""),  # a new day, a new session, no category
        ("u1", "f", str(t0 + day + 7260), "buy", "w"),
        ("u2", "g", str(t0 + day), "view", "y"),  # before u2's stored history: late
        ("u3", "h", str(t0 + 2 * day), "view", "x"),  # a new user
        ("u3", "h", str(t0 + 2 * day + 5), "click", "x"),
        ("u5", "i1", str(t0 + 600 * 8), "view", "x"),  # only before the kept 5: a seen item
        ("u5", "i9", str(t0 + 600 * 9), "view", "y"),
    ]
    day3 = [("u1", "b", str(t0 + 3 * day), "view", "y"), ("u5", "i0", str(t0 + 6000), "view", "x")]
    files = [_tsv(tmp_path / f"day{i}.tsv", d) for i, d in enumerate((day1, day2, day3), 1)]
    mapping = {"user_id": "user", "item_id": "item", "event_time": "ts", "event_type": "type"}
    out = {}
    for mode in ("appended", "full"):
        cfg = with_overrides(
            config.model_copy(
                update={"lake": config.lake.model_copy(update={"root": str(tmp_path / mode)})}
            ),
            features={"max_history": 5},
        )
        lake = Lake(spark, cfg.lake)
        modes = []
        for f in files:
            ingest(spark, lake, cfg, str(f), fmt="tsv", mapping=mapping)
            validate_pending(spark, lake, cfg)
            if mode == "appended":
                modes.append(featurize(spark, lake, cfg).mode)
        if mode == "full":
            modes.append(featurize(spark, lake, cfg, full=True).mode)
        out[mode] = (lake, modes)
    lake, modes = out["appended"]
    assert modes == ["full", "incremental", "incremental"]
    full, _ = out["full"]
    for table in TABLES:
        assert rows(lake, table) == rows(full, table), table
    seqs = {r.user_id: r for r in lake.read("user_sequences").collect()}
    feats = {r.user_id: r for r in lake.read("user_features").collect()}
    name = {r.item_idx: r.item_id for r in lake.read("item_index").collect()}
    assert [name[i] for i in seqs["u1"].item_seq] == ["c", "z", "a", "f", "b"]  # last 5 of 7
    assert (feats["u1"].n_events, feats["u1"].n_items, feats["u1"].active_days) == (7, 5, 3)
    assert feats["u1"].n_sessions == 3 and feats["u1"].category_counts == {"x": 3, "y": 2, "w": 1}
    assert [name[i] for i in seqs["u2"].item_seq] == ["g", "a", "d"]  # the late event first
    assert (feats["u5"].n_events, feats["u5"].n_items) == (10, 4)  # i0, i1, r, i9
