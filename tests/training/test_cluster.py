"""A real Spark standalone cluster on 127.0.0.1: a master, two workers, and the jobs sent
to it with spark-submit (featurize, then Horovod teacher training: `horovod.spark.run`,
one Spark task per process, started with mapPartitionsWithIndex)."""

import json
from pathlib import Path

import pytest

from patternlake.ingest.ingest import ingest
from patternlake.lake import Lake
from patternlake.quality.validate import validate_pending
from tests.cluster import spark_submit


@pytest.mark.slow
def test_featurize_and_horovod_training_through_spark_submit_on_a_standalone_cluster(
    spark, config, small_events, cluster, tmp_path
):
    url, env, _ = cluster
    cfg = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(tmp_path / "lake")})}
    )
    lake = Lake(spark, cfg.lake)
    ingest(spark, lake, cfg, str(small_events / "events"))
    validate_pending(spark, lake, cfg)

    common = [
        "--conf",
        "local",
        "--set",
        f"lake.root={tmp_path / 'lake'}",
        "--set",
        f"models.root={tmp_path / 'models'}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        "--set",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
    ]
    out = spark_submit(url, env, "featurize.py", *common)
    assert json.loads(out.strip().splitlines()[-1])["users_updated"] == 300
    assert lake.read("user_sequences").count() == 300

    out = spark_submit(
        url,
        env,
        "train.py",
        *common,
        "--backend",
        "horovod",
        "--set",
        "train.num_proc=2",
        "--set",
        "train.epochs=3",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["world"] == 2 and result["backend"] == "horovod"
    assert len(result["history"]) == 3 and result["best_valid_ndcg@10"] > 0
    assert Path(result["best_path"]).is_file()
    # both Horovod ranks ran as tasks on the cluster's executors, not in the driver
    executors = list((tmp_path).glob("work*/app-*/*/stderr"))
    assert len(executors) >= 2
