"""compress: each segment's latest fp32 student -> pruned, fine-tuned, int8 student.

One Spark task per segment (``students.segment_training.compress_segment``): magnitude pruning of every
large tensor at each ``compress.sparsity`` (highest first) with ``finetune_epochs`` of
distillation under the mask, then int8 packing (sparse tensors keep only their non-zero
values and a bitmask). The first sparsity whose int8 model keeps ``compress.gate`` of the
fp32 student's validation NDCG@10 wins. The int8 student is registered; it becomes the
segment's champion only if it passes that gate *and* the fp32 student was the champion
(passed the gate against the teacher), so a segment never ends up with a model that has
not passed every gate on its way.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pyspark.sql import SparkSession

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.students.distill import pinned_files, run_tasks
from patternlake.students.promotion import Candidate, Verdict, judge_segments
from patternlake.students.segment_training import compress_segment
from patternlake.students.transforms import gate, summary_row

log = logging.getLogger(__name__)


def compress(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    registry.require_store(config, "compress")
    teacher_data, tags = registry.teacher_file(config)
    files, data_version = pinned_files(lake, tags, "compress")
    students = {}
    for v in registry.student_versions(config, variant="fp32", teacher_version=tags["version"]):
        students.setdefault(int(v.tags["segment"]), v)  # newest per segment
    if not students:
        raise PatternlakeError(
            f"compress: no fp32 student of teacher v{tags['version']} yet; run `patternlake "
            "distill` first"
        )
    c = config.compress
    settings = {
        **config.students.model_dump(),
        "sparsity": c.sparsity,
        "finetune_epochs": c.finetune_epochs,
        "gate_int8": c.gate,
    }
    jobs, blobs = [], []
    for g, v in sorted(students.items()):
        jobs.append(
            {
                "segment": g,
                "files": files,
                "segment_files": lake.files("segments"),
                "settings": settings,
                "student_index": len(blobs),
            }
        )
        blobs.append(registry.version_file(config, registry.STUDENT, v.version).read_bytes())

    def task(job: dict[str, Any], teacher_data: bytes, *student_data: bytes) -> dict[str, Any]:
        return compress_segment(job, teacher_data, student_data[job["student_index"]])

    log.info("compress: %d students as Spark tasks, sparsity tried %s", len(jobs), c.sparsity)
    results = run_tasks(spark, task, jobs, [teacher_data, *blobs], config.students.parallel)
    out = judge_segments(
        lake,
        config,
        "compress",
        results,
        lambda result: judge_int8(
            config, result, students[result["segment"]], tags["version"], data_version
        ),
        tags["version"],
    )
    out["seconds"] = round(time.monotonic() - started, 1)
    log.info("compress: %d students in %.1fs", len(results), out["seconds"])
    return out


def judge_int8(
    config: Config, result: dict[str, Any], fp32: Any, teacher_version: str, data_version: int
) -> Verdict:
    """Register one segment's pruned int8 student, gate it against its fp32 model and make it
    the champion when it passes and that fp32 model is the champion now."""
    c = config.compress
    segment = result["segment"]
    params = int(fp32.tags.get("params", 0))
    version = Candidate(
        segment=segment,
        variant="int8",
        model=result["model"],
        run_tags={
            "data.version": data_version,
            "teacher.version": teacher_version,
            "fp32.version": fp32.version,
        },
        run_params={
            "sparsity": result["sparsity"],
            "finetune_epochs": c.finetune_epochs,
            "runtime": c.runtime,
        },
        run_metrics={
            "int8_valid_ndcg_at_10": result["int8_valid_ndcg@10"],
            "fp32_valid_ndcg_at_10": result["fp32_valid_ndcg@10"],
            "sparsity_reached": result["sparsity_reached"],
            "int8_bytes": result["int8_bytes"],
            "fp32_bytes": result["fp32_bytes"],
            "int8_ms_per_1000_users": result["int8_ms_per_1000_users"],
        },
        version_tags={
            "params": params,
            "bytes": result["int8_bytes"],
            "valid_ndcg_at_10": round(result["int8_valid_ndcg@10"], 6),
            "sparsity": result["sparsity_reached"],
            "fp32_version": fp32.version,
            "teacher_version": teacher_version,
            "data_version": data_version,
        },
        texts={"tried.json": json.dumps(result["tried"], indent=1)},
    ).register(config)
    decision = gate(
        result["int8_valid_ndcg@10"],
        result["fp32_valid_ndcg@10"],
        c.gate,
        result["valid_users"],
        config.students.min_users,
    )
    current = registry.champion_version(config, segment)
    fp32_is_champion = current is not None and str(current.version) == str(fp32.version)
    promoted = decision.passed and fp32_is_champion
    reason = decision.reason
    if not fp32_is_champion:
        reason += "; not promoted: its fp32 student is not the champion"
    if promoted:
        registry.set_champion(config, segment, version)
        champion = f"student-int8 v{version}"
    else:
        champion = "teacher" if current is None else f"student v{current.version}"
    log.info(
        "compress segment %d: sparsity %.2f, %d -> %d bytes (%.1fx), validation NDCG@10 "
        "%.4f vs fp32 %.4f: %s -> champion %s",
        segment,
        result["sparsity_reached"],
        result["fp32_bytes"],
        result["int8_bytes"],
        result["fp32_bytes"] / max(result["int8_bytes"], 1),
        result["int8_valid_ndcg@10"],
        result["fp32_valid_ndcg@10"],
        "promoted" if promoted else "not promoted",
        champion,
    )
    return Verdict(
        stage="compress",
        segment=segment,
        variant="int8",
        valid_users=result["valid_users"],
        reference=f"student v{fp32.version}",
        reference_ndcg=result["fp32_valid_ndcg@10"],
        threshold=c.gate,
        promoted=promoted,
        champion=champion,
        reason=reason,
        details=summary_row(result) | {"tried": result["tried"]},
        registered_version=version,
        params=params,
        bytes=result["int8_bytes"],
        model_ndcg=result["int8_valid_ndcg@10"],
        ratio=decision.ratio,
    )
