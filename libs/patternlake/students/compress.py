"""compress: the newest shared fp32 student of the current teacher -> a pruned int8 student.

Magnitude pruning of every large tensor at each ``compress.sparsity`` (highest first), then
int8 packing (per-row scales; sparse tensors keep only their non-zero values and a
bitmask). A candidate passes when it is faithful to the fp32 model it compresses:

* its top 10 overlaps the fp32 model's by at least ``compress.min_overlap`` on average, and
  the correlation of their scores is reported, over *every* user's validation input;
* pooled non-inferiority: the 90% lower bound of its NDCG@10 over the fp32 model's (paired
  bootstrap, the "gate" users) is at least ``compress.gate``;
* its file is within the byte budget (``students.max_bytes_ratio`` of the fp32 teacher's
  file; distill sized the student on initial weights, trained ones compress a little less).

The first sparsity that passes wins. The int8 student is registered; it becomes a segment's
champion only where the fp32 student is the champion now and the segment's harm guard
against the teacher passes, so a segment never ends up with a model that has not passed
every gate on its way.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from pyspark.sql import SparkSession

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.student import from_bytes, large_tensors, quantized_bytes
from patternlake.models.teacher import TeacherScorer, teacher_from_bytes
from patternlake.students import gates
from patternlake.students.distill import SHARED, GateUsers, pinned_files, segment_guards
from patternlake.students.promotion import Candidate, Verdict, record
from patternlake.students.transforms import magnitude_masks

log = logging.getLogger(__name__)


def prune(model: Any, sparsity: float) -> Any:
    """A copy of ``model`` with the ``sparsity`` share of each large tensor's smallest
    weights set to zero."""
    pruned = copy.deepcopy(model)
    if sparsity > 0:
        state = dict(pruned.named_parameters())
        masks = magnitude_masks({k: state[k] for k in large_tensors(pruned)}, sparsity)
        with torch.no_grad():
            for k, m in masks.items():
                state[k].mul_(m)
    return pruned


def compress(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    registry.require_store(config, "compress")
    teacher_data, tags = registry.teacher_file(config)
    files, data_version = pinned_files(lake, tags, "compress")
    found = registry.student_versions(
        config, variant="fp32", shared="true", teacher_version=tags["version"]
    )
    if not found:
        raise PatternlakeError(
            f"compress: no shared fp32 student of teacher v{tags['version']} yet; run "
            "`patternlake distill` first"
        )
    fp32_version = found[0]
    fp32 = from_bytes(
        registry.version_file(config, registry.STUDENT, fp32_version.version).read_bytes()
    )
    c, s = config.compress, config.students
    judged = GateUsers(spark, lake, files, fp32.config.max_len)
    fp32_ndcg = judged.ndcg(fp32)
    every_user = judged.every_x
    budget = int(s.max_bytes_ratio * len(teacher_data))  # the trained file, checked again
    tried, chosen = [], None
    for sparsity in sorted(c.sparsity, reverse=True):
        packed = quantized_bytes(
            prune(fp32, sparsity), segment=SHARED, shared=True, sparsity=sparsity
        )
        int8 = from_bytes(packed, c.runtime)
        faithful = gates.fidelity(int8, fp32, every_user)
        int8_ndcg = judged.ndcg(int8)
        pooled = gates.promotion(
            gates.paired_bootstrap(int8_ndcg, fp32_ndcg, s.resamples, s.seed), c.gate, s.min_users
        )
        fits = len(packed) <= budget
        ok = faithful["top10_overlap"] >= c.min_overlap and pooled.passed and fits
        reason = (
            f"{len(packed):,} bytes {'<=' if fits else '>'} the budget {budget:,}; "
            f"top-10 overlap {faithful['top10_overlap']:.3f} "
            f"{'>=' if faithful['top10_overlap'] >= c.min_overlap else '<'} {c.min_overlap:g} "
            f"(score correlation {faithful['score_correlation']:.4f}, {faithful['inputs']} "
            f"users); {pooled.reason}"
        )
        tried.append(
            {
                "sparsity": sparsity,
                "int8_bytes": len(packed),
                **faithful,
                "interval": pooled.interval.as_dict(),
                "passed": ok,
            }
        )
        chosen = (sparsity, packed, int8, int8_ndcg, pooled, ok, reason)
        if ok:
            break
    assert chosen is not None
    sparsity, packed, int8, int8_ndcg, pooled, ok, reason = chosen
    version = Candidate(
        segment=SHARED,
        variant="int8",
        model=packed,
        run_tags={
            "data.version": data_version,
            "teacher.version": tags["version"],
            "fp32.version": fp32_version.version,
        },
        run_params={"sparsity": sparsity, "runtime": c.runtime},
        run_metrics={
            "top10_overlap": tried[-1]["top10_overlap"],
            "score_correlation": tried[-1]["score_correlation"],
            "ratio_vs_fp32": pooled.interval.ratio,
            "ratio_lower_90": pooled.interval.lower,
            "int8_bytes": len(packed),
            "fp32_bytes": int(fp32_version.tags.get("bytes", 0)),
        },
        version_tags={
            "shared": "true",
            "params": int(fp32_version.tags.get("params", 0)),
            "bytes": len(packed),
            "valid_ndcg_at_10": round(pooled.interval.candidate, 6),
            "sparsity": sparsity,
            "fp32_version": fp32_version.version,
            "teacher_version": tags["version"],
            "data_version": data_version,
        },
        texts={"tried.json": json.dumps(tried, indent=1)},
    ).register(config)
    teacher_ndcg = judged.ndcg(TeacherScorer(teacher_from_bytes(teacher_data)))
    params = int(fp32_version.tags.get("params", 0))
    verdicts = [
        Verdict.of_interval(
            "compress",
            SHARED,
            "int8",
            pooled.interval,
            reference=f"student v{fp32_version.version}",
            threshold=c.gate,
            promoted=ok,
            champion=f"student-int8 v{version}" if ok else f"student v{fp32_version.version}",
            reason=reason,
            details={
                "tried": tried,
                "bytes": len(packed),
                "fp32_bytes": int(fp32_version.tags.get("bytes", 0)),
                "teacher_bytes": len(teacher_data),
            },
            version=version,
            params=params,
            nbytes=len(packed),
        )
    ]
    for g, guard in segment_guards(config, judged, int8_ndcg, teacher_ndcg).items():
        current = registry.champion_version(config, g)
        # served by this fp32 student now, or by an earlier int8 form of it (a rerun)
        was_fp32 = current is not None and str(fp32_version.version) in (
            str(current.version),
            current.tags.get("fp32_version"),
        )
        serve = ok and was_fp32 and guard.passed
        if serve:
            registry.set_champion(config, g, version)
        champion = (
            f"student-int8 v{version}"
            if serve
            else (
                "teacher"
                if current is None
                else f"{registry.champion_name(current)} v{current.version}"
            )
        )
        verdict = Verdict.of_guard(
            "compress",
            g,
            "int8",
            guard,
            serve,
            champion,
            "teacher",
            s.harm_floor,
            ok,
            version,
            params,
            len(packed),
        )
        if ok and not was_fp32:
            verdict = replace(
                verdict, reason=verdict.reason + "; its fp32 student does not serve it"
            )
        verdicts.append(verdict)
    if not any(v.promoted for v in verdicts[1:]):  # the pooled row says who serves now
        served = [v.champion for v in verdicts[1:]] or ["teacher"]
        verdicts[0] = replace(
            verdicts[0],
            promoted=False,
            champion=max(set(served), key=served.count),
            reason=verdicts[0].reason
            + ("; no segment is served by its fp32 student" if ok else "; int8 not promoted"),
        )
    out = record(lake, verdicts, tags["version"], started)
    log.info(
        "compress: int8 student v%s (sparsity %.2f, %d -> %d bytes): %s -> %s",
        version,
        sparsity,
        int(fp32_version.tags.get("bytes", 0)),
        len(packed),
        reason,
        "promoted" if ok else "not promoted",
    )
    return out
