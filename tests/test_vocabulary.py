"""The vocabulary of ``user_sequences`` (event types, gap buckets, ``max_len``) is recorded
with the table, in every version, and training reads it from there rather than from conf."""

from __future__ import annotations

import logging

import pytest

from patternlake.lake import Lake
from patternlake.models.train_spec import build_spec
from patternlake.sequence_schema import (
    GAP_BUCKETS,
    GAP_EDGES,
    VOCABULARY_KEY,
    SequenceVocabulary,
    read_vocabulary,
    sequence_vocabulary,
)
from tests.conftest import in_folder

COLUMNS = (  # the NOT NULL columns of user_sequences' contract (lake/catalog.py) and the split
    "user_id string, n_events int, item_seq array<int>, type_seq array<int>, "
    "gap_seq array<int>, time_seq array<bigint>, valid_item int, test_item int"
)
BUILT = SequenceVocabulary(("view", "cart", "buy"), max_len=40)


def sequences(spark, *users: str):
    rows = [(u, 3, [1, 2, 3], [1, 3, 2], [0, 2, 7], [0, 60, 700_000], 2, 3) for u in users]
    return spark.createDataFrame(rows, COLUMNS)


@pytest.fixture
def lake(spark, config, tmp_path):
    return Lake(spark, config.lake.model_copy(update={"root": str(tmp_path)}))


def test_a_vocabulary_counts_its_ids_and_comes_from_conf_as_featurize_builds_it(config):
    assert BUILT.n_types == 4 and BUILT.gap_buckets == GAP_BUCKETS == len(GAP_EDGES) + 2
    conf = SequenceVocabulary.from_config(config)
    assert conf.event_types == tuple(config.validate_.allowed_event_types)
    assert conf.max_len == config.features.max_history and conf.gap_edges == GAP_EDGES


def test_the_vocabulary_rides_on_the_columns_it_describes(spark):
    plain = sequences(spark, "u1")
    assert SequenceVocabulary.from_schema(plain.schema) is None
    commented = plain.withMetadata("type_seq", {"comment": "event type ids"})
    schema = BUILT.attach(commented).schema
    assert SequenceVocabulary.from_schema(schema) == BUILT
    assert schema["type_seq"].metadata == {
        "comment": "event type ids",  # other metadata is kept
        VOCABULARY_KEY: {"event_types": ["view", "cart", "buy"]},
    }
    assert schema["gap_seq"].metadata == {VOCABULARY_KEY: {"gap_edges": list(GAP_EDGES)}}
    assert schema["item_seq"].metadata == {VOCABULARY_KEY: {"max_len": 40}}
    assert schema["user_id"].metadata == {}


def test_every_version_keeps_the_vocabulary_it_was_built_with(spark, lake):
    built = lake.write(
        BUILT.attach(sequences(spark, "u1", "u2")), "user_sequences", "overwrite",
        overwrite_schema=True,
    )  # fmt: skip
    merged = lake.merge(sequences(spark, "u3"), "user_sequences", keys=["user_id"])  # plain rows
    assert lake.delete("user_sequences", "user_id = 'u1'") == 1
    rewritten = lake.version("user_sequences")
    assert (built, merged, rewritten) == (0, 1, 2)
    assert [read_vocabulary(lake, v) for v in (0, 1, 2)] == [BUILT] * 3
    assert read_vocabulary(lake) == BUILT

    rebuilt = SequenceVocabulary(("view",), max_len=10)
    lake.write(
        rebuilt.attach(sequences(spark, "u9")), "user_sequences", "overwrite",
        overwrite_schema=True,
    )  # fmt: skip
    assert read_vocabulary(lake) == rebuilt and read_vocabulary(lake, 2) == BUILT
    lake.expire_history("user_sequences")  # the log of older versions goes, the schema stays
    assert read_vocabulary(lake) == rebuilt


def test_training_takes_type_and_gap_ids_from_the_table_not_from_conf(
    spark, config, tmp_path, caplog
):
    cfg = in_folder(config, tmp_path)
    lake = Lake(spark, cfg.lake)
    items = spark.createDataFrame([("a", 1), ("b", 2), ("c", 3)], "item_id string, item_idx int")
    lake.write(items, "item_index", "overwrite")
    lake.write(
        BUILT.attach(sequences(spark, "u1", "u2")), "user_sequences", "overwrite",
        overwrite_schema=True,
    )  # fmt: skip
    conf_types = len(cfg.validate_.allowed_event_types) + 1
    assert conf_types != BUILT.n_types

    spec = build_spec(lake, cfg, "single")
    assert spec.model["n_types"] == BUILT.n_types and spec.model["n_gaps"] == GAP_BUCKETS
    assert spec.data_version == 0

    # a version written before featurize recorded the vocabulary: conf's, and a warning
    lake.write(sequences(spark, "u1"), "user_sequences", "overwrite", overwrite_schema=True)
    with caplog.at_level(logging.WARNING, logger="patternlake.sequence_schema"):
        spec = build_spec(lake, cfg, "single")
    assert spec.model["n_types"] == conf_types
    assert "user_sequences v1 records no vocabulary" in caplog.text
    assert sequence_vocabulary(lake, cfg, 0) == BUILT  # time travel reads the recorded one
