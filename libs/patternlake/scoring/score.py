"""score: ``user_sequences`` + ``segments`` + each segment's champion + ``segment_patterns``
-> ``user_patterns`` (one row per user and rank; docs/design.md section 5).

* **models**: each segment's champion (``student@champion-<g>``: int8 or fp32 student), else
  the teacher; their files travel as one broadcast variable and each Python worker builds
  them once (a module-level cache keyed by the files' digest; Spark reuses Python workers).
* **users**: the histories are cut in Spark to the longest window a served model reads;
  ``mapInPandas`` over Arrow batches of ``score.batch_size`` users
  (``spark.sql.execution.arrow.maxRecordsPerBatch`` is set to it); per segment, one encoder
  pass per user and an exact top-K over item chunks (``models.ranking``: no (users x
  catalogue) matrix beyond one chunk of ~64 MB, whatever the catalogue); ``score.exclude_seen``
  drops past items. With ``score.index: faiss`` a dot-product model's top-K comes from an
  approximate item index instead (``models.ann``: IVF-Flat candidates rescored exactly),
  built once per Python worker and model on its first batch. Users with fewer than
  ``score.min_history`` known events get their segment's most popular items, flagged
  ``fallback``; so do the last ranks of a user whose student's segment catalogue has fewer
  than K items left to offer.
* **explanation**: leave-one-out occlusion over the ``score.explain_events`` most recent
  events: each event's weight is the drop of the item's score when that event is deleted
  (the history shifted as if it never happened), normalised over the positive drops; the
  ``score.explain_top`` largest are kept. Only the K recommended items are scored for each
  deleted history, and the deleted histories go through the encoder in batches. The events'
  item ids are joined from ``item_index`` in Spark before the task (``recent_names``).
  (Why occlusion: docs/scoring.md, faithfulness.)
* **pattern**: the best-supported sequential rule of the user's segment (confidence, lift,
  support) whose consequent is the item and whose antecedent occurs in order in the user's
  ``score.pattern_window`` most recent events, matched inside the task: the rules
  (``mine.max_rules_per_segment`` per segment) travel with the models, so the models run
  once per user and the output joins ``item_index`` once for the items' ids.
* **runs**: every run is its own partition ``run_id``; rerunning a run id replaces that
  partition only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from patternlake.models import ann, ranking
from patternlake.models.store import metadata
from patternlake.scoring.transforms import (
    PATTERN_FIELDS,
    Rule,
    best_rule,
    normalise,
    occlusion,
    rule_book,
    windows,
)

log = logging.getLogger(__name__)
TABLE = "user_patterns"
NO_SEGMENT = -1

# what score_batches yields: columns of user_patterns (types from its contract) but
# item_id, which Spark joins from item_index afterwards
SCORED_COLUMNS = [
    "user_id",
    "segment_id",
    "rank",
    "item_idx",
    "score",
    "fallback",
    "pattern",
    "explanation",
    "model_name",
    "model_version",
]
SCORED_SCHEMA = contract(TABLE).ddl(*SCORED_COLUMNS)


@dataclass
class Served:
    """One served model as a Python worker holds it."""

    ranker: ranking.Ranker
    name: str
    version: str
    max_len: int
    n_items: int
    index: ann.ItemIndex | None = None  # score.index: faiss, built on the first batch
    index_key: tuple[int, int] | None = None  # the (nlist, nprobe) it was built with


_WORKER_MODELS: dict[str, dict[int, Served]] = {}


def _served(model: torch.nn.Module, name: str, version: str) -> Served:
    n_items = int(getattr(model, "n_global", model.config.n_items))
    return Served(ranking.ranker_for(model), name, version, model.config.max_len, n_items)


def _build_models(payload: dict[str, Any]) -> dict[int, Served]:
    """segment -> its served model; key -1: the teacher."""
    from patternlake.models.student import from_bytes
    from patternlake.models.teacher import teacher_from_bytes

    teacher = teacher_from_bytes(payload["teacher"]).eval()
    models = {NO_SEGMENT: _served(teacher, "teacher", payload["teacher_version"])}
    built: dict[str, Served] = {}  # the shared student: one model, one index, every segment
    files = payload.get("files", {})
    bases: dict[str, torch.nn.Module] = {}  # a segment head's shared student, built once
    for g, (name, version) in payload["students"].items():
        if version not in built:
            base = payload.get("bases", {}).get(version)
            if base is not None and base not in bases:
                bases[base] = from_bytes(files[base])
            model = from_bytes(files[version], payload["runtime"], base=bases.get(base))
            built[version] = _served(model, name, version)
        models[int(g)] = built[version]
    return models


def worker_models(digest: str, payload: dict[str, Any]) -> dict[int, Served]:
    if digest not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        _WORKER_MODELS[digest] = _build_models(payload)
    return _WORKER_MODELS[digest]


def item_index(m: Served, s: dict[str, Any]) -> ann.ItemIndex | None:
    """The model's approximate item index (built on first use, rebuilt when its settings
    change), or None where the model is not a dot product: exact top-K."""
    if not ann.supports(m.ranker):
        if m.index_key != (0, 0):
            log.info("score: %s is not a dot-product model: exact top-K, not faiss", m.name)
            m.index_key = (0, 0)
        return None
    key = (s["faiss_nlist"], s["faiss_nprobe"])
    if m.index is None or m.index_key != key:
        started = time.monotonic()
        m.index, m.index_key = ann.ItemIndex(m.ranker, *key), key
        log.info(
            "score: %s: faiss IVF-Flat over %d items, %d lists, nprobe %d (%.1fs)",
            m.name,
            m.index.n_items,
            m.index.nlist,
            m.index.nprobe,
            time.monotonic() - started,
        )
    return m.index


def model_top_k(
    m: Served, state: Any, k: int, exclude: torch.Tensor | None, s: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K over item chunks, or with ``score.index: faiss`` (settings without the
    key: exact) the item index's rescored candidates."""
    index = item_index(m, s) if s.get("index", "exact") == "faiss" else None
    if index is None:
        return ranking.top_k(m.ranker, state, k, exclude)
    return ann.approx_top_k(index, m.ranker, state, k, exclude)


def _popular(
    popular: dict[int, list[tuple[int, float]]], g: int, skip: set[int], n: int
) -> list[tuple[int, float]]:
    """The segment's n most popular items not in ``skip`` (all segments' if it has none)."""
    ranked = popular.get(g, popular.get(NO_SEGMENT, []))
    return [(i, c) for i, c in ranked if i not in skip][:n]


def _row(user: str, g: int, rank: int, item: int, score: float, **kw) -> dict:
    fallback = {"fallback": True, "model_name": "segment_popularity", "model_version": None}
    return {
        "user_id": user,
        "segment_id": g,
        "rank": rank,
        "item_idx": item,
        "score": score,
        "pattern": kw.pop("pattern", None),
        "explanation": kw.pop("explanation", []),
        **(kw or fallback),
    }


def _explanation(
    idx: list[int], weights: list[float], window: list[int], names: dict[int, str]
) -> list[dict[str, Any]]:
    """One item's kept events ((E,) positions from the end, weights) as output structs;
    ``names``: the item ids of the user's recent events (joined in Spark)."""
    L = len(window)
    out = []
    for ago, w in zip(idx, weights, strict=True):
        if w > 0:
            item = int(window[L - 1 - ago])
            out.append(
                {
                    "item_id": names.get(item),
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
    rules: dict[tuple[int, int], list[Rule]],
    s: dict[str, Any],
) -> Iterator[pd.DataFrame]:
    """The mapInPandas function: one output frame (SCORED_SCHEMA) per input batch. Input
    columns: user_id, segment_id, item_seq/type_seq/gap_seq (already cut to the longest
    window in Spark) and recent_names (item idx -> item id of the events explanations may
    name)."""
    torch.set_num_threads(1)
    models = worker_models(digest, payload)
    K = s["top_k"]
    for batch in batches:
        rows: list[dict[str, Any]] = []
        segs = batch["segment_id"].fillna(NO_SEGMENT).astype(int).to_numpy()
        for g in (int(x) for x in np.unique(segs)):
            part = batch[segs == g]
            m = models.get(g, models[NO_SEGMENT])
            x = windows(part["item_seq"], part["type_seq"], part["gap_seq"], m.max_len, m.n_items)
            use = (x[:, 0] > 0).sum(1).numpy() >= s["min_history"]
            recent = [[int(i) for i in seq[-s["pattern_window"] :]] for seq in part["item_seq"]]
            names = [dict(n) if n is not None else {} for n in part["recent_names"]]
            users = part["user_id"].tolist()
            seen = [set(r) if s["exclude_seen"] else set() for r in recent]
            if use.any():
                xs = x[torch.from_numpy(use)]
                with torch.no_grad():
                    state = m.ranker.encode(xs)
                    exclude = xs[:, 0] if s["exclude_seen"] else None
                    values, ids = model_top_k(m, state, K, exclude, s)
                    explained = None
                    if s["explain_events"] > 0:
                        base = m.ranker.items(state, ids)
                        drops = occlusion(
                            m.ranker, xs, ids, min(s["explain_events"], m.max_len), base
                        )
                        explained = normalise(drops, s["explain_top"])
                # plain lists once per batch: per-row tensor indexing costs more than the rows
                finite = torch.isfinite(values).sum(1).tolist()
                top_ids, top_values, window = ids.tolist(), values.tolist(), xs[:, 0].tolist()
                if explained is not None:
                    at, weight = explained[0].tolist(), explained[1].tolist()
                for r, b in enumerate(np.nonzero(use)[0]):
                    n_model = finite[r]
                    for k in range(n_model):
                        item = top_ids[r][k]
                        expl = (
                            _explanation(at[r][k], weight[r][k], window[r], names[b])
                            if explained is not None
                            else []
                        )
                        rows.append(
                            _row(
                                users[b],
                                g,
                                k + 1,
                                item,
                                top_values[r][k],
                                pattern=best_rule(rules, g, item, recent[b]),
                                explanation=expl,
                                fallback=False,
                                model_name=m.name,
                                model_version=m.version,
                            )
                        )
                    # a student's segment catalogue ran out: popularity fills the last ranks
                    taken = set(top_ids[r][:n_model]) | seen[b]
                    for k, (item, share) in enumerate(_popular(popular, g, taken, K - n_model)):
                        pattern = best_rule(rules, g, item, recent[b])
                        rows.append(
                            _row(users[b], g, n_model + k + 1, item, share, pattern=pattern)
                        )
            for b in np.nonzero(~use)[0]:
                for k, (item, share) in enumerate(_popular(popular, g, seen[b], K)):
                    pattern = best_rule(rules, g, item, recent[b])
                    rows.append(_row(users[b], g, k + 1, item, share, pattern=pattern))
        yield pd.DataFrame(rows, columns=SCORED_COLUMNS)


def payload_digest(payload: dict[str, Any]) -> str:
    """What a Python worker's built models are cached under: the model files and which
    segment gets which (one shared file can serve a changing set of segments)."""
    return hashlib.sha1(
        payload["teacher"]
        + b"".join(payload["files"].values())
        + json.dumps([payload["students"], payload.get("bases", {})], sort_keys=True).encode()
    ).hexdigest()


def champion_payload(config: Config, segments: list[int]) -> tuple[dict[str, Any], dict[int, str]]:
    from patternlake import registry

    teacher, tags = registry.teacher_file(config)
    students, served, blobs, bases = {}, {}, {}, {}
    for g, mv in registry.current_champions(config, segments, tags["version"]).items():
        if mv is None:
            served[g] = f"teacher v{tags['version']}"
            continue
        name = registry.champion_name(mv)
        version = str(mv.version)
        if version not in blobs:  # a version several segments share: fetched once
            data, base = registry.student_files(config, version)
            blobs[version] = data
            if base is not None:  # a segment head: the shared file it runs on, once
                bases[version] = str(metadata(data)["base"])
                blobs.setdefault(bases[version], base)
        students[g] = (name, version)
        served[g] = f"{name} v{mv.version}"
    files = [teacher, *blobs.values()]
    payload = {
        "teacher": teacher,
        # the longest window any served model reads: histories are cut to it in Spark
        "max_len": max(int(metadata(f)["config"]["max_len"]) for f in files),
        "teacher_version": tags["version"],
        "students": students,
        "files": blobs,
        "bases": bases,
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


def cut(column: str, n: int) -> F.Column:
    """The last ``n`` elements of an array column (all of a shorter one), in Spark."""
    return F.expr(f"slice({column}, greatest(size({column}) - {n} + 1, 1), {n})").alias(column)


def model_inputs(
    sequences: DataFrame, segments: DataFrame, items: DataFrame, window: int, explain: int
) -> DataFrame:
    """Per user: segment, the histories cut to ``window`` events, and ``recent_names``, the
    item ids (joined from item_index in Spark) of the ``explain`` most recent events, which
    are the only ones an explanation names."""
    cols = ("item_seq", "type_seq", "gap_seq")
    hist = sequences.select("user_id", *(cut(c, window) for c in cols))
    recent = (
        hist.select("user_id", F.explode(cut("item_seq", max(1, explain))).alias("item_idx"))
        .distinct()
        .join(items.select("item_idx", "item_id"), "item_idx")
        .groupBy("user_id")
        .agg(
            F.map_from_entries(F.collect_list(F.struct("item_idx", "item_id"))).alias(
                "recent_names"
            )
        )
    )
    out = hist.join(segments, "user_id", "left")
    return (
        out.join(recent, "user_id", "left")
        if explain > 0
        else out.withColumn("recent_names", F.lit(None).cast("map<int,string>"))
    )


def rule_rows(patterns: DataFrame) -> list[dict[str, Any]]:
    """The sequential rules of every segment (``mine.max_rules_per_segment`` each at most):
    small enough to travel to every task, where each recommended item is matched."""
    fields = ("segment_id", "consequent_idx", "antecedent_idx", *PATTERN_FIELDS)
    return [r.asDict() for r in patterns.where("kind = 'sequential'").select(*fields).collect()]


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
    if s["index"] == "faiss":
        ann.faiss_module()  # missing: fail here, not in every task
    scored_at = datetime.now(UTC)
    run_id = run_id or scored_at.strftime("%Y%m%dT%H%M%SZ")
    segments = lake.read("segments").select("user_id", "segment_id")
    seg_ids = sorted(r[0] for r in segments.select("segment_id").distinct().collect())
    payload, served = champion_payload(config, seg_ids)
    digest = payload_digest(payload)
    sequences = lake.read("user_sequences")
    item_index = lake.read("item_index").select("item_idx", "item_id")
    popular = segment_popularity(sequences.join(segments, "user_id", "left"), s["top_k"])
    rules = rule_book(rule_rows(lake.read("segment_patterns")))
    window = max(payload["max_len"], s["pattern_window"])
    inputs = model_inputs(sequences, segments, item_index, window, s["explain_events"])
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(s["batch_size"]))
    sc = spark.sparkContext
    shared = sc.broadcast((digest, payload, popular, rules, s))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        d, p, pop, book, settings = shared.value
        yield from score_batches(batches, d, p, pop, book, settings)

    # one pass of the models per user: the rules are matched inside the task, and item ids
    # join the (users x K) output once
    scored = inputs.mapInPandas(run, SCORED_SCHEMA)
    out = scored.join(item_index, "item_idx", "left").select(
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
