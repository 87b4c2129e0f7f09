"""An approximate item index for scoring (``score.index: faiss``; the optional ``ann`` extra,
faiss-cpu).

Exact top-K (:func:`ranking.top_k`) scores every item for every user. For a dot-product
ranker (teacher, fp32 or dequantized student) :class:`ItemIndex` is a FAISS IVF-Flat
inner-product index over the item table: k-means splits the items into ``nlist`` lists, and
a search scores the list centroids, then the items of the ``nprobe`` best lists only (exact
inner products, no compression). :func:`approx_top_k` takes k + L candidates per user from it
(L: the input window, so that excluding the window's items still leaves k), adds the window's
items (the seen term can lift them past anything retrieved), reranks them all with
``ranker.items`` (seen term, segment masks) and keeps the best k under :func:`top_k`'s tie
rule (:func:`ranking.candidate_top_k`). With ``nprobe = nlist`` the search is exhaustive and
the result is exact top-K.

IVF-Flat rather than HNSW: every Python worker builds its own index, so build time counts.
IVF's is k-means on a sample of ``TRAIN_POINTS`` items per list plus one assignment pass;
on one thread here, 100,000 items of width 64 took 1.0 s against 9.9 s for an HNSW graph
(M = 32), which grows faster than linearly with the catalogue. Recall depends on how
clustered the item vectors are: high for a table whose items group into topics, poor for
random weights, which have no clusters to find (docs/scoring.md has the numbers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from patternlake.errors import PatternlakeError
from patternlake.models.ranking import DotRanker, DotState, Ranker, candidate_top_k

TRAIN_POINTS = 40  # items per list that k-means trains on (faiss asks for at least 39)
TRAIN_ITERATIONS = 10


def faiss_module() -> Any:
    """The ``faiss`` module, or a PatternlakeError saying how to get it."""
    try:
        import faiss
    except ImportError:
        raise PatternlakeError(
            "score.index: faiss needs the faiss-cpu package: pip install 'patternlake[ann]' "
            "(or faiss-cpu==1.15.1), or set score.index: exact"
        ) from None
    return faiss


def supports(ranker: Ranker) -> bool:
    """Whether an index can stand for the ranker: a dot product of the user's state with an
    item table. An ensemble's log mean softmax and a dense model's row are not one."""
    return isinstance(ranker, DotRanker)


def auto_nlist(n_items: int) -> int:
    """faiss's rule of thumb for IVF: about 4 sqrt(N) lists (565 at 20k items, 4,000 at 1M)."""
    return max(1, round(4 * math.sqrt(n_items)))


class ItemIndex:
    """An IVF-Flat inner-product index over a :class:`DotRanker`'s scorable items, labelled
    with global item ids (padding, and items outside a segment student's catalogue, are not
    in it).

    Args:
        ranker: the dot-product ranker whose item table is indexed (its current weights).
        nlist: k-means lists; 0: :func:`auto_nlist`; at most the number of items.
        nprobe: lists searched per user; at most ``nlist`` (= ``nlist``: exhaustive).
        seed: k-means' sampling and initialisation.

    Example:
        >>> ranker = ranking.ranker_for(teacher)
        >>> index = ItemIndex(ranker, nprobe=64)
        >>> values, ids = approx_top_k(index, ranker, ranker.encode(x), 10)
    """

    def __init__(self, ranker: DotRanker, nlist: int = 0, nprobe: int = 64, seed: int = 0):
        faiss = faiss_module()
        table = ranker.table.detach().float().cpu()
        if ranker.to_local is None:
            ids = torch.arange(1, ranker.n_items)
            vectors = table[1:]
        else:
            ids = torch.nonzero(ranker.to_local.cpu() >= 2).squeeze(1)
            vectors = table[ranker.to_local.cpu()[ids]]
        self.biased = ranker.bias is not None
        if self.biased:  # h . e + b = [h, 1] . [e, b]: one inner product still
            bias = ranker.bias.detach().float().cpu()
            local = ids if ranker.to_local is None else ranker.to_local.cpu()[ids]
            vectors = torch.cat([vectors, bias[local].unsqueeze(1)], 1)
        self.n_items, width = vectors.shape
        if self.n_items == 0:
            raise ValueError("an item index needs at least one scorable item")
        self.nlist = min(nlist or auto_nlist(self.n_items), self.n_items)
        self.nprobe = min(nprobe, self.nlist)
        self._faiss = faiss
        self._quantizer = faiss.IndexFlatIP(width)  # the list centroids (kept alive here)
        self.index = faiss.IndexIVFFlat(
            self._quantizer, width, self.nlist, faiss.METRIC_INNER_PRODUCT
        )
        cp = self.index.cp
        cp.niter, cp.seed = TRAIN_ITERATIONS, seed
        cp.max_points_per_centroid = TRAIN_POINTS  # faiss samples this many per list
        cp.min_points_per_centroid = 1  # a small catalogue: no warning on stderr
        x = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
        self._threads()
        self.index.train(x)
        self.index.add_with_ids(x, ids.numpy().astype(np.int64))
        self.index.nprobe = self.nprobe

    def _threads(self) -> None:
        # as many threads as torch: one in a Spark task (score_batches sets it)
        self._faiss.omp_set_num_threads(torch.get_num_threads())

    def search(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n) global ids of each row's n largest ``h . e`` among the ``nprobe`` best
        lists, best first; 0 (padding) where those lists hold fewer than n items."""
        q = hidden.detach().float().cpu()
        if self.biased:
            q = torch.cat([q, torch.ones(len(q), 1)], 1)
        q = np.ascontiguousarray(q.numpy())
        self._threads()
        _, labels = self.index.search(q, n)
        return torch.from_numpy(labels).clamp_min_(0).to(hidden.device)


def approx_top_k(
    index: ItemIndex,
    ranker: DotRanker,
    state: DotState,
    k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ranking.top_k` through the index: (values, ids) of each row's k best items
    among k + L retrieved candidates and the row's L window items, scored exactly; padding,
    masked items and ``exclude``'s items never returned (a row with fewer than k ends in
    -inf values, as there)."""
    window = state.window
    cand = torch.cat([index.search(state.hidden, k + window.shape[1]), window], 1)
    return candidate_top_k(ranker, state, cand, k, exclude)
