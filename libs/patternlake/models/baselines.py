"""Baselines computed in the same run as the teacher: popularity and a first-order Markov
chain (item -> next item transition counts), both fitted on the training parts only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch


class Popularity:
    name = "popularity"

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.counts = np.zeros(n_items, dtype=np.float64)

    def fit(
        self, items: np.ndarray, targets: np.ndarray, first_items: np.ndarray | None = None
    ) -> Popularity:
        """``items``/``targets``: the left-padded training inputs and next-item targets. Every
        training event is counted once: every target, plus each user's first event, which is
        never a target: ``first_items`` when given (windows over long histories: a later
        window's first input is also an earlier window's target), else each row's first
        input (its first non-padding column; column 0 is padding for short rows)."""
        if first_items is not None:
            first = np.asarray(first_items, dtype=np.int64)
        else:
            filled = items > 0
            rows = filled.any(axis=1)
            first = items[rows, filled[rows].argmax(axis=1)]
        seen = np.concatenate([first, targets[targets > 0]])
        self.counts = np.bincount(seen, minlength=self.n_items).astype(np.float64)
        self.counts[0] = 0
        return self

    def scores(self, items: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(
            np.broadcast_to(self.counts, (len(items), self.n_items)).copy()
        ).float()

    def num_params(self) -> int:
        return int(self.n_items)

    def ranker(self) -> _BaselineRanker:
        return _BaselineRanker(
            self.n_items,
            lambda items, lo, hi: np.broadcast_to(self.counts[lo:hi], (len(items), hi - lo)),
            lambda items, cand: self.counts[cand],
        )

    def nbytes(self) -> int:
        return int(self.counts.nbytes)


class MarkovChain:
    """P(next | last item) from transition counts, backed off to popularity."""

    name = "markov"

    def __init__(self, n_items: int, backoff: float = 1e-3):
        self.n_items = n_items
        self.backoff = backoff
        self.pop = Popularity(n_items)
        self.transitions = sp.csr_matrix((n_items, n_items))

    def fit(
        self, items: np.ndarray, targets: np.ndarray, first_items: np.ndarray | None = None
    ) -> MarkovChain:
        valid = (items > 0) & (targets > 0)
        prev, nxt = items[valid], targets[valid]
        self.transitions = sp.csr_matrix(
            (np.ones(len(prev)), (prev, nxt)), shape=(self.n_items, self.n_items), dtype=np.float64
        )
        self.pop.fit(items, targets, first_items)
        return self

    def scores(self, items: np.ndarray) -> torch.Tensor:
        last = items[:, -1]
        rows = self.transitions[last].toarray()
        totals = rows.sum(axis=1, keepdims=True)
        probs = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)
        pop = self.pop.counts / max(1.0, self.pop.counts.sum())
        return torch.from_numpy(probs + self.backoff * pop[None, :]).float()

    def num_params(self) -> int:
        return int(self.transitions.nnz)

    def ranker(self) -> _BaselineRanker:
        """Ranks users by their inputs' last item (its row of transition counts)."""
        share = self.pop.counts / max(1.0, self.pop.counts.sum())

        def rows(items: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
            r = self.transitions[np.asarray(items)[:, -1]]
            return r, np.asarray(r.sum(axis=1))

        return markov_ranker(self.n_items, rows, share, self.backoff)

    def nbytes(self) -> int:
        t = self.transitions
        return int(t.data.nbytes + t.indices.nbytes + t.indptr.nbytes + self.pop.nbytes())


def markov_ranker(
    n_items: int,
    rows: Callable[[np.ndarray], tuple[sp.csr_matrix, np.ndarray]],
    pop_share: np.ndarray,
    backoff: float = 1e-3,
) -> _BaselineRanker:
    """The Markov chain as a ranker: ``rows(state)`` gives the users' transition counts
    (a sparse (n, N) matrix, one row per user: the successors of their last item) and each
    row's total (n, 1), so the rows may come from the whole fitted matrix
    (:meth:`MarkovChain.ranker`) or from each user's successor list joined in Spark (the
    evaluation job, where a row may be cut to its most frequent successors but keeps its
    total). Score: P(next | last) + ``backoff`` x the item's popularity share."""

    def block(state: np.ndarray, lo: int, hi: int) -> np.ndarray:
        r, totals = rows(state)
        dense = r[:, lo:hi].toarray()
        probs = np.divide(dense, totals, out=np.zeros_like(dense), where=totals > 0)
        return probs + backoff * pop_share[None, lo:hi]

    def pick(state: np.ndarray, cand: np.ndarray) -> np.ndarray:
        r, totals = rows(state)
        picked = np.asarray(r[np.arange(len(cand))[:, None], cand].todense())
        probs = np.divide(picked, totals, out=np.zeros(picked.shape), where=totals > 0)
        return probs + backoff * pop_share[cand]

    return _BaselineRanker(n_items, block, pick)


class _BaselineRanker:
    """A baseline as a ``models.ranking`` ranker: scores computed per item chunk from the
    users' inputs (n, L), so ranking a large catalogue needs no (users x catalogue) matrix."""

    def __init__(self, n_items: int, block, pick):
        self.n_items = n_items
        self.block = block  # (inputs, lo, hi) -> (n, hi - lo) scores
        self.pick = pick  # (inputs, (n, C) item ids) -> (n, C) scores

    def encode(self, items: np.ndarray) -> np.ndarray:
        return np.asarray(items)

    def width(self, state: np.ndarray) -> int:
        return self.n_items

    def chunk(
        self, state: np.ndarray, lo: int, hi: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of items lo..hi; ``out`` (the rankers' reused block) is not used."""
        s = torch.from_numpy(np.array(self.block(state, lo, hi), dtype=np.float32))
        if lo == 0:
            s[:, 0] = float("-inf")
        return s

    def items(self, state: np.ndarray, cand: torch.Tensor) -> torch.Tensor:
        s = torch.from_numpy(np.array(self.pick(state, cand.numpy().copy()), dtype=np.float32))
        return s.masked_fill(cand == 0, float("-inf"))
