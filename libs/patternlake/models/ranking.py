"""Ranking a catalogue without holding a (users x catalogue) matrix.

Every served model (teacher, ensemble, student over the whole or a segment catalogue,
int8 student) scores item j for a user as a product of the user's hidden state with item
j's vector (plus the seen term). A :class:`Ranker` exposes that split: ``encode`` runs the
network once per user, ``chunk`` scores a contiguous range of item ids, ``items`` scores
chosen items only. On top of it:

* :func:`top_k` -- exact top-K over item chunks, merging a running top-K; ties are broken
  by the lower item id, the same rule as :func:`dense_top_k`, so the two agree exactly;
* :func:`candidate_top_k` -- the same rule over chosen candidates per user (what an
  approximate item index's candidates are reranked by, ``models.ann``);
* :func:`target_ranks` -- the evaluation protocol's rank of a held-out target (items
  scored at or above it, ties against the target) and each user's top 10, counted over
  chunks;
* :func:`delete_positions` -- histories with chosen events deleted, built with tensor
  operations (explanations and their faithfulness check).

Memory: a chunk holds ``batch x chunk_items`` floats; :func:`chunk_items` sizes it from a
byte budget (default 16 MB), so the peak does not grow with the catalogue. Speed: a chunk's
scores are written into one reused buffer (no allocation per chunk), each block is read a
few times while it is in cache (16 MB: the size where one thread's product of a (1,024 x 64)
state with a 4,096-item block still runs at full rate here), and a row's block top-k is
taken only where the block's best item beats the row's running k-th (after the first
chunks, a few percent of rows). Shapes: B users,
L window, D width, N catalogue (id 0 is padding, never returned).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CHUNK_BYTES = 16 << 20
NEG = float("-inf")


def chunk_items(batch: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Items per chunk so that a (batch x chunk) float32 block stays within the budget."""
    return max(1024, budget_bytes // (4 * max(1, batch)))


def _finite(s: torch.Tensor) -> torch.Tensor:
    """NaN and +inf (a diverged model) rank last, like a masked item; in place, and one
    read of the block when there are none."""
    top = s.max()  # NaN when any is NaN
    if not bool(top < float("inf")):
        s.nan_to_num_(nan=NEG, posinf=NEG, neginf=NEG)
    return s


def _finite_rows(s: torch.Tensor) -> torch.Tensor:
    """:func:`_finite` that also returns each row's best score (B,), from the same read."""
    top = s.amax(1)  # NaN where a row has a NaN
    if not bool((top < float("inf")).all()):
        s.nan_to_num_(nan=NEG, posinf=NEG, neginf=NEG)
        top = s.amax(1)
    return top


def _block(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows x cols) view at the start of a flat buffer."""
    return buf[: rows * cols].view(rows, cols)


class WindowIndex:
    """A (B, L) window's items sorted once, with their rows: the items of any id range are
    one slice (two binary searches), instead of a pass over the window per chunk."""

    def __init__(self, window: torch.Tensor):
        ids, order = window.reshape(-1).sort()
        self.ids, self.rows = ids, order // max(1, window.shape[1])

    def block(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the window items that fall in items lo..hi (padding never):
        the (B x L) cells a seen term or a mask touches, instead of a (B x chunk) mask."""
        bounds = torch.tensor([max(lo, 1), hi], dtype=self.ids.dtype, device=self.ids.device)
        a, b = torch.searchsorted(self.ids, bounds).tolist()
        return self.rows[a:b], self.ids[a:b] - lo


def _mask_block(s: torch.Tensor, window: WindowIndex, lo: int, hi: int) -> torch.Tensor:
    """s with the window's items in lo..hi set to -inf (in place)."""
    rows, cols = window.block(lo, hi)
    s[rows, cols] = NEG
    return s


def _seen_items(window: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: candidate c occurs in the row's window."""
    return (cand.unsqueeze(2) == window.unsqueeze(1)).any(2) & (cand > 0)


@dataclass
class DotState:
    hidden: torch.Tensor  # (B, D): the state after the last position
    window: torch.Tensor  # (B, L): global item ids of the input window
    _index: WindowIndex | None = field(default=None, repr=False)

    def index(self) -> WindowIndex:
        """The window's items sorted (built on the first chunk, kept for the others)."""
        if self._index is None:
            self._index = WindowIndex(self.window)
        return self._index


class DotRanker:
    """A SequentialTeacher-family network: score(j) = h . E[local(j)] (+ seen term).
    ``to_local`` maps global ids to a segment student's local ids (< 2: not scored)."""

    def __init__(self, net: nn.Module, n_global: int, to_local: torch.Tensor | None = None):
        self.net = net
        self.n_items = n_global
        self.to_local = to_local
        self.table = net.item_emb.weight
        self.seen_weight = net.seen_weight if net.config.seen_bias else None
        self.bias = net.item_bias if getattr(net.config, "item_bias", False) else None

    def _local(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.to_local is None else self.to_local[ids]

    def encode(self, x: torch.Tensor) -> DotState:
        h = self.net.encode_last(self._local(x[:, 0]), x[:, 1], x[:, 2])
        return DotState(h, x[:, 0])

    def width(self, state: DotState) -> int:
        return self.n_items

    def chunk(
        self, state: DotState, lo: int, hi: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of items lo..hi (B, hi - lo), written into ``out`` when given (a
        contiguous block of that shape, reused across chunks; no gradient)."""
        if self.to_local is None:
            block = self.table[lo:hi]
            bias = None if self.bias is None else self.bias[lo:hi]
            scored = None
        else:
            local = self.to_local[lo:hi]
            block = self.table[local]
            bias = None if self.bias is None else self.bias[local]
            scored = local >= 2
        if out is None:
            s = state.hidden @ block.T
        else:
            s = torch.mm(state.hidden.detach(), block.detach().T, out=out)
        if bias is not None:
            s += bias.detach()
        if self.seen_weight is not None:
            rows, cols = state.index().block(lo, hi)
            # an item twice in the window gets the term once: both writes carry one value
            s[rows, cols] = s[rows, cols] + self.seen_weight
        if scored is not None:
            s.masked_fill_(~scored.unsqueeze(0), NEG)
        if lo == 0:
            s[:, 0] = NEG
        return s

    def items(self, state: DotState, cand: torch.Tensor) -> torch.Tensor:
        local = self._local(cand)
        s = (state.hidden.unsqueeze(1) * self.table[local]).sum(-1)
        if self.bias is not None:
            s = s + self.bias[local]
        if self.seen_weight is not None:
            s = s + self.seen_weight * _seen_items(state.window, cand).to(s.dtype)
        bad = (cand == 0) if self.to_local is None else (local < 2)
        return s.masked_fill(bad, NEG)

    def items_after_deletion(
        self,
        hidden: torch.Tensor,
        window: torch.Tensor,
        cand: torch.Tensor,
        deleted: torch.Tensor,
    ) -> torch.Tensor:
        """(B, E, K): :meth:`items` of each row's K candidates ``cand`` (B, K) for E states
        per row (B, E, D) whose histories are the row's ``window`` (B, L) less one event,
        ``deleted`` (B, E) its item id: the seen term counts the window's other occurrences.
        One batched product per row's K item vectors (no (B x E x K x D) gather)."""
        local = self._local(cand)
        s = torch.bmm(hidden, self.table[local].transpose(1, 2))
        if self.bias is not None:
            s = s + self.bias[local].unsqueeze(1)
        if self.seen_weight is not None:
            count = (cand.unsqueeze(2) == window.unsqueeze(1)).sum(2)  # (B, K) occurrences
            left = count.unsqueeze(1) - (deleted.unsqueeze(2) == cand.unsqueeze(1)).long()
            seen = (left > 0) & (cand > 0).unsqueeze(1)
            s = s + self.seen_weight * seen.to(s.dtype)
        bad = (cand == 0) if self.to_local is None else (local < 2)
        return s.masked_fill(bad.unsqueeze(1), NEG)


@dataclass
class EnsembleState:
    members: list[DotState]
    log_z: list[torch.Tensor]  # (B,) each member's log-partition over the catalogue


class EnsembleRanker:
    """log mean softmax of K members (``TeacherEnsemble``): each member's normaliser is
    summed over the item chunks first (one extra catalogue pass at ``encode``)."""

    def __init__(self, members: list[DotRanker], chunk: int = 0):
        self.members = members
        self.n_items = members[0].n_items
        self.chunk_size = chunk

    def encode(self, x: torch.Tensor) -> EnsembleState:
        return self.of_states([m.encode(x) for m in self.members])

    def of_states(self, states: list[DotState]) -> EnsembleState:
        """The ensemble's state from its members' (each member's normaliser summed over the
        item chunks): also for states that are not a window's last position (the top-K of
        every training position, ``students.topk``)."""
        rows = len(states[0].hidden)
        device = states[0].hidden.device
        size = self.chunk_size or chunk_items(rows)
        log_z = []
        for m, st in zip(self.members, states, strict=True):
            z = torch.full((rows,), NEG, device=device)
            for lo in range(0, self.n_items, size):
                block = m.chunk(st, lo, min(self.n_items, lo + size))
                z = torch.logaddexp(z, torch.logsumexp(block, dim=1))
            log_z.append(z)
        return EnsembleState(states, log_z)

    def width(self, state: EnsembleState) -> int:
        return self.n_items

    def _mean(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(parts))

    def chunk(
        self, state: EnsembleState, lo: int, hi: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._mean(
            [
                m.chunk(st, lo, hi) - z.unsqueeze(1)
                for m, st, z in zip(self.members, state.members, state.log_z, strict=True)
            ]
        )

    def items(self, state: EnsembleState, cand: torch.Tensor) -> torch.Tensor:
        return self._mean(
            [
                m.items(st, cand) - z.unsqueeze(1)
                for m, st, z in zip(self.members, state.members, state.log_z, strict=True)
            ]
        )


class DenseRanker:
    """Any callable (B, 3, L) -> (B, N) scores (a baseline, a hand-made test model, the int8
    ``dynamic`` runtime): the whole row is computed at ``encode``, so memory is (B x N)."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], n_items: int = 0):
        self.score = score
        self.n_items = n_items  # when known: bounds the histories encoded at once

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

    def width(self, state: torch.Tensor) -> int:
        return state.shape[1]

    def chunk(
        self, state: torch.Tensor, lo: int, hi: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = state[:, lo:hi].clone()  # in the state's dtype (a baseline's float64): no ``out``
        if lo == 0:
            s[:, 0] = NEG
        return s

    def items(self, state: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return state.gather(1, cand).masked_fill(cand == 0, NEG)


Ranker = DotRanker | EnsembleRanker | DenseRanker


def ranker_for(model: Any) -> Ranker:
    """The chunked view of a served model (a ranker as it is); a model of unknown kind is
    ranked densely."""
    from patternlake.models.student import Int8Student, Student
    from patternlake.models.teacher import SequentialTeacher, TeacherEnsemble, TeacherScorer

    if isinstance(model, DotRanker | EnsembleRanker | DenseRanker):
        return model
    if isinstance(model, TeacherScorer):
        model = model.teacher
    if isinstance(model, SequentialTeacher):
        return DotRanker(model, model.config.n_items)
    if isinstance(model, TeacherEnsemble):
        return EnsembleRanker([DotRanker(m, m.config.n_items) for m in model.nets])
    if isinstance(model, Int8Student) and model.out is None:  # dequantized: an fp32 shell
        model = model.shell
    if isinstance(model, Student):
        to_local = None if model.catalogue is None else model.to_local
        return DotRanker(model.net, model.n_global, to_local)
    return DenseRanker(model, int(getattr(model, "n_global", 0) or 0))


EPS32 = float(torch.finfo(torch.float32).eps)


def _tolerance(ranker: Any, state: Any, t: torch.Tensor) -> torch.Tensor:
    """(B,) how far two kernels' float32 sums of the same score may differ: for a dot
    product of width D, D ulps of ||h|| x the largest item vector's norm (Cauchy-Schwarz
    bounds the sum of |h_i e_i|); an ensemble adds its log-softmax's rounding; a dense or
    baseline ranker reads the same numbers both ways (0)."""
    if isinstance(ranker, DotRanker):
        bound = state.hidden.norm(dim=1) * ranker.table.detach().norm(dim=1).max()
        return 4 * ranker.table.shape[1] * EPS32 * bound + 4 * EPS32 * t.abs().nan_to_num(0.0)
    if isinstance(ranker, EnsembleRanker):
        parts = [_tolerance(m, st, t) for m, st in zip(ranker.members, state.members, strict=True)]
        return torch.stack(parts).sum(0) + 1e-5 * (1 + t.abs().nan_to_num(0.0))
    return torch.zeros_like(t)


def _count_above(s: torch.Tensor, threshold: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Per row, how many of s (B, C) are > threshold (B, 1): the difference clamped at 0
    and its sign, summed in float32 (exact below 2^24 items per chunk). Three passes
    over one reused buffer, about 3x faster than summing a bool block, which widens every
    element to int64 first."""
    torch.sub(s, threshold, out=buf)
    return buf.clamp_(min=0).sign_().sum(1).long()


def _count_at_least(s: torch.Tensor, threshold: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Per row, how many of s are >= threshold: all but those below it."""
    torch.sub(threshold, s, out=buf)
    return s.shape[1] - buf.clamp_(min=0).sign_().sum(1).long()


def _rows(state: Any) -> int:
    if isinstance(state, DotState):
        return len(state.hidden)
    if isinstance(state, EnsembleState):
        return len(state.members[0].hidden)
    return len(state)


def _order(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row by (value descending, id ascending)."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


def _merge(
    best_v: torch.Tensor | None,
    best_i: torch.Tensor | None,
    v: torch.Tensor,
    i: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k merged with a block's."""
    if best_v is None or best_i is None:
        return v, i
    return _order(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k)


def _block_top(s: torch.Tensor, lo: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one block under the tie rule (value descending, id ascending). Rows
    where an item left out ties with the k-th value (a tie across the boundary) take
    everything above it, then the lowest ids equal to it."""
    if k < s.shape[1]:
        # one more than asked: where the (k+1)-th equals the k-th, an item tied with the
        # k-th is left out (no pass over the block to find out)
        values, idx = s.topk(k + 1, dim=1)
        tied = torch.nonzero(values[:, k] == values[:, k - 1], as_tuple=True)[0]
        values, idx = values[:, :k], idx[:, :k]
    else:
        values, idx = s.topk(k, dim=1)
        tied = values.new_zeros(0, dtype=torch.long)
    kth = values[:, -1:]
    if len(tied):
        sub, sub_kth = s[tied], kth[tied]
        above = values[tied] > sub_kth
        cols = torch.arange(s.shape[1], device=s.device)
        low = torch.where(sub == sub_kth, cols, s.shape[1]).topk(k, largest=False)[0]
        cand_ids = torch.cat([torch.where(above, idx[tied], 0), low.clamp_max(s.shape[1] - 1)], 1)
        cand_vals = torch.cat(
            [torch.where(above, values[tied], NEG), torch.where(low < s.shape[1], sub_kth, NEG)], 1
        )
        keep = torch.cat([above, low < s.shape[1]], 1)
        # dropped slots: -inf and an id past every real one, so they sort last
        cand_ids = torch.where(keep, cand_ids, torch.iinfo(torch.int64).max - lo)
        values, idx = values.clone(), idx.clone()
        values[tied], idx[tied] = _order(cand_vals, cand_ids, k)
    return _order(values, idx + lo, k)


def _merge_rows(
    best: tuple[torch.Tensor, torch.Tensor] | None,
    s: torch.Tensor,
    top: torch.Tensor,
    lo: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (values, ids) merged with block s (items lo.., each row's best
    score ``top``). Only rows whose block best beats their running k-th can change (an
    item equal to the k-th loses the tie: its id is higher than every earlier chunk's),
    and in them only the items above it: those few are gathered and merged, and a block
    top-k is taken only where a row has many (the first chunks)."""
    kk = min(k, s.shape[1])
    if best is None:
        return _block_top(s, lo, kk)
    best_v, best_i = best
    if best_v.shape[1] < k:  # fewer than k items so far (chunks smaller than k)
        return _merge(best_v, best_i, *_block_top(s, lo, kk), k)
    kth = best_v[:, -1]
    rows = torch.nonzero(top > kth, as_tuple=True)[0]
    if not len(rows):
        return best_v, best_i
    every = len(rows) == len(s)
    sub = s if every else s[rows]
    r, c = torch.nonzero(sub > kth[rows].unsqueeze(1), as_tuple=True)  # row-major
    counts = torch.bincount(r, minlength=len(rows))
    width = int(counts.max())
    if width > max(4 * k, 64):
        v, i = _block_top(sub, lo, kk)
    else:  # each row's items above its k-th, padded with -inf at an id past every real one
        at = torch.arange(len(r), device=s.device) - (counts.cumsum(0) - counts)[r]
        v = torch.full((len(rows), width), NEG, device=s.device)
        i = torch.full((len(rows), width), torch.iinfo(torch.int64).max, device=s.device)
        v[r, at], i[r, at] = sub[r, c], c + lo
    v, i = _merge(best_v[rows], best_i[rows], v, i, k)
    if every:
        return v, i
    best_v, best_i = best_v.clone(), best_i.clone()
    best_v[rows], best_i[rows] = v, i
    return best_v, best_i


def top_k(
    ranker: Ranker,
    state: Any,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's k best items over chunks of ``chunk`` items, ties to the
    lower id; padding and, with ``exclude`` ((B, L) item ids), the user's past items are
    never returned. A row with fewer than k scorable items ends in -inf values (callers
    drop them; their ids are meaningless)."""
    n = ranker.width(state)
    b = _rows(state)
    size = chunk or chunk_items(b)
    buf = torch.empty(b * min(size, n))
    masked = WindowIndex(exclude) if exclude is not None else None
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        s = ranker.chunk(state, lo, hi, out=_block(buf, b, hi - lo))
        top = _finite_rows(s)
        if masked is not None:
            _mask_block(s, masked, lo, hi)  # only lowers scores: ``top`` stays an upper bound
        best = _merge_rows(best, s, top, lo, k)
    assert best is not None
    return best[0], best[1].clamp_max(n - 1)


def candidate_top_k(
    ranker: Ranker,
    state: Any,
    cand: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's k best items among its candidates ``cand`` ((B, C) item
    ids, C >= k; repeats count once, 0 is padding), scored by ``ranker.items`` (seen term and
    masks included), ties to the lower id as in :func:`top_k`; ``exclude`` as there. What an
    approximate index's candidates are reranked by (``models.ann``)."""
    s = _finite(ranker.items(state, cand))
    cand, order = cand.sort(dim=1)
    s = s.gather(1, order)
    s[:, 1:].masked_fill_(cand[:, 1:] == cand[:, :-1], NEG)  # a repeat: its first copy stays
    if exclude is not None:
        s.masked_fill_(_seen_items(exclude, cand), NEG)
    return _order(s, cand, k)


def dense_top_k(
    scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: :func:`top_k` on a whole (B, N) matrix by one stable sort."""
    s = _finite(scores.float().clone())
    s[:, 0] = NEG
    if exclude is not None:
        s.scatter_(1, exclude, NEG)
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), order


def _read_targets(
    s: torch.Tensor,
    targets: torch.Tensor,
    lo: int,
    hi: int,
    exact: torch.Tensor,
    masked: WindowIndex | None,
) -> None:
    """The scores of the targets in items lo..hi read from block s into ``exact``, then the
    window's items (``masked``) masked in s, the target itself never (in place)."""
    mine = torch.nonzero((targets >= lo) & (targets < hi), as_tuple=True)[0]
    exact[mine] = s[mine, targets[mine] - lo]
    if masked is not None:
        _mask_block(s, masked, lo, hi)
        s[mine, targets[mine] - lo] = exact[mine]


def target_ranks(
    ranker: Ranker,
    state: Any,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    k: int = 10,
    chunk: int = 0,
    cap: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, top-k ids): each target's 0-based rank among all items, counted over item
    chunks (items scored at or above the target, ties against it; a target scored -inf or
    NaN ranks last), and each row's top k (0 where the score is -inf), with ``exclude``'s
    past items masked except the target itself. Equals ``models.metrics`` on the dense
    matrix.

    ``cap``: ranks at or past ``cap`` are returned as ``cap`` (the metrics' cut-offs never
    look further: ``metrics.RANK_CAP``), which :func:`capped_ranks` finds from a running
    top ``cap + 1`` instead of counting every item against the target."""
    if cap is not None:
        return capped_ranks(ranker, state, targets, cap, exclude, k, chunk)
    # the target's score as ``chunk`` computes it (a matrix product) is only known in its
    # own chunk; ``items`` (a different kernel) may differ in the last bits. So items clearly
    # above the estimate are counted on the way, those within a tolerance of it are kept
    # (a handful per user) and compared with the exact score at the end.
    t = _finite(ranker.items(state, targets.unsqueeze(1)))[:, 0]  # (B,)
    dead = ~torch.isfinite(t)  # a target scored -inf (or NaN) ranks last
    tol = _tolerance(ranker, state, t)
    t_band = torch.where(dead, float("inf"), t)
    exact = t.clone()
    n = ranker.width(state)
    b = len(targets)
    size = chunk or chunk_items(b)
    above = torch.zeros(b, dtype=torch.int64, device=targets.device)
    band_rows, band_values = [targets.new_zeros(0)], [t.new_zeros(0)]
    scores = torch.empty(b * min(size, n), device=targets.device)
    buf = torch.empty((b, min(size, n)), device=targets.device)
    masked = WindowIndex(exclude) if exclude is not None else None
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        s = ranker.chunk(state, lo, hi, out=_block(scores, b, hi - lo))
        top = _finite_rows(s)  # masking below only lowers scores: an upper bound
        _read_targets(s, targets, lo, hi, exact, masked)
        buf = buf[:, : hi - lo]
        clear = _count_above(s, (t_band + tol).unsqueeze(1), buf)
        near = _count_at_least(s, (t_band - tol).unsqueeze(1), buf) - clear
        above += clear
        rows = torch.nonzero(near > 0, as_tuple=True)[0]  # the target's row, rare near-ties
        if len(rows):
            sub, ts = s[rows], t_band[rows].unsqueeze(1)
            r, c = torch.nonzero(
                (sub >= ts - tol[rows].unsqueeze(1)) & (sub <= ts + tol[rows].unsqueeze(1)),
                as_tuple=True,
            )
            band_rows.append(rows[r])
            band_values.append(sub[r, c])
        best = _merge_rows(best, s, top, lo, k)
    assert best is not None
    best_v, best_i = best
    rows, values = torch.cat(band_rows), torch.cat(band_values)
    above.index_add_(0, rows, (values >= exact[rows]).long())
    ranks = torch.where(dead | ~torch.isfinite(exact), n - 1, above - 1)
    return ranks, torch.where(best_v > NEG, best_i, 0)


def capped_ranks(
    ranker: Ranker,
    state: Any,
    targets: torch.Tensor,
    cap: int,
    exclude: torch.Tensor | None = None,
    k: int = 10,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`target_ranks` with ranks past ``cap`` returned as ``cap``, from the chunks'
    running top ``cap + 1`` (the same pass as :func:`top_k`: a block's top is taken only
    on rows whose best item beats their running last). The target's score is read in its
    own chunk, so it and the list's values come from one kernel and compare exactly: the
    rank is the number of listed items scored at or above it, minus one, and when even the
    last listed item is, at least ``cap + 1`` items are (rank ``cap``)."""
    n = ranker.width(state)
    b = len(targets)
    size = chunk or chunk_items(b)
    keep = min(max(cap + 1, k), n)
    scores = torch.empty(b * min(size, n), device=targets.device)
    masked = WindowIndex(exclude) if exclude is not None else None
    exact: torch.Tensor | None = None
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        s = ranker.chunk(state, lo, hi, out=_block(scores, b, hi - lo))
        if exact is None:  # the scores' dtype (a baseline's float64 stays float64)
            exact = torch.full((b,), NEG, dtype=s.dtype, device=s.device)
        top = _finite_rows(s)  # masking below only lowers scores: an upper bound
        _read_targets(s, targets, lo, hi, exact, masked)
        best = _merge_rows(best, s, top, lo, keep)
    assert best is not None and exact is not None
    best_v, best_i = best
    at_or_above = (best_v >= exact.unsqueeze(1)).sum(1)
    ranks = (at_or_above - 1).clamp(0, cap)
    # a target scored -inf (or NaN) ranks last
    ranks = torch.where(exact > NEG, ranks, min(cap, n - 1))
    top_k_ids = torch.where(best_v[:, :k] > NEG, best_i[:, :k], 0)
    return ranks, top_k_ids


def delete_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, 3, L) with, in each row b, the events at ``positions[b]`` (a boolean (B, L)
    mask) removed and the rest shifted right (left padding grows): the history as if those
    events had not happened. One scatter, no loop over rows."""
    B, C, L = x.shape
    keep = ~positions & (x[:, 0] > 0)
    after = keep.flip(1).cumsum(1).flip(1) - keep.long()  # kept events after each position
    dest = torch.where(keep, L - 1 - after, L)  # column L collects the dropped ones
    out = torch.zeros((B, C, L + 1), dtype=x.dtype, device=x.device)
    out.scatter_(2, dest.unsqueeze(1).expand(B, C, L), x)
    return out[:, :, :L]


def score_items(ranker: Ranker, x: torch.Tensor, cand: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, C) scores of the candidate items for histories x (B, 3, L), encoded ``batch``
    histories at a time (fewer for a dense ranker, whose encoding is a catalogue row each)."""
    if isinstance(ranker, DenseRanker) and ranker.n_items:
        batch = max(1, min(batch, CHUNK_BYTES // (4 * ranker.n_items)))
    parts = [
        ranker.items(ranker.encode(x[lo : lo + batch]), cand[lo : lo + batch])
        for lo in range(0, len(x), batch)
    ]
    return torch.cat(parts) if parts else torch.zeros(cand.shape)
