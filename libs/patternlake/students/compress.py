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
from patternlake.progress import progress
from patternlake.students.distill import pinned_files, run_tasks, write_decisions
from patternlake.students.segment_training import compress_segment
from patternlake.students.transforms import gate, summary_row

log = logging.getLogger(__name__)


def compress(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    import mlflow

    from patternlake.registry import use_experiment

    started = time.monotonic()
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
    use_experiment(config)
    now = datetime.now(UTC)
    decisions, out = [], {"segments": {}, "teacher_version": tags["version"]}
    for r in progress(
        sorted(results, key=lambda r: r["segment"]), desc="compress: register", unit="segment"
    ):
        g = r["segment"]
        fp32 = students[g]
        with mlflow.start_run(run_name=f"student-int8-{g}") as run:
            mlflow.set_tags(
                {
                    "patternlake.role": "student",
                    "segment": g,
                    "variant": "int8",
                    "data.version": data_version,
                    "teacher.version": tags["version"],
                    "fp32.version": fp32.version,
                }
            )
            mlflow.log_params(
                {
                    "sparsity": r["sparsity"],
                    "finetune_epochs": c.finetune_epochs,
                    "runtime": c.runtime,
                }
            )
            mlflow.log_metrics(
                {
                    "int8_valid_ndcg_at_10": r["int8_valid_ndcg@10"],
                    "fp32_valid_ndcg_at_10": r["fp32_valid_ndcg@10"],
                    "sparsity_reached": r["sparsity_reached"],
                    "int8_bytes": r["int8_bytes"],
                    "fp32_bytes": r["fp32_bytes"],
                    "int8_ms_per_1000_users": r["int8_ms_per_1000_users"],
                }
            )
            mlflow.log_text(json.dumps(r["tried"], indent=1), "tried.json")
            with tempfile.TemporaryDirectory(prefix="pl-int8-") as tmp:
                path = Path(tmp) / "student-int8.safetensors"
                path.write_bytes(r["model"])
                mlflow.log_artifact(str(path), artifact_path="model")
            params = int(fp32.tags.get("params", 0))
            version = registry.register(
                config,
                run.info.run_id,
                "model",
                {
                    "segment": g,
                    "variant": "int8",
                    "params": params,
                    "bytes": r["int8_bytes"],
                    "valid_ndcg_at_10": round(r["int8_valid_ndcg@10"], 6),
                    "sparsity": r["sparsity_reached"],
                    "fp32_version": fp32.version,
                    "teacher_version": tags["version"],
                    "data_version": data_version,
                },
            )
        decision = gate(
            r["int8_valid_ndcg@10"],
            r["fp32_valid_ndcg@10"],
            c.gate,
            r["valid_users"],
            config.students.min_users,
        )
        current = registry.champion_version(config, g)
        fp32_is_champion = current is not None and str(current.version) == str(fp32.version)
        promoted = decision.passed and fp32_is_champion
        reason = (
            decision.reason
            if fp32_is_champion
            else (f"{decision.reason}; not promoted: its fp32 student is not the champion")
        )
        if promoted:
            registry.set_champion(config, g, version)
        champion = (
            f"student-int8 v{version}"
            if promoted
            else f"student v{current.version}"
            if current is not None
            else "teacher"
        )
        decisions.append(
            {
                "decided_at": now,
                "stage": "compress",
                "segment_id": g,
                "model": "student",
                "variant": "int8",
                "registered_version": version,
                "params": params,
                "bytes": r["int8_bytes"],
                "valid_users": r["valid_users"],
                "reference": f"student v{fp32.version}",
                "reference_ndcg_at_10": r["fp32_valid_ndcg@10"],
                "model_ndcg_at_10": r["int8_valid_ndcg@10"],
                "ratio": decision.ratio,
                "threshold": c.gate,
                "promoted": promoted,
                "champion": champion,
                "reason": reason,
                "details": json.dumps(summary_row(r) | {"tried": r["tried"]}),
            }
        )
        out["segments"][g] = {
            **summary_row(r),
            "tried": r["tried"],
            "registered_version": version,
            "promoted": promoted,
            "champion": champion,
        }
        log.info(
            "compress segment %d: sparsity %.2f, %d -> %d bytes (%.1fx), validation NDCG@10 "
            "%.4f vs fp32 %.4f: %s -> champion %s",
            g,
            r["sparsity_reached"],
            r["fp32_bytes"],
            r["int8_bytes"],
            r["fp32_bytes"] / max(r["int8_bytes"], 1),
            r["int8_valid_ndcg@10"],
            r["fp32_valid_ndcg@10"],
            "promoted" if promoted else "not promoted",
            champion,
        )
    write_decisions(lake, decisions)
    out["seconds"] = round(time.monotonic() - started, 1)
    log.info("compress: %d students in %.1fs", len(results), out["seconds"])
    return out
