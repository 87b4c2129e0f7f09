"""Synthetic user events with planted sequential patterns and their ground truth.

The generative story, per user:

* the user belongs to one latent segment; a segment prefers a few item categories;
* items have Zipf popularity; a segment's distribution boosts its categories;
* each segment owns ``rules_per_segment`` item chains ``a -> b -> c`` (disjoint items);
* a user's history is a series of picks: with probability ``chain_rate`` a pick starts
  one of the segment's chains, which is followed to its end with probability
  ``rule_strength`` (else it stops early), each later element swapped for a random
  item with probability ``rule_noise``; other picks are single items;
* events come in sessions (gaps of seconds to minutes) separated by gaps of hours to
  days; event types are mostly views, some carts and buys, buys likelier at chain ends;
* a small share of events is delivered twice (same ``event_id``), as real pipelines do.

Everything is vectorised with NumPy/Arrow: 10M events take well under a minute on 2 cores
plus the time to write the files.

Output (``--out DIR``)::

    DIR/events/part-00000.csv ...     time-ordered batches (csv, jsonl or parquet)
    DIR/truth/users.parquet           user_id -> segment
    DIR/truth/rules.json              planted rules: segment, antecedent, consequent, strength
    DIR/truth/meta.json               parameters and counts
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from patternlake.config import GenerateConfig
from patternlake.errors import PatternlakeError
from patternlake.times import parse_utc

log = logging.getLogger(__name__)

EVENT_TYPES = ("view", "cart", "buy")
SESSION_BREAK = 0.12  # chance that a pick (outside a chain) starts a new session
DUPLICATE_RATE = 0.002


def check_params(p: GenerateConfig) -> None:
    """What the per-field bounds of ``GenerateConfig`` cannot say (with the CLI flags' names)."""
    if p.events < p.users:
        raise PatternlakeError(
            f"generate: --events ({p.events}) must be at least --users ({p.users})"
        )
    planted = p.segments * p.rules_per_segment * p.rule_length
    if planted > p.items // 2:
        raise PatternlakeError(
            f"generate: {p.segments} segments x {p.rules_per_segment} rules x "
            f"{p.rule_length} items = {planted} planted items needs --items >= {2 * planted}"
        )
    _parse_start(p.start)


@dataclass(frozen=True)
class GeneratedEvents:
    events: pa.Table  # user_id, item_id, event_type, event_time (ms), event_id, category, price
    users: pa.Table  # user_id, segment
    rules: list[dict]
    duplicates: int


def generate_events(p: GenerateConfig) -> GeneratedEvents:
    """The events, users and planted rules of ``p``; the same ``p`` (seed included) gives
    the same tables. The steps draw from one generator in a fixed order, so reordering them
    changes the data."""
    check_params(p)
    rng = np.random.default_rng(p.seed)
    catalogue = _catalogue(rng, p)
    chains = _plant_chains(rng, p, catalogue)
    user_seg, n_user = _users(rng, p)
    is_chain, tok_rule, tok_len = _picks(rng, p)
    ev_tok, ev_pos, ev_user = _expand_picks(tok_len, n_user)
    assert len(ev_tok) == p.events
    ev_chain = is_chain[ev_tok]
    item = _items(rng, p, catalogue, chains, user_seg[ev_user], tok_rule[ev_tok], ev_pos, ev_chain)
    ts_ms = _event_times(rng, p, ev_user, n_user, ev_chain & (ev_pos > 0))
    etype = _event_types(rng, ev_chain & (ev_pos == p.rule_length - 1))
    user_names, item_names = _names(p.users), _names(p.items, "i")
    table, duplicates = _events_table(
        rng, p, user_names, item_names, catalogue.item_category, ev_user, item, etype, ts_ms
    )
    users = pa.table({"user_id": user_names, "segment": pa.array(user_seg.astype(np.int32))})
    rules = _planted_rules(chains, item_names, p)
    return GeneratedEvents(events=table, users=users, rules=rules, duplicates=duplicates)


@dataclass(frozen=True)
class _Catalogue:
    item_category: np.ndarray  # (M,) category of each item
    popularity: np.ndarray  # (M,) Zipf weights, in random item order
    seg_cats: list[np.ndarray]  # per segment: the categories it prefers
    seg_cdf: np.ndarray  # (K, M) per segment: cumulative item distribution


def _catalogue(rng: np.random.Generator, p: GenerateConfig) -> _Catalogue:
    """Items, categories, segment preferences."""
    M, K = p.items, p.segments
    item_category = rng.integers(0, p.categories, M)
    popularity = 1.0 / np.arange(1, M + 1) ** p.zipf_exponent
    popularity = popularity[rng.permutation(M)]
    seg_cats = [
        rng.choice(p.categories, size=max(1, p.categories // max(K, 1)), replace=False)
        for _ in range(K)
    ]
    seg_cdf = np.empty((K, M))
    for k in range(K):
        w = popularity * np.where(np.isin(item_category, seg_cats[k]), 6.0, 1.0)
        seg_cdf[k] = np.cumsum(w) / w.sum()
    return _Catalogue(item_category, popularity, seg_cats, seg_cdf)


def _plant_chains(rng: np.random.Generator, p: GenerateConfig, c: _Catalogue) -> np.ndarray:
    """(K, max(rules, 1), L) item chains: disjoint items, taken from each segment's
    mid-popularity range (its preferred categories first)."""
    M, K, L = p.items, p.segments, p.rule_length
    chains = np.empty((K, max(p.rules_per_segment, 1), L), dtype=np.int64)
    used = np.zeros(M, dtype=bool)
    order = np.argsort(-c.popularity)
    mid = order[M // 20 :]  # skip the head: planted rules should not be mere popularity
    for k in range(K):
        prefer = mid[np.isin(c.item_category[mid], c.seg_cats[k])]
        pool = np.concatenate([prefer, mid[~np.isin(mid, prefer)]])
        for r in range(p.rules_per_segment):
            free = pool[~used[pool]]
            pick = rng.choice(free[: max(L * 4, len(free) // 2)], size=L, replace=False)
            used[pick] = True
            chains[k, r] = pick
    return chains


def _users(rng: np.random.Generator, p: GenerateConfig) -> tuple[np.ndarray, np.ndarray]:
    """(U,) each user's segment and (U,) events per user (>= 1, summing to ``p.events``)."""
    K = p.segments
    seg_share = 1.0 + rng.random(K)
    user_seg = rng.choice(K, size=p.users, p=seg_share / seg_share.sum())
    weights = rng.lognormal(0.0, 0.9, p.users)
    return user_seg, _split_exact(p.events, weights, minimum=1)


def _picks(rng: np.random.Generator, p: GenerateConfig) -> tuple[np.ndarray, ...]:
    """Picks (tokens), one per event (always enough: a chain covers several): (T,) whether
    it starts a chain, (T,) which of the segment's chains, (T,) events it covers."""
    T, L = p.events, p.rule_length
    is_chain = (rng.random(T) < p.chain_rate) if p.rules_per_segment else np.zeros(T, bool)
    tok_rule = rng.integers(0, max(p.rules_per_segment, 1), T)
    full = rng.random(T) < p.rule_strength
    tok_len = np.where(is_chain, np.where(full, L, rng.integers(1, L, T)), 1)
    return is_chain, tok_rule, tok_len


def _expand_picks(tok_len: np.ndarray, n_user: np.ndarray) -> tuple[np.ndarray, ...]:
    """Picks expanded into events, the first ``n_user`` of each user kept (user u owns
    picks ``n_user[:u].sum()`` onwards): (n,) pick, position inside it, user of each event."""
    tok_user = np.repeat(np.arange(len(n_user)), n_user)
    ev_tok = np.repeat(np.arange(len(tok_len)), tok_len)
    tok_start = np.cumsum(tok_len) - tok_len
    ev_pos = np.arange(len(ev_tok)) - tok_start[ev_tok]  # position inside the pick
    ev_user = tok_user[ev_tok]
    user_first = np.cumsum(n_user) - n_user  # first pick index of each user
    user_ev_start = tok_start[user_first]  # first expanded event of each user
    rank_in_user = np.arange(len(ev_tok)) - user_ev_start[ev_user]
    keep = rank_in_user < n_user[ev_user]
    return ev_tok[keep], ev_pos[keep], ev_user[keep]


def _items(
    rng: np.random.Generator,
    p: GenerateConfig,
    c: _Catalogue,
    chains: np.ndarray,
    ev_seg: np.ndarray,
    ev_rule: np.ndarray,
    ev_pos: np.ndarray,
    ev_chain: np.ndarray,
) -> np.ndarray:
    """(n,) item of each event: its chain's element (swapped for a segment-drawn item with
    probability ``rule_noise`` after the first), else one drawn from the segment's
    distribution."""
    M, K, L = p.items, p.segments, p.rule_length
    n = len(ev_seg)
    item = np.empty(n, dtype=np.int64)
    for k in range(K):
        m = ev_seg == k
        item[m] = np.searchsorted(c.seg_cdf[k], rng.random(int(m.sum())), side="right")
    np.minimum(item, M - 1, out=item)
    chain_item = chains[ev_seg, ev_rule, np.minimum(ev_pos, L - 1)]
    noisy = ev_chain & (ev_pos > 0) & (rng.random(n) < p.rule_noise)
    return np.where(ev_chain & ~noisy, chain_item, item)


def _event_times(
    rng: np.random.Generator,
    p: GenerateConfig,
    ev_user: np.ndarray,
    n_user: np.ndarray,
    in_chain_tail: np.ndarray,
) -> np.ndarray:
    """(n,) event times (ms since the epoch): sessions with short gaps, a chain inside one
    session, each user's history squeezed into ``p.days`` from ``p.start``."""
    U, n = p.users, len(ev_user)
    avg_events = p.events / U
    span = p.days * 86400.0
    long_gap_mean = 0.5 * span / max(1.0, avg_events * SESSION_BREAK)
    breaks = ~in_chain_tail & (rng.random(n) < SESSION_BREAK)
    gap = np.where(breaks, rng.exponential(long_gap_mean, n), 2.0 + rng.exponential(40.0, n))
    first_ev = np.cumsum(n_user) - n_user
    gap[first_ev] = 0.0
    csum = np.cumsum(gap)
    rel = csum - csum[first_ev][ev_user]  # seconds since the user's first event
    user_span = rel[first_ev + n_user - 1]
    squeeze = np.minimum(1.0, (span * 0.98) / np.maximum(user_span, 1e-9))
    rel *= squeeze[ev_user]
    offset = rng.random(U) * (span - user_span * squeeze)
    start_s = _parse_start(p.start)
    return ((start_s + offset[ev_user] + rel) * 1000).astype(np.int64)


def _event_types(rng: np.random.Generator, chain_end: np.ndarray) -> np.ndarray:
    """(n,) index into ``EVENT_TYPES``: mostly views, some carts and buys, buys likelier
    at a chain's end."""
    u = rng.random(len(chain_end))
    return np.where(
        u < np.where(chain_end, 0.30, 0.04), 2, np.where(u < np.where(chain_end, 0.45, 0.14), 1, 0)
    )


def _names(count: int, prefix: str = "u") -> pa.Array:
    """``u0 .. u<count-1>`` zero-padded to the width of ``count``."""
    return pa.array([f"{prefix}{i:0{len(str(count))}d}" for i in range(count)])


def _events_table(
    rng: np.random.Generator,
    p: GenerateConfig,
    user_names: pa.Array,
    item_names: pa.Array,
    item_category: np.ndarray,
    ev_user: np.ndarray,
    item: np.ndarray,
    etype: np.ndarray,
    ts_ms: np.ndarray,
) -> tuple[pa.Table, int]:
    """The events as strings with Arrow, a ``DUPLICATE_RATE`` share delivered twice, in
    (event_time, event_id) order; and the number of duplicates."""
    n = len(item)
    price = np.round(5.0 + 95.0 * ((item * 2654435761) % 1000) / 1000.0, 2)
    cat_names = pa.array([f"c{c:02d}" for c in range(p.categories)])
    event_ids = pc.binary_join_element_wise("e", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    table = pa.table(
        {
            "user_id": pc.take(user_names, pa.array(ev_user)),
            "item_id": pc.take(item_names, pa.array(item)),
            "event_type": pc.take(pa.array(EVENT_TYPES), pa.array(etype)),
            "event_time": pa.array(ts_ms),
            "event_id": event_ids,
            "category": pc.take(cat_names, pa.array(item_category[item])),
            "price": pa.array(price),
        }
    )
    dup_idx = np.flatnonzero(rng.random(n) < DUPLICATE_RATE)
    table = pa.concat_tables([table, table.take(pa.array(dup_idx))])
    order = pc.sort_indices(table, [("event_time", "ascending"), ("event_id", "ascending")])
    return table.take(order), len(dup_idx)


def _planted_rules(chains: np.ndarray, item_names: pa.Array, p: GenerateConfig) -> list[dict]:
    """Every prefix of every planted chain as a rule: ``a -> b``, ``a, b -> c``, ..."""
    rules = []
    for k in range(p.segments):
        for r in range(p.rules_per_segment):
            names = [item_names[int(i)].as_py() for i in chains[k, r]]
            for j in range(1, p.rule_length):
                rules.append(
                    {
                        "segment": k,
                        "antecedent": names[:j],
                        "consequent": names[j],
                        "strength": p.rule_strength,
                    }
                )
    return rules


def write_generated(gen: GeneratedEvents, out: str | Path, params: GenerateConfig) -> dict:
    """Write events in ``params.files`` time-ordered parts plus the ground truth."""
    events_dir, truth_dir = _prepare_out(Path(out))
    table = gen.events
    n = table.num_rows
    bounds = np.linspace(0, n, params.files + 1).astype(int)
    for i in range(params.files):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        path = events_dir / f"part-{i:05d}.{params.format}"
        if params.format == "csv":
            pacsv.write_csv(part, path)
        elif params.format == "parquet":
            part = part.set_column(
                3, "event_time", pc.cast(part["event_time"], pa.timestamp("ms", tz="UTC"))
            )
            pq.write_table(part, path)
        else:  # jsonl, ISO-8601 times with zone, as web trackers send them
            df = part.to_pandas()
            df["event_time"] = (
                np.datetime_as_string(
                    df["event_time"].to_numpy().astype("datetime64[ms]"), unit="ms"
                )
                + "Z"
            )
            df.to_json(path, orient="records", lines=True)
    pq.write_table(gen.users, truth_dir / "users.parquet")
    (truth_dir / "rules.json").write_text(
        "[\n" + ",\n".join(json.dumps(r) for r in gen.rules) + "\n]\n"
    )
    meta = {
        "params": params.model_dump(),
        "rows": n,
        "unique_events": n - gen.duplicates,
        "duplicates": gen.duplicates,
        "rules": len(gen.rules),
        "generated_at": datetime.now(UTC).isoformat(),
    }
    (truth_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _prepare_out(out: Path) -> tuple[Path, Path]:
    dirs = out / "events", out / "truth"
    for d in dirs:
        try:
            if d.exists() and any(d.iterdir()):
                raise PatternlakeError(
                    f"generate: {d} is not empty; choose another --out or remove it"
                )
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PatternlakeError(
                f"generate: cannot write to {out}: {exc.strerror or exc}"
            ) from None
    return dirs


def generate(params: GenerateConfig, out: str | Path) -> dict:
    started = time.monotonic()
    check_params(params)
    _prepare_out(Path(out))
    gen = generate_events(params)
    log.info(
        "generate: %d events (%d duplicates) for %d users in %.1fs",
        gen.events.num_rows,
        gen.duplicates,
        params.users,
        time.monotonic() - started,
    )
    meta = write_generated(gen, out, params)
    log.info(
        "generate: wrote %d %s files to %s (%.1fs total)",
        params.files,
        params.format,
        out,
        time.monotonic() - started,
    )
    return meta


def _split_exact(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Integers >= minimum, proportional to weights, summing exactly to total."""
    spare = total - minimum * len(weights)
    share = weights / weights.sum() * spare
    base = np.floor(share).astype(np.int64)
    remainder = spare - int(base.sum())
    if remainder:
        base[np.argsort(-(share - base))[:remainder]] += 1
    return base + minimum


def _parse_start(text: str) -> float:
    try:
        return parse_utc(text).timestamp()
    except ValueError:
        raise PatternlakeError(f"generate: start {text!r} is not an ISO-8601 time") from None
