"""Featurization transforms: plain ``DataFrame -> DataFrame`` functions.

Every per-user value is computed from that user's whole silver history only, so an
incremental run (only users touched by new batches) gives exactly what a full rebuild gives.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from patternlake.sequence_schema import GAP_EDGES, MIN_EVALUATED_EVENTS
from patternlake.spark import shuffled_once


def new_item_index(events: DataFrame, existing: DataFrame | None) -> DataFrame:
    """Stable integer ids for items not in ``existing``: numbered after the current maximum,
    in order of (first batch, first time seen in it, item_id). 0 is reserved for padding.

    ``events`` needs item_id, event_time and _batch_order.
    """
    # the earliest time per (item, batch) first: a hash aggregate with a fixed-width buffer.
    # A min over a struct has no fixed-width buffer, so Spark sorted every event by item for
    # it; here it only sees one row per (item, batch).
    per_batch = events.groupBy("item_id", "_batch_order").agg(
        F.min("event_time").alias("event_time")
    )
    first = per_batch.groupBy("item_id").agg(
        F.min(F.struct("_batch_order", "event_time")).alias("first")
    )
    offset = 0
    if existing is not None:
        first = first.join(existing.select("item_id"), "item_id", "left_anti")
        offset = existing.agg(F.max("item_idx")).first()[0] or 0
    # Numbered without a window over all items (Spark would move every row into one
    # partition): range-partition by the order once, count each partition's rows, and number
    # each row after the rows of the partitions before its own. ``shuffled_once`` runs the
    # shuffle a single time, so the counts and the numbering see the same partitions.
    keys = [F.col("first._batch_order"), F.col("first.event_time"), F.col("item_id")]
    ranged, _ = shuffled_once(first.repartitionByRange(*keys))
    # monotonically_increasing_id: the partition index in the upper 31 bits, the row's
    # position within its partition in the lower 33 (documented)
    numbered = ranged.sortWithinPartitions(*keys).withColumn(
        "_pos", F.monotonically_increasing_id()
    )
    part = F.shiftright("_pos", 33)
    counts = sorted(tuple(r) for r in numbered.groupBy(part.alias("p")).count().collect())
    starts, total = [], offset
    for p, n in counts:
        starts += [F.lit(p).cast("long"), F.lit(total).cast("long")]
        total += n
    start = F.create_map(*starts)[part] if starts else F.lit(offset)
    within = F.col("_pos").bitwiseAND(F.lit((1 << 33) - 1))
    return numbered.select(
        "item_id",
        (start + within + 1).cast("int").alias("item_idx"),
        F.col("first.event_time").alias("first_seen"),
        F.col("first._batch_order").cast("int").alias("first_batch"),
    )


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
    # the tie-break fields (batch, file, position, id) only order the events: drop them after
    # the sort, so the cached histories hold time, item, type and category only (the file
    # path and id strings were most of each event's bytes; 30M events ran out of a 4 GB heap).
    # Field access on an array of structs and arrays_zip are compiled; a lambda is not.
    grouped = ev.groupBy("user_id").agg(F.sort_array(F.collect_list("e")).alias("_sorted"))
    o = F.col("_sorted")
    return grouped.select(
        "user_id", F.arrays_zip(o["t"], o["item"], o["type"], o["c"]).alias("events")
    )


def user_sequences(histories: DataFrame, max_len: int) -> DataFrame:
    """The last ``max_len`` events as item / type / gap-bucket / time arrays, plus the
    evaluation split of the protocol: with >= MIN_EVALUATED_EVENTS (3) events, the last item is the test target
    and the one before it the validation target (the rest is training input)."""
    # the first event has no gap (0), each later one the bucket of its gap to the one before
    gaps = F.concat(
        F.array(F.lit(0)), F.transform(_gaps_seconds(F.col("events"), None), gap_bucket)
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
        F.col("kept")["item"].alias("item_seq"),
        F.col("kept")["type"].alias("type_seq"),
        "gap_seq",
        F.transform(F.col("kept")["t"], lambda t: (t / 1_000_000).cast("long")).alias("time_seq"),
        F.when(evaluable, F.element_at("kept", -2)["item"]).alias("valid_item"),
        F.when(evaluable, F.element_at("kept", -1)["item"]).alias("test_item"),
        F.timestamp_micros(F.element_at("kept", -1)["t"]).alias("last_event_time"),
    )


def _with_category_counts(df: DataFrame, events: str = "events", out: str = "_counts") -> DataFrame:
    """``df`` with ``out``: the counts per category of the ``events`` array, as (category, n)
    structs sorted by category.

    The categories without nulls are a column of their own first. An expression that a lambda
    captures is evaluated again for every element the lambda visits: with the filtered array
    inline, each distinct category filtered the whole history again (3x the time of
    ``user_features``' other columns together); a column is only read.
    """
    df = df.withColumn("_cats", F.array_compact(F.col(events)["c"]))
    cats = F.col("_cats")
    counts = F.transform(
        F.array_sort(F.array_distinct(cats)),
        lambda k: F.struct(
            k.alias("category"),
            (F.size(cats) - F.size(F.array_remove(cats, k))).cast("long").alias("n"),
        ),
    )
    return df.withColumn(out, counts).drop("_cats")


def _top_categories(counts: Column, top_categories: int) -> Column:
    """The ``top_categories`` categories of (category, n) structs: by count, then name."""
    if top_categories <= 0:
        return F.array().cast("array<string>")
    ranked = F.sort_array(
        F.transform(
            counts, lambda s: F.struct((-s["n"]).alias("m"), s["category"].alias("category"))
        )
    )
    return F.slice(ranked["category"], 1, top_categories)


def _mean_gap_hours(first_micros: Column, last_micros: Column, n: Column) -> Column:
    """Mean seconds between consecutive events, in hours: the gaps telescope to last - first,
    so a full rebuild and an appended history give the same double, bit for bit."""
    return F.when(n > 1, (last_micros - first_micros) / 1e6 / ((n - 1) * F.lit(3600.0))).otherwise(
        F.lit(0.0)
    )


def _day(micros: Column) -> Column:
    return F.floor(micros / 86_400_000_000)


def _gaps_seconds(events: Column, previous_micros: Column | None) -> Column:
    """Seconds from each event to the one before it. ``previous_micros`` is the time of the
    event before the array's first (an appended history's stored last event); without it,
    the first event has no gap and the array is one shorter than ``events``."""
    if previous_micros is not None:
        return F.transform(
            events,
            lambda e, i: (
                (
                    e["t"]
                    - F.when(i == 0, previous_micros).otherwise(
                        events[F.greatest(i - 1, F.lit(0))]["t"]
                    )
                )
                / 1e6
            ),
        )
    n = F.size(events)
    # element i of the tail minus element i of the whole (direct access: linear, not quadratic)
    secs = F.transform(
        F.slice(events, 2, F.greatest(n - 1, F.lit(1))),
        lambda e, i: (e["t"] - events[i]["t"]) / 1e6,
    )
    return F.when(n > 1, secs).otherwise(F.array().cast("array<double>"))


def _type_counts(events: Column, event_types: list[str]) -> list[Column]:
    """Events of each type: the array's size less its size without that type (compiled
    array functions, no per-element lambda)."""
    type_ids = events["type"]
    n = F.size(type_ids)
    return [n - F.size(F.array_remove(type_ids, k + 1)) for k in range(len(event_types))]


def _finish_features(df: DataFrame, event_types: list[str]) -> DataFrame:
    """Columns derived from the counts, in the contract's order."""
    return df.select(
        "user_id",
        "n_events",
        "n_items",
        "first_event_time",
        "last_event_time",
        "active_days",
        "n_sessions",
        "mean_gap_hours",
        *[(F.col(f"_n_{name}") / F.col("n_events")).alias(f"share_{name}") for name in event_types],
        (F.col("n_items") / F.col("n_events")).alias("diversity"),
        (F.col("n_events") / F.col("n_sessions")).alias("events_per_session"),
        "category_counts",
        "top_categories",
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
    events = F.col("events")
    n = F.size(events)
    first, last = F.element_at(events, 1)["t"], F.element_at(events, -1)["t"]
    # counts is read twice below: a column of its own, so that it is computed once
    counts = F.col("_counts")
    base = _with_category_counts(histories).select(
        "user_id",
        n.alias("n_events"),
        F.size(F.array_distinct(events["item"])).alias("n_items"),
        F.timestamp_micros(first).alias("first_event_time"),
        F.timestamp_micros(last).alias("last_event_time"),
        F.size(F.array_distinct(F.transform(events["t"], _day))).alias("active_days"),
        (F.size(F.filter(_gaps_seconds(events, None), lambda s: s >= gap_s)) + 1).alias(
            "n_sessions"
        ),
        _mean_gap_hours(first, last, n).alias("mean_gap_hours"),
        *[
            c.alias(f"_n_{name}")
            for c, name in zip(_type_counts(events, event_types), event_types, strict=True)
        ],
        F.map_from_entries(counts).alias("category_counts"),
        _top_categories(counts, top_categories).alias("top_categories"),
    )
    return _finish_features(base, event_types)


# --- appending new events to stored histories (the incremental day) ----------------------

STORED_COLUMNS = ("n_events", "n_items", "first_event_time", "last_event_time", "active_days")


def stored_state(sequences: DataFrame, features: DataFrame, event_types: list[str]) -> DataFrame:
    """What appending needs of a user's stored rows: the kept sequence arrays and the
    features' counts (event-type counts recovered exactly from the shares: round(share * n))."""
    feats = features.select(
        "user_id",
        *[F.col(c).alias(f"_s_{c}") for c in (*STORED_COLUMNS, "n_sessions", "category_counts")],
        *[
            F.round(F.col(f"share_{name}") * F.col("n_events")).cast("int").alias(f"_s_n_{name}")
            for name in event_types
        ],
    )
    seqs = sequences.select(
        "user_id",
        *[F.col(c).alias(f"_s_{c}") for c in ("item_seq", "type_seq", "gap_seq", "time_seq")],
    )
    return feats.join(seqs, "user_id")


def appendable(joined: DataFrame) -> Column:
    """A stored user whose new events all sort after the stored ones: the earliest new event
    is not before the stored last event (a tie sorts after it: the new batch is later)."""
    return F.col("_s_n_events").isNotNull() & (
        F.element_at("events", 1)["t"] >= F.unix_micros(F.col("_s_last_event_time"))
    )


def appended_sequences(joined: DataFrame, max_len: int) -> DataFrame:
    """``user_sequences`` rows of appendable users: the stored arrays followed by the new
    events, the last ``max_len`` kept — what ``user_sequences`` of the whole history gives."""
    events = F.col("events")
    last = F.unix_micros(F.col("_s_last_event_time"))
    new_gaps = F.transform(_gaps_seconds(events, last), gap_bucket)

    def keep(stored: str, new: Column) -> Column:
        both = F.concat(F.col(stored), new)
        return F.slice(both, F.greatest(F.size(both) - max_len + 1, F.lit(1)), max_len)

    df = joined.select(
        "user_id",
        (F.col("_s_n_events") + F.size(events)).cast("int").alias("n_events"),
        keep("_s_item_seq", events["item"]).alias("item_seq"),
        keep("_s_type_seq", events["type"]).alias("type_seq"),
        keep("_s_gap_seq", new_gaps).alias("gap_seq"),
        keep("_s_time_seq", F.transform(events["t"], lambda t: (t / 1_000_000).cast("long"))).alias(
            "time_seq"
        ),
        F.timestamp_micros(F.element_at(events, -1)["t"]).alias("last_event_time"),
    )
    evaluable = F.col("n_events") >= MIN_EVALUATED_EVENTS
    return df.select(
        "user_id",
        "n_events",
        "item_seq",
        "type_seq",
        "gap_seq",
        "time_seq",
        F.when(evaluable, F.element_at("item_seq", -2)).alias("valid_item"),
        F.when(evaluable, F.element_at("item_seq", -1)).alias("test_item"),
        "last_event_time",
    )


def appended_features(
    joined: DataFrame,
    unseen_items: DataFrame | None,
    event_types: list[str],
    session_gap_minutes: int,
    top_categories: int,
) -> DataFrame:
    """``user_features`` rows of appendable users from their stored counts and the new
    events. A user's distinct items come from the stored sequence when it holds the whole
    history, else from ``unseen_items`` (user_id, n_unseen: the distinct new items the user
    had not had before; needed only for users whose sequence is cut at max_history). Gives
    what ``user_features`` of the whole history gives."""
    gap_s = session_gap_minutes * 60
    events = F.col("events")
    last_before = F.unix_micros(F.col("_s_last_event_time"))
    first = F.unix_micros(F.col("_s_first_event_time"))
    last = F.element_at(events, -1)["t"]
    n = F.col("_s_n_events") + F.size(events)
    new_days = F.array_distinct(F.transform(events["t"], _day))
    stored_counts = F.col("_s_category_counts")
    merged = F.map_zip_with(
        stored_counts,
        F.map_from_entries("_new_counts"),
        lambda _k, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0)),
    )
    merged_counts = F.transform(
        F.array_sort(F.map_entries(merged)),
        lambda e: F.struct(e["key"].alias("category"), e["value"].alias("n")),
    )
    counts = F.col("_counts")  # read twice below: computed once, in a column of its own
    whole = F.col("_s_n_events") == F.size("_s_item_seq")
    items = F.concat("_s_item_seq", events["item"])
    if unseen_items is None:
        joined = joined.withColumn("n_unseen", F.lit(None).cast("long"))
    else:
        joined = joined.join(unseen_items, "user_id", "left")
    joined = _with_category_counts(joined, out="_new_counts").withColumn("_counts", merged_counts)
    n_items = F.when(whole, F.size(F.array_distinct(items))).otherwise(
        F.col("_s_n_items") + F.coalesce("n_unseen", F.lit(0))
    )
    base = joined.select(
        "user_id",
        n.cast("int").alias("n_events"),
        n_items.cast("int").alias("n_items"),
        F.col("_s_first_event_time").alias("first_event_time"),
        F.timestamp_micros(last).alias("last_event_time"),
        (
            F.col("_s_active_days") + F.size(F.array_except(new_days, F.array(_day(last_before))))
        ).alias("active_days"),
        (
            F.col("_s_n_sessions")
            + F.size(F.filter(_gaps_seconds(events, last_before), lambda s: s >= gap_s))
        ).alias("n_sessions"),
        _mean_gap_hours(first, last, n).alias("mean_gap_hours"),
        *[
            (F.col(f"_s_n_{name}") + c).alias(f"_n_{name}")
            for c, name in zip(_type_counts(events, event_types), event_types, strict=True)
        ],
        F.map_from_entries(counts).alias("category_counts"),
        _top_categories(counts, top_categories).alias("top_categories"),
    )
    return _finish_features(base, event_types)


def unseen_items(pairs: DataFrame, earlier_events: DataFrame, broadcast: bool) -> DataFrame:
    """(user_id, n_unseen): per user, the (user_id, item_id) ``pairs`` (distinct) that
    ``earlier_events`` does not hold. Reads two columns of the earlier events; with
    ``broadcast`` (few pairs), looks them up without shuffling the earlier events."""
    seen = earlier_events.select("user_id", "item_id").join(
        F.broadcast(pairs) if broadcast else pairs, ["user_id", "item_id"], "left_semi"
    )
    return (
        pairs.join(seen.distinct(), ["user_id", "item_id"], "left_anti")
        .groupBy("user_id")
        .agg(F.count(F.lit(1)).alias("n_unseen"))
    )
