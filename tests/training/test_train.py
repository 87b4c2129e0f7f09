"""The teacher job on a small hand-made lake: a diverged run is never kept or registered,
and evaluation reads the data versions the registered teacher was trained on."""

from pathlib import Path

import pytest

from patternlake.errors import PatternlakeError
from patternlake.evaluation.evaluate import evaluate_models
from patternlake.lake import Lake
from patternlake.models.fit import train_worker
from patternlake.models.train_spec import build_spec
from patternlake.sequence_reader import ShardedSequences, read_table, training_arrays
from patternlake.training.train import train_teacher
from tests.conftest import in_folder, with_overrides
from tests.training import handmade
from tests.training.test_distributed import spec_for

SEQUENCES_DDL = (
    "user_id string, n_events int, item_seq array<int>, type_seq array<int>, "
    "gap_seq array<int>, time_seq array<bigint>, valid_item int, test_item int"
)


def write_version(spark, lake: Lake, users: range, n_items: int) -> None:
    """Overwrites item_index (items 1..n_items-1) and user_sequences (``users``, whose
    items use the whole catalogue)."""
    table = handmade.sequences(
        list(users), lambda u: 4 + u % 6, lambda u, j: 1 + (5 * u + j) % (n_items - 1)
    )
    index = [(f"i{i}", i) for i in range(1, n_items)]
    lake.write(
        spark.createDataFrame(index, "item_id string, item_idx int"), "item_index", "overwrite"
    )
    lake.write(
        spark.createDataFrame(table.to_pylist(), SEQUENCES_DDL), "user_sequences", "overwrite"
    )


@pytest.fixture
def small_lake(spark, config, tmp_path):
    cfg = in_folder(
        config,
        tmp_path,
        teacher={"max_len": 8, "d_model": 16, "n_layers": 1, "dropout": 0.0},
        train={"epochs": 2, "backend": "single", "batch_size": 32, "warmup_steps": 1},
    )
    lake = Lake(spark, cfg.lake)
    write_version(spark, lake, range(200), n_items=60)
    return cfg, lake


def registered_versions(cfg) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    return client.search_model_versions("name='teacher'")


def test_the_spec_carries_the_example_counts_counted_once_on_the_driver(small_lake):
    cfg, lake = small_lake
    spec = build_spec(lake, cfg, "horovod")
    counts = spec.example_counts
    assert (counts["max_len"], counts["stride"]) == (8, 8)
    decoded = len(training_arrays(read_table(spec.files), 8)[0])
    assert sum(counts["counts"]) == decoded > 0
    # what the ranks would have counted each, piece by piece
    assert counts["counts"] == ShardedSequences(spec.files, 0, 2, 8, 32, 7).counts.tolist()
    assert spec.batch_size == 32  # per process, as configured: not split by num_proc


def test_a_diverged_worker_stops_and_saves_no_best_model(tmp_path):
    files = handmade.layouts(tmp_path / "data", lambda u, j: 1 + (3 * u + j) % 59)["one_file"]
    spec = spec_for(files, "single", tmp_path / "checkpoints", epochs=3)
    spec.lr = float("inf")  # the first step makes every weight NaN
    result = train_worker(vars(spec))
    assert result["diverged"] and "training loss is nan" in result["diverged"]
    assert result["best_epoch"] == -1 and result["history"] == []
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # no best.pt, no checkpoint


@pytest.mark.slow
def test_a_diverged_training_run_raises_and_registers_nothing(spark, small_lake):
    cfg, lake = small_lake
    cfg = with_overrides(cfg, train={"lr": float("inf")})
    with pytest.raises(PatternlakeError, match="diverged"):
        train_teacher(spark, lake, cfg, "single")
    assert not list(Path(cfg.models.root).rglob("best.pt"))
    assert registered_versions(cfg) == []


@pytest.mark.slow
def test_evaluate_reads_the_data_versions_the_teacher_was_trained_on(spark, small_lake):
    cfg, lake = small_lake
    trained = train_teacher(spark, lake, cfg, "single")
    assert trained["data_version"] == 0
    # the catalogue grows and new users arrive after training: items 60..99 are new
    write_version(spark, lake, range(100, 400), n_items=100)
    assert lake.version("user_sequences") == 1 and lake.version("item_index") == 1

    report = evaluate_models(spark, lake, cfg)  # the registered teacher
    assert report["data_version"] == 0 and report["item_index_version"] == 0
    assert report["protocol"]["users"] == 200 and report["protocol"]["items"] == 59
    teacher = report["models"]["teacher"]["overall"]
    assert teacher["users"] == 200 and 0 <= teacher["ndcg@10"] <= 1
    # asked for explicitly, the latest data is still there to evaluate other models on
    latest = evaluate_models(spark, lake, cfg, models={})
    assert latest["data_version"] == 1 and latest["protocol"]["items"] == 99
