"""distill: the registered teacher + ``user_sequences`` + ``segments`` -> one student per
segment, registered, gated and recorded in ``model_decisions``.

The students train in parallel as Spark tasks, one per segment (``students.segment_training``): the
teacher's weights go out as a broadcast variable, the model bytes come back with the
task's numbers. The data is the ``user_sequences`` version the teacher was trained on.
A student whose validation NDCG@10 on its segment's users is below ``students.gate`` x the
teacher's on the same users is registered but not promoted: the segment keeps the teacher.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.models.teacher import teacher_from_bytes
from patternlake.progress import progress
from patternlake.sequence_schema import pinned_sequence_files
from patternlake.students.segment_training import distill_segment
from patternlake.students.transforms import gate, summary_row

log = logging.getLogger(__name__)


def pinned_files(lake: Lake, tags: dict[str, str], stage: str) -> tuple[list[str], int]:
    """The files of the user_sequences version the teacher was trained on, and the version."""
    if "data.version" not in tags:
        version = lake.version("user_sequences")
        return lake.files("user_sequences", version), version
    version = int(tags["data.version"])
    return pinned_sequence_files(lake, version, stage), version


def segment_ids(lake: Lake) -> list[int]:
    return sorted(r[0] for r in lake.read("segments").select("segment_id").distinct().collect())


def run_tasks(
    spark: SparkSession, fn: Any, jobs: list[dict[str, Any]], shared: list[bytes], parallel: int
) -> list[dict[str, Any]]:
    """``fn(job, *shared)`` for every job, one Spark task each (``parallel`` at once, 0: all);
    ``shared`` travel as broadcast variables."""
    sc = spark.sparkContext
    values = [sc.broadcast(b) for b in shared]
    rdd = sc.parallelize(jobs, len(jobs))
    if parallel and parallel < len(jobs):
        rdd = rdd.coalesce(parallel)  # fewer tasks, each running several segments in turn

    def run(part):
        for job in part:
            yield fn(job, *(v.value for v in values))

    try:
        return rdd.mapPartitions(run).collect()
    finally:
        for v in values:
            v.unpersist()


def write_decisions(lake: Lake, rows: list[dict[str, Any]]) -> None:
    table = contract("model_decisions")
    df = lake.spark.createDataFrame(
        [tuple(r.get(c) for c in table.names) for r in rows], table.ddl()
    )
    lake.write(df, "model_decisions", "append")


def distill(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    import mlflow

    started = time.monotonic()
    teacher_data, tags = registry.teacher_file(config)
    teacher = teacher_from_bytes(teacher_data)
    files, data_version = pinned_files(lake, tags, "distill")
    segs = segment_ids(lake)
    if not segs:
        raise PatternlakeError("distill: segments is empty; run `patternlake segment` first")
    s = config.students
    settings = {**s.model_dump(), "sparsity": [], "finetune_epochs": 0}
    budget = int(s.max_param_ratio * teacher.num_params())
    jobs = [
        {
            "segment": g,
            "files": files,
            "segment_files": lake.files("segments"),
            "settings": settings,
            "budget": budget,
        }
        for g in segs
    ]
    log.info(
        "distill: %d segments as Spark tasks, teacher v%s (%d params, budget %d), data "
        "user_sequences@v%d",
        len(segs),
        tags["version"],
        teacher.num_params(),
        budget,
        data_version,
    )
    results = run_tasks(spark, distill_segment, jobs, [teacher_data], s.parallel)
    now = datetime.now(UTC)
    from patternlake.registry import use_experiment

    use_experiment(config)
    decisions, out = [], {"segments": {}, "teacher_version": tags["version"]}
    for r in progress(
        sorted(results, key=lambda r: r["segment"]), desc="distill: register", unit="segment"
    ):
        g = r["segment"]
        row = {
            "decided_at": now,
            "stage": "distill",
            "segment_id": g,
            "model": "student",
            "variant": "fp32",
            "valid_users": r["valid_users"],
            "reference": "teacher",
            "reference_ndcg_at_10": r["teacher_valid_ndcg@10"],
            "threshold": s.gate,
        }
        if "error" in r:
            registry.set_champion(config, g, None)
            decisions.append(
                {
                    **row,
                    "promoted": False,
                    "champion": "teacher",
                    "reason": r["error"],
                    "details": json.dumps(summary_row(r)),
                }
            )
            out["segments"][g] = {**summary_row(r), "champion": "teacher"}
            log.warning("distill segment %d: %s; the teacher serves it", g, r["error"])
            continue
        with mlflow.start_run(run_name=f"student-{g}") as run:
            mlflow.set_tags(
                {
                    "patternlake.role": "student",
                    "segment": g,
                    "variant": "fp32",
                    "data.version": data_version,
                    "teacher.version": tags["version"],
                }
            )
            mlflow.log_params({f"model.{k}": v for k, v in r["config"].items()})
            mlflow.log_params(
                {
                    "loss": s.loss,
                    "temperature": s.temperature,
                    "alpha": s.alpha,
                    "catalogue_share": s.catalogue_share,
                    "budget": budget,
                }
            )
            for h in r["history"]:
                mlflow.log_metrics(
                    {"train_loss": h["loss"], "valid_ndcg_at_10": h["valid_ndcg@10"]},
                    step=h["epoch"],
                )
            mlflow.log_metrics(
                {
                    "best_valid_ndcg_at_10": r["best_valid_ndcg@10"],
                    "teacher_valid_ndcg_at_10": r["teacher_valid_ndcg@10"],
                    "params": r["params"],
                    "bytes": r["bytes"],
                    "ms_per_1000_users": r["ms_per_1000_users"],
                }
            )
            with tempfile.TemporaryDirectory(prefix="pl-student-") as tmp:
                path = Path(tmp) / "student.safetensors"
                path.write_bytes(r["model"])
                mlflow.log_artifact(str(path), artifact_path="model")
            version = registry.register(
                config,
                run.info.run_id,
                "model",
                {
                    "segment": g,
                    "variant": "fp32",
                    "params": r["params"],
                    "bytes": r["bytes"],
                    "valid_ndcg_at_10": round(r["best_valid_ndcg@10"], 6),
                    "teacher_version": tags["version"],
                    "data_version": data_version,
                },
            )
        decision = gate(
            r["best_valid_ndcg@10"],
            r["teacher_valid_ndcg@10"],
            s.gate,
            r["valid_users"],
            s.min_users,
        )
        registry.set_champion(config, g, version if decision.passed else None)
        champion = f"student v{version}" if decision.passed else "teacher"
        decisions.append(
            {
                **row,
                "registered_version": version,
                "params": r["params"],
                "bytes": r["bytes"],
                "model_ndcg_at_10": r["best_valid_ndcg@10"],
                "ratio": decision.ratio,
                "promoted": decision.passed,
                "champion": champion,
                "reason": decision.reason,
                "details": json.dumps(summary_row(r)),
            }
        )
        out["segments"][g] = {
            **summary_row(r),
            "registered_version": version,
            "promoted": decision.passed,
            "champion": champion,
        }
        log.info(
            "distill segment %d: %d users, student %d params (teacher %d), validation NDCG@10 "
            "%.4f vs teacher %.4f (%.0f%%): %s -> champion %s",
            g,
            r["users"],
            r["params"],
            r["teacher_params"],
            r["best_valid_ndcg@10"],
            r["teacher_valid_ndcg@10"],
            100 * (decision.ratio or 0),
            "promoted" if decision.passed else "not promoted",
            champion,
        )
    write_decisions(lake, decisions)
    out["seconds"] = round(time.monotonic() - started, 1)
    log.info("distill: %d students in %.1fs", len(results), out["seconds"])
    return out
