"""Featurization transforms: plain ``DataFrame -> DataFrame`` functions.

Every per-user value is computed from that user's whole silver history only, so an
incremental run (only users touched by new batches) gives exactly what a full rebuild gives.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from patternlake.sequences import GAP_EDGES, MIN_EVALUATED_EVENTS


def new_item_index(events: DataFrame, existing: DataFrame | None) -> DataFrame:
    """Stable integer ids for items not in ``existing``: numbered after the current maximum,
    in order of (first batch, first time seen in it, item_id). 0 is reserved for padding.

    ``events`` needs item_id, event_time and _batch_order.
    """
    first = events.groupBy("item_id").agg(
        F.min(F.struct("_batch_order", "event_time")).alias("first")
    )
    offset = 0
    if existing is not None:
        first = first.join(existing.select("item_id"), "item_id", "left_anti")
        offset = existing.agg(F.max("item_idx")).first()[0] or 0
    order = Window.orderBy("first._batch_order", "first.event_time", "item_id")
    return first.select(
        "item_id",
        (F.row_number().over(order) + F.lit(offset)).cast("int").alias("item_idx"),
        F.col("first.event_time").alias("first_seen"),
        F.col("first._batch_order").cast("int").alias("first_batch"),
    )


def _is_type(type_idx: int):  # a one-argument lambda (Spark reads a second one as the index)
    return lambda t: t == type_idx


def gap_bucket(seconds: Column) -> Column:
    out = F.lit(len(GAP_EDGES) + 1)
    for i, edge in reversed(list(enumerate(GAP_EDGES))):
        out = F.when(seconds < edge, F.lit(i + 1)).otherwise(out)
    return out


def user_histories(
    events: DataFrame,
    item_index: DataFrame,
    event_types: list[str],
    category_property: str | None = None,
) -> DataFrame:
    """One row per user: the whole history as a time-sorted array of structs.

    Events with the same time keep the order in which they were delivered: earlier batch
    first (``_batch_order``), then source file, then position in that file
    (``_line_ordinal``, kept by ingest) — what a user expects and what other tools do with
    tied timestamps. The event id only breaks ties that remain (rows without an ordinal).
    Each event also carries its category (``c``, the ``category_property`` property), so
    that every per-user feature comes from this one grouping.
    """
    types = F.array(*[F.lit(t) for t in event_types])
    category = (
        F.col("properties").getItem(category_property)
        if category_property
        else F.lit(None).cast("string")
    )
    ev = events.join(F.broadcast(item_index.select("item_id", "item_idx")), "item_id").select(
        "user_id",
        F.struct(
            F.unix_micros("event_time").alias("t"),
            F.col("_batch_order").cast("int").alias("b"),
            F.col("_source_file").alias("f"),
            F.col("_line_ordinal").alias("o"),
            F.col("event_id").alias("id"),
            F.col("item_idx").alias("item"),
            F.array_position(types, F.col("event_type")).cast("int").alias("type"),
            category.alias("c"),
        ).alias("e"),
    )
    ordered = F.sort_array(F.collect_list("e"))
    # the tie-break fields (batch, file, position, id) only order the events: drop them after
    # the sort, so the cached histories hold time, item, type and category only (the file
    # path and id strings were most of each event's bytes; 30M events ran out of a 4 GB heap)
    slim = F.transform(
        ordered,
        lambda e: F.struct(
            e["t"].alias("t"), e["item"].alias("item"), e["type"].alias("type"), e["c"].alias("c")
        ),
    )
    return ev.groupBy("user_id").agg(slim.alias("events"))


def user_sequences(histories: DataFrame, max_len: int) -> DataFrame:
    """The last ``max_len`` events as item / type / gap-bucket / time arrays, plus the
    evaluation split of the protocol: with >= MIN_EVALUATED_EVENTS (3) events, the last item is the test target
    and the one before it the validation target (the rest is training input)."""
    gaps = F.transform(
        "events",
        lambda e, i: F.when(i == 0, F.lit(0)).otherwise(
            gap_bucket(
                (e["t"] - F.element_at("events", i)["t"]) / 1e6
            )  # element_at is 1-based: i = previous
        ),
    )
    n = F.size("events")
    start = F.greatest(n - max_len + 1, F.lit(1))
    last = F.least(n, F.lit(max_len))
    kept = F.slice("events", start, last)
    df = histories.select(
        "user_id",
        n.alias("n_events"),
        kept.alias("kept"),
        F.slice(gaps, start, last).alias("gap_seq"),
    )
    evaluable = F.col("n_events") >= MIN_EVALUATED_EVENTS
    return df.select(
        "user_id",
        "n_events",
        F.transform("kept", lambda e: e["item"]).alias("item_seq"),
        F.transform("kept", lambda e: e["type"]).alias("type_seq"),
        "gap_seq",
        F.transform("kept", lambda e: (e["t"] / 1_000_000).cast("long")).alias("time_seq"),
        F.when(evaluable, F.element_at(F.transform("kept", lambda e: e["item"]), -2)).alias(
            "valid_item"
        ),
        F.when(evaluable, F.element_at(F.transform("kept", lambda e: e["item"]), -1)).alias(
            "test_item"
        ),
        F.timestamp_micros(F.element_at("kept", -1)["t"]).alias("last_event_time"),
    )


def user_features(
    histories: DataFrame,
    event_types: list[str],
    session_gap_minutes: int,
    top_categories: int,
) -> DataFrame:
    """Activity, recency inputs, session stats, diversity, event-type mix, categories — all
    from the history arrays of ``user_histories`` (no second pass over the events)."""
    gap_s = session_gap_minutes * 60
    n = F.size("events")
    # seconds between consecutive events: element i of the tail minus element i of the whole
    # (direct array access: linear in the history, not quadratic)
    secs = F.transform(
        F.slice("events", 2, F.greatest(n - 1, F.lit(1))),
        lambda e, i: (e["t"] - F.col("events")[i]["t"]) / 1e6,
    )
    secs = F.when(n > 1, secs).otherwise(F.array().cast("array<double>"))
    type_ids = F.transform("events", lambda e: e["type"])
    mix = [
        (F.size(F.filter(type_ids, _is_type(k + 1))) / n).alias(f"share_{name}")
        for k, name in enumerate(event_types)
    ]
    # categories: counts per category (keys sorted), then the top ones by count, then name
    cats = F.filter(F.transform("events", lambda e: e["c"]), lambda c: c.isNotNull())
    counts = F.transform(
        F.array_sort(F.array_distinct(cats)),
        lambda k: F.struct(
            k.alias("category"), F.size(F.filter(cats, lambda c: c == k)).cast("long").alias("n")
        ),
    )
    ranked = F.sort_array(
        F.transform(
            counts, lambda s: F.struct((-s["n"]).alias("m"), s["category"].alias("category"))
        )
    )
    top = (
        F.slice(F.transform(ranked, lambda r: r["category"]), 1, top_categories)
        if top_categories > 0
        else F.array().cast("array<string>")
    )
    base = histories.select(
        "user_id",
        n.alias("n_events"),
        F.size(F.array_distinct(F.transform("events", lambda e: e["item"]))).alias("n_items"),
        F.timestamp_micros(F.element_at("events", 1)["t"]).alias("first_event_time"),
        F.timestamp_micros(F.element_at("events", -1)["t"]).alias("last_event_time"),
        F.size(
            F.array_distinct(F.transform("events", lambda e: F.floor(e["t"] / 86_400_000_000)))
        ).alias("active_days"),
        (F.size(F.filter(secs, lambda s: s >= gap_s)) + 1).alias("n_sessions"),
        F.coalesce(
            F.try_divide(F.aggregate(secs, F.lit(0.0), lambda a, s: a + s), F.size(secs) * 3600),
            F.lit(0.0),
        ).alias("mean_gap_hours"),
        *mix,
        F.map_from_entries(counts).alias("category_counts"),
        top.alias("top_categories"),
    )
    return base.select(
        *[c for c in base.columns if c not in ("category_counts", "top_categories")],
        (F.col("n_items") / F.col("n_events")).alias("diversity"),
        (F.col("n_events") / F.col("n_sessions")).alias("events_per_session"),
        "category_counts",
        "top_categories",
    )
