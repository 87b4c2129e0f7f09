"""score: ``user_sequences`` + ``segments`` + each segment's champion + ``segment_patterns``
-> ``user_patterns`` (one row per user and rank; docs/design.md section 5).

* **models**: each segment's champion (``student@champion-<g>``: int8 or fp32 student), else
  the teacher; their files travel as one broadcast variable and each Python worker builds
  them once (a module-level cache keyed by the files' digest; Spark reuses Python workers).
* **users**: ``mapInPandas`` over Arrow batches of ``score.batch_size`` users
  (``spark.sql.execution.arrow.maxRecordsPerBatch`` is set to it); per segment, one forward
  pass and a ``topk`` over the catalogue; ``score.exclude_seen`` drops past items. Users
  with fewer than ``score.min_history`` known events get their segment's most popular items,
  flagged ``fallback``; so do the last ranks of a user whose student's segment catalogue
  has fewer than K items left to offer.
* **explanation**: leave-one-out occlusion over the ``score.explain_events`` most recent
  events: each event's weight is the drop of the item's score when that event is deleted
  (the history shifted as if it never happened), normalised over the positive drops; the
  ``score.explain_top`` largest are kept. (Why occlusion: docs/scoring.md, faithfulness.)
* **pattern**: a Spark join with ``segment_patterns``: the best-supported sequential rule of
  the user's segment whose consequent is the item and whose antecedent occurs in order in
  the user's ``score.pattern_window`` most recent events.
* **runs**: every run is its own partition ``run_id``; rerunning a run id replaces that
  partition only.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.scoring.transforms import in_order, normalise, occlusion, top_k, windows

log = logging.getLogger(__name__)
TABLE = "user_patterns"
NO_SEGMENT = -1

# what score_batches yields: columns of user_patterns (types from its contract), and the
# user's recent items, dropped after the rule join
SCORED_COLUMNS = [
    "user_id",
    "segment_id",
    "rank",
    "item_idx",
    "score",
    "fallback",
    "model_name",
    "model_version",
    "explanation",
    "recent",
]
SCORED_SCHEMA = contract(TABLE).ddl(*SCORED_COLUMNS[:-1]) + ", recent array<int>"
PATTERN = contract(TABLE).column("pattern").type

_WORKER_MODELS: dict[str, dict[int, tuple[torch.nn.Module, str, str]]] = {}


def _build_models(payload: dict[str, Any]) -> dict[int, tuple[torch.nn.Module, str, str]]:
    """segment -> (model taking (B, 3, L), name, version); key -1: the teacher."""
    from patternlake.models.student import from_bytes
    from patternlake.models.teacher import TeacherScorer, teacher_from_bytes

    teacher = TeacherScorer(teacher_from_bytes(payload["teacher"])).eval()
    models = {NO_SEGMENT: (teacher, "teacher", payload["teacher_version"])}
    for g, (name, version, blob) in payload["students"].items():
        models[int(g)] = (from_bytes(blob, payload["runtime"]), name, version)
    return models


def worker_models(
    digest: str, payload: dict[str, Any]
) -> dict[int, tuple[torch.nn.Module, str, str]]:
    if digest not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        _WORKER_MODELS[digest] = _build_models(payload)
    return _WORKER_MODELS[digest]


def _popular(
    popular: dict[int, list[tuple[int, float]]], g: int, skip: set[int], n: int
) -> list[tuple[int, float]]:
    """The segment's n most popular items not in ``skip`` (all segments' if it has none)."""
    ranked = popular.get(g, popular.get(NO_SEGMENT, []))
    return [(i, c) for i, c in ranked if i not in skip][:n]


def _row(user: str, g: int, rank: int, item: int, score: float, recent: list[int], **kw) -> dict:
    fallback = {"fallback": True, "model_name": "segment_popularity", "model_version": None}
    return {
        "user_id": user,
        "segment_id": g,
        "rank": rank,
        "item_idx": item,
        "score": score,
        **(kw or fallback),
        "explanation": kw.get("explanation", []),
        "recent": recent,
    }


def _explanation(
    idx: torch.Tensor, weights: torch.Tensor, window: torch.Tensor, item_ids: np.ndarray
) -> list[dict[str, Any]]:
    """One item's kept events ((E,) positions from the end, weights) as output structs."""
    L = len(window)
    out = []
    for ago, w in zip(idx.tolist(), weights.tolist(), strict=True):
        if w > 0:
            item = int(window[L - 1 - ago])
            out.append(
                {
                    "item_id": str(item_ids[item]),
                    "item_idx": item,
                    "events_ago": int(ago),
                    "weight": round(float(w), 4),
                }
            )
    return out


def score_batches(
    batches: Iterator[pd.DataFrame],
    digest: str,
    payload: dict[str, Any],
    popular: dict[int, list[tuple[int, float]]],
    item_ids: np.ndarray,
    s: dict[str, Any],
) -> Iterator[pd.DataFrame]:
    """The mapInPandas function: one output frame (SCORED_SCHEMA) per input batch."""
    torch.set_num_threads(1)
    models = worker_models(digest, payload)
    K = s["top_k"]
    for batch in batches:
        rows: list[dict[str, Any]] = []
        segs = batch["segment_id"].fillna(NO_SEGMENT).astype(int).to_numpy()
        for g in (int(x) for x in np.unique(segs)):
            part = batch[segs == g]
            model, name, version = models.get(g, models[NO_SEGMENT])
            L, n_items = model.config.max_len, int(getattr(model, "n_global", model.config.n_items))
            x = windows(part["item_seq"], part["type_seq"], part["gap_seq"], L, n_items)
            use = (x[:, 0] > 0).sum(1).numpy() >= s["min_history"]
            recent = [[int(i) for i in seq[-s["pattern_window"] :]] for seq in part["item_seq"]]
            users = part["user_id"].tolist()
            seen = [set(r) if s["exclude_seen"] else set() for r in recent]
            if use.any():
                xs = x[torch.from_numpy(use)]
                with torch.no_grad():
                    values, ids = top_k(model(xs), K, xs[:, 0] if s["exclude_seen"] else None)
                    explained = None
                    if s["explain_events"] > 0:
                        drops = occlusion(model, xs, ids, min(s["explain_events"], L))
                        explained = normalise(drops, s["explain_top"])
                for r, b in enumerate(np.nonzero(use)[0]):
                    n_model = int(torch.isfinite(values[r]).sum())
                    for k in range(n_model):
                        expl = (
                            _explanation(explained[0][r, k], explained[1][r, k], xs[r, 0], item_ids)
                            if explained is not None
                            else []
                        )
                        rows.append(
                            _row(
                                users[b],
                                g,
                                k + 1,
                                int(ids[r, k]),
                                float(values[r, k]),
                                recent[b],
                                fallback=False,
                                model_name=name,
                                model_version=version,
                                explanation=expl,
                            )
                        )
                    # a student's segment catalogue ran out: popularity fills the last ranks
                    taken = {int(i) for i in ids[r, :n_model]} | seen[b]
                    for k, (item, share) in enumerate(_popular(popular, g, taken, K - n_model)):
                        rows.append(_row(users[b], g, n_model + k + 1, item, share, recent[b]))
            for b in np.nonzero(~use)[0]:
                for k, (item, share) in enumerate(_popular(popular, g, seen[b], K)):
                    rows.append(_row(users[b], g, k + 1, item, share, recent[b]))
        yield pd.DataFrame(rows, columns=SCORED_COLUMNS)


def champion_payload(config: Config, segments: list[int]) -> tuple[dict[str, Any], dict[int, str]]:
    from patternlake import registry

    teacher, tags = registry.teacher_file(config)
    students, served = {}, {}
    for g, mv in registry.current_champions(config, segments, tags["version"]).items():
        if mv is None:
            served[g] = f"teacher v{tags['version']}"
            continue
        name = registry.champion_name(mv)
        blob = registry.version_file(config, registry.STUDENT, mv.version).read_bytes()
        students[g] = (name, str(mv.version), blob)
        served[g] = f"{name} v{mv.version}"
    payload = {
        "teacher": teacher,
        "teacher_version": tags["version"],
        "students": students,
        "runtime": config.compress.runtime,
        "data_version": int(tags.get("data.version", -1)),
    }
    return payload, served


def segment_popularity(history: DataFrame, k: int) -> dict[int, list[tuple[int, float]]]:
    """segment -> its most frequent items (share of the segment's events), k + 200 of them
    so that excluding a user's past items still leaves k."""
    counts = (
        history.select(
            F.coalesce("segment_id", F.lit(NO_SEGMENT)).alias("g"),
            F.explode("item_seq").alias("item"),
        )
        .groupBy("g", "item")
        .count()
    )
    w = Window.partitionBy("g").orderBy(F.desc("count"), "item")
    top = (
        counts.withColumn("share", F.col("count") / F.sum("count").over(Window.partitionBy("g")))
        .withColumn("r", F.row_number().over(w))
        .where(F.col("r") <= k + 200)
        .orderBy("g", "r")
        .collect()
    )
    out: dict[int, list[tuple[int, float]]] = {}
    for row in top:
        out.setdefault(int(row.g), []).append((int(row.item), float(row.share)))
    every: dict[int, float] = {}
    for items in out.values():
        for i, share in items:
            every[i] = every.get(i, 0.0) + share
    out[NO_SEGMENT] = sorted(every.items(), key=lambda t: (-t[1], t[0]))[: k + 200]
    return out


def best_patterns(scored: DataFrame, patterns: DataFrame) -> DataFrame:
    """For each scored row, the best rule (confidence, then lift, then support) of its
    segment with the item as consequent and the antecedent in order in ``recent``."""
    rules = patterns.where("kind = 'sequential'").select(
        F.col("segment_id").alias("p_segment"),
        F.col("consequent_idx").alias("p_item"),
        "antecedent_idx",
        "kind",
        "antecedent",
        "consequent",
        "support",
        "confidence",
        "lift",
    )
    cand = (
        scored.select("user_id", "rank", "segment_id", "item_idx", "recent")
        .join(
            rules,
            (F.col("segment_id") == F.col("p_segment")) & (F.col("item_idx") == F.col("p_item")),
        )
        .where(in_order(F.col("antecedent_idx"), F.col("recent")))
    )
    w = Window.partitionBy("user_id", "rank").orderBy(
        F.desc("confidence"), F.desc("lift"), F.desc("support"), F.asc("antecedent")
    )
    best = (
        cand.withColumn("_r", F.row_number().over(w))
        .where("_r = 1")
        .select(
            "user_id",
            "rank",
            F.struct("kind", "antecedent", "consequent", "support", "confidence", "lift")
            .cast(PATTERN)
            .alias("pattern"),
        )
    )
    return scored.join(best, ["user_id", "rank"], "left")


def score_users(
    spark: SparkSession, lake: Lake, config: Config, run_id: str | None = None
) -> dict[str, Any]:
    from patternlake import registry

    started = time.monotonic()
    registry.require_store(config, "score")
    for table in ("user_sequences", "segments", "item_index"):
        if not lake.exists(table):
            raise PatternlakeError(
                f"score: {table} does not exist yet; run `patternlake run daily` first"
            )
    s = config.score.model_dump()
    scored_at = datetime.now(UTC)
    run_id = run_id or scored_at.strftime("%Y%m%dT%H%M%SZ")
    segments = lake.read("segments").select("user_id", "segment_id")
    seg_ids = sorted(r[0] for r in segments.select("segment_id").distinct().collect())
    payload, served = champion_payload(config, seg_ids)
    digest = hashlib.sha1(
        payload["teacher"] + b"".join(b for _, _, b in payload["students"].values())
    ).hexdigest()
    items = lake.read("item_index").select("item_idx", "item_id").collect()
    item_ids = np.empty(max((r.item_idx for r in items), default=0) + 1, dtype=object)
    for r in items:
        item_ids[r.item_idx] = r.item_id
    history = (
        lake.read("user_sequences")
        .select("user_id", "item_seq", "type_seq", "gap_seq")
        .join(segments, "user_id", "left")
    )
    popular = segment_popularity(history, s["top_k"])
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(s["batch_size"]))
    sc = spark.sparkContext
    shared = sc.broadcast((digest, payload, popular, item_ids, s))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        d, p, pop, ids, settings = shared.value
        yield from score_batches(batches, d, p, pop, ids, settings)

    scored = history.mapInPandas(run, SCORED_SCHEMA)
    with_patterns = best_patterns(scored, lake.read("segment_patterns"))
    out = with_patterns.join(
        lake.read("item_index").select("item_idx", "item_id"), "item_idx", "left"
    ).select(
        "user_id",
        "segment_id",
        "rank",
        "item_id",
        "item_idx",
        "score",
        "fallback",
        F.col("pattern"),
        "explanation",
        "model_name",
        "model_version",
        F.lit(payload["data_version"]).cast("bigint").alias("data_version"),
        F.lit(run_id).alias("run_id"),
        F.lit(scored_at).alias("scored_at"),
    )
    try:
        version = lake.write(out, TABLE, "overwrite", replace_where={"run_id": run_id})
    finally:
        shared.unpersist()
    stats = (
        lake.read(TABLE)
        .where(F.col("run_id") == run_id)
        .agg(
            F.countDistinct("user_id").alias("users"),
            F.count("*").alias("rows"),
            F.sum(F.col("fallback").cast("int")).alias("fallback_rows"),
            F.sum(F.col("pattern").isNotNull().cast("int")).alias("with_pattern"),
        )
        .first()
        .asDict()
    )
    result = {
        "run_id": run_id,
        "version": version,
        "models": {str(k): v for k, v in served.items()},
        **stats,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info(
        "score: run %s: %d users, %d rows (%d fallback, %d with a pattern) -> user_patterns@v%d (%.1fs)",
        run_id,
        stats["users"],
        stats["rows"],
        stats["fallback_rows"] or 0,
        stats["with_pattern"] or 0,
        version,
        result["seconds"],
    )
    return result
