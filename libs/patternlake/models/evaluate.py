"""evaluate: the protocol of DESIGN.md for the registered teacher and two baselines
(popularity, first-order Markov chain), computed in the same run on the same split.

Per user, events ordered by time; users with fewer than 3 events are not evaluated; the
last event is the test target and everything before it the input; full ranking over the
whole catalogue. ``evaluate.mask_history`` removes the user's past items from the ranking
(the output says which was used).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.baselines import MarkovChain, Popularity
from patternlake.models.metrics import evaluate_scorer
from patternlake.training.data import evaluation_arrays, item_id_count, read_table, training_arrays

log = logging.getLogger(__name__)
NO_SEGMENT = -1


def load_registered(
    config: Config, name: str = "teacher", alias: str = "candidate"
) -> torch.nn.Module | None:
    import mlflow

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    try:
        model = mlflow.pytorch.load_model(f"models:/{name}@{alias}", map_location="cpu")
    except Exception as exc:  # not registered yet
        log.info(
            "evaluate: no %s@%s in the registry (%s)", name, alias, str(exc).splitlines()[0][:120]
        )
        return None
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def evaluate_models(
    spark: SparkSession,
    lake: Lake,
    config: Config,
    models: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    if not lake.exists("user_sequences"):
        raise PatternlakeError(
            "evaluate: user_sequences does not exist yet; run `patternlake run daily` first"
        )
    version = lake.version("user_sequences")
    table = read_table(lake.files("user_sequences", version))
    max_len = config.features.max_seq_len
    n_items = item_id_count(lake)
    users, items, types, gaps, target = evaluation_arrays(table, max_len, "test")
    if len(users) == 0:
        raise PatternlakeError("evaluate: no user has the 3 events the protocol needs")
    seg_of: dict[str, int] = {}
    if lake.exists("segments"):
        seg_of = {
            r.user_id: r.segment_id
            for r in lake.read("segments").select("user_id", "segment_id").collect()
        }
    groups = np.array([seg_of.get(u, NO_SEGMENT) for u in users])
    history = items if config.evaluate.mask_history else None
    train_in, _, _, train_out = training_arrays(table, max_len)

    scorers: dict[str, tuple[Any, int, int]] = {}
    pop = Popularity(n_items).fit(train_in, train_out)
    markov = MarkovChain(n_items).fit(train_in, train_out)
    scorers["popularity"] = (lambda s: pop.scores(items[s]), pop.num_params(), pop.nbytes())
    scorers["markov"] = (lambda s: markov.scores(items[s]), markov.num_params(), markov.nbytes())
    if models is None:
        teacher = load_registered(config)
        models = {"teacher": teacher} if teacher is not None else {}
    stacked = np.stack([items, types, gaps], axis=1)  # (n, 3, L)
    for name, model in models.items():

        def score(s: slice, m: torch.nn.Module = model) -> torch.Tensor:
            with torch.no_grad():
                return m(torch.from_numpy(stacked[s]))

        params = sum(p.numel() for p in model.parameters())
        scorers[name] = (score, params, model_bytes(model))

    out: dict[str, Any] = {
        "protocol": {
            "split": "leave-last-out test",
            "min_events": 3,
            "ranking": "full catalogue",
            "mask_history": config.evaluate.mask_history,
            "users": int(len(users)),
            "items": int(n_items - 1),
        },
        "data_version": version,
        "models": {},
    }
    for name, (score, params, nbytes) in scorers.items():
        t = time.monotonic()
        overall, per = evaluate_scorer(
            score, len(users), target, groups, n_items, config.evaluate.batch_size, history
        )
        out["models"][name] = {
            "params": int(params),
            "bytes": int(nbytes),
            "overall": overall,
            "segments": {
                g: {**m, "params": int(params), "bytes": int(nbytes)} for g, m in per.items()
            },
        }
        log.info(
            "evaluate %s: NDCG@10 %.4f HR@10 %.4f (%.1fs)",
            name,
            overall["ndcg@10"],
            overall["hr@10"],
            time.monotonic() - t,
        )
    log.info(
        "evaluate: %d users, %d models (%.1fs)",
        len(users),
        len(scorers),
        time.monotonic() - started,
    )
    return out
