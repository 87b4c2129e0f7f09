"""`patternlake monitor [--auto-retrain]`: drift of recent events from the champions' data.

Reads ``silver_events`` (and ``user_patterns`` when scored), the registry; appends one row
per check to ``drift``. Windows: with a registered teacher, the reference is every batch
validated before it was registered (the data it and its students learned from) and the
current window every batch validated since; without one, the last ``monitor.recent_batches``
batches against the ones before. Checks (statistics in ``monitoring.transforms``):

* ``event_type_mix``: PSI of the event-type shares;
* ``items``: Jensen-Shannon divergence of the item distribution (the reference's and the
  current window's ``monitor.top_items`` items, ties by item id, the rest in one bin);
* ``user.events``, ``user.distinct_items``, ``user.active_days``: PSI of per-user features
  computed in each window, binned at the reference's deciles: the inner edges are
  ``percentile_approx(feature, [1/B, ..., (B-1)/B], QUANTILE_ACCURACY)`` over the
  reference's users (B = ``monitor.bins``; each edge a reference value, rank error at most
  users / accuracy; ties collapse), and a user's bin is the number of edges below its value
  (bins ``(e[i-1], e[i]]``);
* ``recent_ndcg@10``: the latest scoring run before the current window, scored against each
  user's first event of the window (their next event), vs the teacher's best validation
  NDCG@10; decay when the upper end of its confidence interval is below
  ``(1 - decay_tolerance)`` x the reference.

Everything per user or per item is aggregated in Spark: the driver receives bin counts
(features x bins), at most ``2 x monitor.top_items + 1`` item counts, the event-type counts
and the count, mean and standard deviation of the NDCG gains (``transforms`` holds the same
statistics over in-memory arrays).

Each check reports both sample sizes, the value, the noise floor at ``alpha`` and a p-value;
a band counts only above the noise floor, so small windows do not alarm on chance. With
``--auto-retrain``, an alarm runs the ``train`` pipeline (``retrain``, given by the CLI: a
stage does not run other stages); new champions come only through the students' and
compression gates.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.lake.tables import batches_in_order
from patternlake.monitoring import transforms

log = logging.getLogger(__name__)

TABLE = "drift"
SEVERITY = {"alarm": 3, "warn": 2, "ok": 1, "too_small": 0, "no_data": 0}
# per-user features compared between the windows: name -> aggregate over a user's events
USER_FEATURES = {
    "events": lambda: F.count("*"),
    "distinct_items": lambda: F.countDistinct("item_id"),
    "active_days": lambda: F.countDistinct(F.to_date("event_time")),
}
# percentile_approx's accuracy for the user features' bin edges (rank error <= n / this)
QUANTILE_ACCURACY = 10_000


def monitor(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    retrain: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checks, appended to ``drift``; on an alarm, ``retrain()`` when given (the CLI's
    ``--auto-retrain``: the ``train`` pipeline), its result kept as the result's ``retrain``."""
    started = time.monotonic()
    m = config.monitor
    if not lake.exists("silver_events"):
        raise PatternlakeError("monitor: silver_events does not exist yet; run validate first")
    silver = lake.read("silver_events")
    teacher = _teacher(config)
    basis, recent = _windows(lake, silver, config, teacher)
    checks: list[dict[str, Any]] = []
    if not recent:
        checks.append(_row("windows", "-", math.nan, math.nan, math.nan, math.nan, 0, 0, "no_data"))
    else:
        in_recent = F.col("_batch_id").isin(recent)
        ref, cur = silver.where(~in_recent).cache(), silver.where(in_recent).cache()
        checks.append(_categorical("event_type_mix", ref, cur, "event_type", "psi", None, config))
        checks.append(_categorical("items", ref, cur, "item_id", "js", m.top_items, config))
        checks.extend(_user_features(ref, cur, config))
        checks.append(_recent_ndcg(lake, config, cur, recent, teacher))
        ref.unpersist()
        cur.unpersist()
    worst = max(checks, key=lambda c: SEVERITY[c["status"]])["status"]
    action, retrained = "", None
    if worst == "alarm" and retrain is not None:
        log.info("monitor: alarm (%s); --auto-retrain runs the train pipeline", _alarms(checks))
        retrained = retrain()
        action = "retrained"
    elif worst == "alarm":
        action = "retrain suggested (patternlake run train, or monitor --auto-retrain)"
    monitor_id, now = uuid.uuid4().hex, datetime.now(UTC)
    rows = [
        (monitor_id, now, basis, c["check"], c["statistic"], c["value"], c["threshold"],
         c["noise_floor"], c["p_value"], c["n_ref"], c["n_cur"], c["status"],
         action if c["status"] == "alarm" else "")
        for c in checks
    ]  # fmt: skip
    version = lake.write(spark.createDataFrame(rows, contract(TABLE).ddl()), TABLE, mode="append")
    result = {
        "monitor_id": monitor_id,
        "basis": basis,
        "status": worst,
        "action": action,
        "checks": checks,
        "drift_version": version,
        "retrain": retrained,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info(
        "monitor %s: %s (%s) %s-> drift@v%d (%.1fs)",
        monitor_id,
        worst,
        basis,
        f"alarms: {_alarms(checks)} " if worst == "alarm" else "",
        version,
        result["seconds"],
    )
    return result


def _alarms(checks: list[dict[str, Any]]) -> str:
    return ", ".join(c["check"] for c in checks if c["status"] == "alarm")


def _row(check, statistic, value, threshold, floor, p, n_ref, n_cur, status) -> dict[str, Any]:
    clean = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
    return {
        "check": check,
        "statistic": statistic,
        "value": clean(value),
        "threshold": clean(threshold),
        "noise_floor": clean(floor),
        "p_value": clean(p),
        "n_ref": int(n_ref),
        "n_cur": int(n_cur),
        "status": status,
    }


def _windows(
    lake: Lake,
    silver: DataFrame,
    config: Config,
    teacher: tuple[str, datetime, float | None] | None,
) -> tuple[str, list[str]]:
    """(basis, the current window's batch ids; empty: nothing to compare) as described in
    the module's docstring; a batch's time is when it was validated
    (``validation_results.validated_at``)."""
    if teacher is not None:
        version, at, _ = teacher
        recent = [
            r[0]
            for r in lake.read("validation_results")
            .where(F.col("validated_at") > F.lit(at))
            .select("batch_id")
            .collect()
        ]
        basis = f"teacher v{version} registered {at:%Y-%m-%dT%H:%M:%SZ}: batches before vs since"
        if not recent or silver.where(F.col("_batch_id").isin(recent)).limit(1).count() == 0:
            return basis + " (no batch since)", []
        return basis, recent
    batches = batches_in_order(silver)
    k = config.monitor.recent_batches
    if len(batches) <= k:
        return f"no teacher; {len(batches)} batch(es), need more than {k}", []
    return f"no teacher: last {k} batch(es) vs the {len(batches) - k} before", batches[-k:]


def _teacher(config: Config) -> tuple[str, datetime, float | None] | None:
    """The registered teacher: (version, registered at, best validation NDCG@10), or None."""
    from patternlake import registry

    registry.require_store(config, "monitor")  # a wrong URI is not "no teacher"
    version = registry.teacher_version(config)
    if version is None:
        return None
    c = registry.client(config)
    with registry.answering(config, f"reading {registry.TEACHER} v{version}"):
        mv = c.get_model_version(registry.TEACHER, version)
        ndcg = c.get_run(mv.run_id).data.metrics.get("best_valid_ndcg_at_10") if mv.run_id else None
    at = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    return version, at, float(ndcg) if ndcg is not None else None


def _categorical(
    check: str,
    ref: DataFrame,
    cur: DataFrame,
    column: str,
    metric: str,
    top: int | None,
    config: Config,
) -> dict[str, Any]:
    m = config.monitor
    _, r, c = category_counts(ref, cur, column, top)
    warn, alarm = (m.psi_warn, m.psi_alarm) if metric == "psi" else (m.js_warn, m.js_alarm)
    d = transforms.judge(metric, r, c, warn, alarm, m.alpha, m.min_rows)
    return _row(check, metric, d.value, alarm, d.floor, d.p_value, d.n_ref, d.n_cur, d.status)


def category_counts(
    ref: DataFrame, cur: DataFrame, column: str, top: int | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``transforms.aligned_counts`` of ``column``'s values in the two windows, counted in
    Spark. With ``top``, only the kept keys' counts and the ``(other)`` bin reach the driver
    (at most ``2 x top + 1`` rows); without, every key's (for columns of few values)."""
    count = lambda df, name: df.groupBy(column).agg(F.count("*").alias(name))  # noqa: E731
    r, c = count(ref, "_ref"), count(cur, "_cur")
    both = r.join(c, column, "full_outer").fillna(0, subset=["_ref", "_cur"])
    if top is None:
        named = sorted(
            (x[0], int(x[1]), int(x[2])) for x in both.select(column, "_ref", "_cur").collect()
        )
    else:
        first = lambda df, n: df.orderBy(F.desc(n), column).limit(top).select(column)  # noqa: E731
        keep = first(r, "_ref").union(first(c, "_cur")).distinct().withColumn("_keep", F.lit(True))
        kept = F.coalesce(F.col("_keep"), F.lit(False))
        rows = (
            both.join(F.broadcast(keep), column, "left")
            .groupBy(kept.alias("kept"), F.when(kept, F.col(column)).alias("key"))
            .agg(F.sum("_ref").alias("r"), F.sum("_cur").alias("c"), F.count("*").alias("keys"))
            .collect()
        )
        named = sorted((x["key"], int(x["r"]), int(x["c"])) for x in rows if x["kept"])
        if sum(x["keys"] for x in rows) > top:  # as aligned_counts: an (other) bin, maybe empty
            other = [(int(x["r"]), int(x["c"])) for x in rows if not x["kept"]]
            named.append(("(other)", *(other[0] if other else (0, 0))))
    keys = [k for k, _, _ in named]
    return keys, np.array([a for _, a, _ in named]), np.array([b for *_, b in named])


def user_feature_counts(
    ref: DataFrame, cur: DataFrame, bins: int, accuracy: int = QUANTILE_ACCURACY
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per ``USER_FEATURES`` feature: (inner bin edges, reference users per bin, current
    users per bin), all computed in Spark as the module's docstring states; with ``accuracy``
    at least the reference's users, equal to ``transforms.quantile_edges`` and
    ``transforms.binned`` over the per-user values."""
    aggs = [agg().alias(name) for name, agg in USER_FEATURES.items()]
    r = ref.groupBy("user_id").agg(*aggs).persist()
    c = cur.groupBy("user_id").agg(*aggs)
    qs = [float(q) for q in np.linspace(0, 1, bins + 1)[1:-1]]
    at = r.agg(*[F.percentile_approx(f, qs, accuracy).alias(f) for f in USER_FEATURES]).first()
    edges = {f: np.unique(np.asarray(at[f] or [], dtype=np.float64)) for f in USER_FEATURES}

    def counts(df: DataFrame) -> dict[str, np.ndarray]:
        n_bins = {f: len(edges[f]) + 1 for f in USER_FEATURES}
        bin_of = {
            f: sum(((F.col(f) > float(e)).cast("int") for e in edges[f]), F.lit(0))
            for f in USER_FEATURES
        }
        row = df.agg(
            *[
                F.count_if(bin_of[f] == b).alias(f"{f}_{b}")
                for f in USER_FEATURES
                for b in range(n_bins[f])
            ]
        ).first()
        return {
            f: np.array([int(row[f"{f}_{b}"]) for b in range(n_bins[f])]) for f in USER_FEATURES
        }

    ref_counts, cur_counts = counts(r), counts(c)
    r.unpersist()
    return {f: (edges[f], ref_counts[f], cur_counts[f]) for f in USER_FEATURES}


def _user_features(ref: DataFrame, cur: DataFrame, config: Config) -> list[dict[str, Any]]:
    m = config.monitor
    out = []
    for feature, (_, r, c) in user_feature_counts(ref, cur, m.bins).items():
        d = transforms.judge("psi", r, c, m.psi_warn, m.psi_alarm, m.alpha, m.min_users)
        out.append(
            _row(f"user.{feature}", "psi", d.value, m.psi_alarm, d.floor, d.p_value,
                 d.n_ref, d.n_cur, d.status)
        )  # fmt: skip
    return out


def _recent_ndcg(
    lake: Lake,
    config: Config,
    cur: DataFrame,
    recent: list[str],
    teacher: tuple[str, datetime, float | None] | None,
) -> dict[str, Any]:
    """The served top-K of the latest scoring run made before the current window's first
    batch was validated, against each scored user's first event in the window. The row's
    ``noise_floor`` is the half-width of the mean's confidence interval at ``alpha``."""
    m = config.monitor
    empty = _row(
        "recent_ndcg@10", "ndcg@10", math.nan, math.nan, math.nan, math.nan, 0, 0, "no_data"
    )
    reference = teacher[2] if teacher is not None else None
    if reference is None or not lake.exists("user_patterns"):
        return empty
    start = (
        lake.read("validation_results")
        .where(F.col("batch_id").isin(recent))
        .agg(F.min("validated_at"))
        .first()[0]
    )
    runs = (
        lake.read("user_patterns")
        .where(F.col("scored_at") < F.lit(start))
        .groupBy("run_id")
        .agg(F.max("scored_at").alias("at"))
        .orderBy(F.desc("at"))
        .limit(1)
        .collect()
    )
    if not runs:
        return empty
    served = lake.read("user_patterns").where(F.col("run_id") == runs[0]["run_id"])
    first = (
        cur.select("user_id", "item_id", "event_time", "event_id")
        .withColumn(
            "_r",
            F.row_number().over(Window.partitionBy("user_id").orderBy("event_time", "event_id")),
        )
        .where(F.col("_r") == 1)
        .select("user_id", F.col("item_id").alias("next_item"))
    )
    top = served.where(F.col("rank") <= 10).select("user_id", "item_id", "rank")
    gains = (
        first.join(top.select("user_id").distinct(), "user_id")
        .join(top, (first.user_id == top.user_id) & (first.next_item == top.item_id), "left")
        .select(F.coalesce(1.0 / F.log2(F.col("rank") + 1.0), F.lit(0.0)).alias("gain"))
        .agg(
            F.count("*").alias("n"), F.avg("gain").alias("mean"), F.stddev_samp("gain").alias("sd")
        )
        .first()
    )
    n = int(gains["n"])
    if n == 0:
        return empty
    mean = float(gains["mean"])
    half = transforms.half_width(n, gains["sd"], m.alpha)
    threshold = (1 - m.decay_tolerance) * reference
    if n < m.min_users:
        status = "too_small"
    elif mean + half < threshold:
        status = "alarm"
    elif mean < threshold:
        status = "warn"
    else:
        status = "ok"
    return _row("recent_ndcg@10", "ndcg@10", mean, threshold, half, math.nan, 0, n, status) | {
        "reference": reference,
        "run_id": runs[0]["run_id"],
    }
