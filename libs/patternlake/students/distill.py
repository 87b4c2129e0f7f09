"""distill: the registered teacher + ``user_sequences`` + ``segments`` -> one student per
segment, registered, gated and recorded in ``model_decisions``.

The students train in parallel as Spark tasks, one per segment (``students.segment_training``): the
teacher's weights go out as a broadcast variable, the model bytes come back with the
task's numbers. The data is the ``user_sequences`` version the teacher was trained on.
A student whose validation NDCG@10 on its segment's users is below ``students.gate`` x the
teacher's on the same users is registered but not promoted: the segment keeps the teacher.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pyspark.sql import SparkSession

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.teacher import teacher_from_bytes
from patternlake.sequence_schema import pinned_sequence_files
from patternlake.students.promotion import Candidate, Verdict, judge_segments
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


def distill(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    registry.require_store(config, "distill")
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
    out = judge_segments(
        lake,
        config,
        "distill",
        results,
        lambda result: judge_student(config, result, tags["version"], data_version, budget),
        tags["version"],
    )
    out["seconds"] = round(time.monotonic() - started, 1)
    log.info("distill: %d students in %.1fs", len(results), out["seconds"])
    return out


def judge_student(
    config: Config, result: dict[str, Any], teacher_version: str, data_version: int, budget: int
) -> Verdict:
    """Register one segment's student, gate it against the teacher on the segment's
    validation users and make it the segment's champion when it passes (else the teacher
    serves the segment)."""
    s = config.students
    segment = result["segment"]
    verdict = {
        "stage": "distill",
        "segment": segment,
        "variant": "fp32",
        "valid_users": result["valid_users"],
        "reference": "teacher",
        "reference_ndcg": result["teacher_valid_ndcg@10"],
        "threshold": s.gate,
        "details": summary_row(result),
    }
    if "error" in result:
        registry.set_champion(config, segment, None)
        log.warning("distill segment %d: %s; the teacher serves it", segment, result["error"])
        return Verdict(**verdict, promoted=False, champion="teacher", reason=result["error"])
    candidate = Candidate(
        segment=segment,
        variant="fp32",
        model=result["model"],
        run_tags={"data.version": data_version, "teacher.version": teacher_version},
        run_params={f"model.{k}": v for k, v in result["config"].items()}
        | {
            "loss": s.loss,
            "temperature": s.temperature,
            "alpha": s.alpha,
            "catalogue_share": s.catalogue_share,
            "budget": budget,
        },
        run_metrics={
            "best_valid_ndcg_at_10": result["best_valid_ndcg@10"],
            "teacher_valid_ndcg_at_10": result["teacher_valid_ndcg@10"],
            "params": result["params"],
            "bytes": result["bytes"],
            "ms_per_1000_users": result["ms_per_1000_users"],
        },
        version_tags={
            "params": result["params"],
            "bytes": result["bytes"],
            "valid_ndcg_at_10": round(result["best_valid_ndcg@10"], 6),
            "teacher_version": teacher_version,
            "data_version": data_version,
        },
        history=tuple(result["history"]),
    )
    version = candidate.register(config)
    decision = gate(
        result["best_valid_ndcg@10"],
        result["teacher_valid_ndcg@10"],
        s.gate,
        result["valid_users"],
        s.min_users,
    )
    registry.set_champion(config, segment, version if decision.passed else None)
    champion = f"student v{version}" if decision.passed else "teacher"
    log.info(
        "distill segment %d: %d users, student %d params (teacher %d), validation NDCG@10 "
        "%.4f vs teacher %.4f (%.0f%%): %s -> champion %s",
        segment,
        result["users"],
        result["params"],
        result["teacher_params"],
        result["best_valid_ndcg@10"],
        result["teacher_valid_ndcg@10"],
        100 * (decision.ratio or 0),
        "promoted" if decision.passed else "not promoted",
        champion,
    )
    return Verdict(
        **verdict,
        promoted=decision.passed,
        champion=champion,
        reason=decision.reason,
        registered_version=version,
        params=result["params"],
        bytes=result["bytes"],
        model_ndcg=result["best_valid_ndcg@10"],
        ratio=decision.ratio,
    )
