"""Our teacher on a peers-benchmark split (bench/peers.py), trained and evaluated exactly as
`patternlake train` / `patternlake evaluate` do, without Spark in between.

The split becomes a ``user_sequences`` Parquet file (item, type and time-gap arrays; the
validation and test targets at the end of evaluable users' rows), ``train_worker`` trains on
it (single process, the same settings as conf/base.yaml's ``train`` and ``teacher``
sections unless overridden), early stopping on validation targets only; the best epoch's
weights are then scored on the test targets with patternlake's own ``evaluation_arrays`` and
``evaluate_scorer`` (full ranking, nothing masked).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def gap_buckets(times: np.ndarray) -> np.ndarray:
    """patternlake.features.transforms.gap_bucket in numpy: 0 for a user's first event, then
    1 + the number of GAP_EDGES at or below the gap in seconds."""
    from patternlake.sequence_schema import GAP_EDGES

    out = np.zeros(len(times), dtype=np.int32)
    if len(times) > 1:
        out[1:] = np.searchsorted(np.asarray(GAP_EDGES), np.diff(times), side="right") + 1
    return out


def sequences_table(split: Any) -> pa.Table:
    """The split as patternlake's ``user_sequences`` (one row per user)."""
    items, types, gaps, valid, test = [], [], [], [], []
    for u in range(len(split.users)):
        seq, times = np.asarray(split.train[u]), np.asarray(split.train_times[u])
        if split.evaluable[u]:
            seq = np.append(seq, [split.valid[u], split.test[u]])
            times = np.append(times, [split.valid_time[u], split.test_time[u]])
        items.append(seq.astype(np.int32).tolist())
        types.append([1] * len(seq))
        gaps.append(gap_buckets(times.astype(np.int64)).tolist())
        valid.append(int(split.valid[u]) if split.evaluable[u] else None)
        test.append(int(split.test[u]) if split.evaluable[u] else None)
    return pa.table(
        {
            "user_id": [str(u) for u in split.users],
            "item_seq": pa.array(items, pa.list_(pa.int32())),
            "type_seq": pa.array(types, pa.list_(pa.int32())),
            "gap_seq": pa.array(gaps, pa.list_(pa.int32())),
            "valid_item": pa.array(valid, pa.int32()),
            "test_item": pa.array(test, pa.int32()),
        }
    )


def run_teacher(
    split: Any, ctx: Any, overrides: dict[str, Any] | None = None, keep_scores: bool = False
) -> dict[str, Any]:
    """Train and test our teacher on ``split``; ``overrides``: TrainSpec / TeacherConfig
    fields (e.g. {"max_len": 200, "dropout": 0.5})."""
    import torch

    from patternlake.config import load_config
    from patternlake.models.fit import train_worker
    from patternlake.models.metrics import evaluate_scorer
    from patternlake.models.teacher import TeacherConfig
    from patternlake.models.train_spec import TrainSpec, on_one_process
    from patternlake.sequence_reader import evaluation_arrays
    from patternlake.training.train import train_members

    conf = load_config("local", [], environ={})
    overrides = dict(overrides or {})
    model_fields = set(TeacherConfig.__dataclass_fields__)
    model = TeacherConfig(
        n_items=split.n_items,
        n_types=2,
        **{
            **conf.teacher.model_dump(exclude={"softmax"}),
            "sampled_softmax": 0,  # MovieLens-size catalogues: full softmax (softmax: auto)
            **{k: v for k, v in overrides.items() if k in model_fields},
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part-0.parquet"
        pq.write_table(sequences_table(split), path)
        # one process trains what the default train.num_proc processes train: their global
        # batch at their scaled learning rate
        spec = on_one_process(
            TrainSpec.from_config(
                conf.train,
                files=[str(path)],
                data_version=0,
                model=model.to_dict(),
                backend="single",
                valid_users=0,
                threads=ctx.threads,
                checkpoint_dir=str(Path(tmp) / "checkpoints"),
            ),
            conf.train.num_proc,
        )
        members = int(overrides.pop("members", conf.train.members))
        for k, v in overrides.items():
            if k not in model_fields:
                setattr(spec, k, v)
        # one member: train_worker's best epoch; more: an ensemble of consecutive seeds
        best, result = train_members(spec, members, lambda s: train_worker(vars(s)))
        table = pq.read_table(path)

        kept: dict[str, np.ndarray] = {}

        def metrics(which: str) -> dict[str, float]:
            _, items, types, gaps, target = evaluation_arrays(table, model.max_len, which)
            stacked = [torch.from_numpy(a) for a in (items, types, gaps)]

            def score(s: slice) -> torch.Tensor:
                with torch.no_grad():
                    return best.last_scores(*(a[s] for a in stacked))

            if keep_scores:  # log-probabilities over the catalogue, for offline ensembles
                with torch.no_grad():
                    kept[which] = torch.log_softmax(score(slice(None)), -1).numpy()

            overall, _ = evaluate_scorer(
                score, len(target), target, np.zeros(len(target)), split.n_items, 512
            )
            return overall

        train_s = sum(m["train_s"] for m in result["members"])  # every member's training
        return {
            "kind": "patternlake teacher (single process)",
            "params": int(result["params"]),
            "valid": metrics("valid"),
            "test": metrics("test"),
            "best_epoch": result["best_epoch"],
            "epochs": len(result["history"]),
            "stopped_by": "the epoch cap" if len(result["history"]) >= spec.epochs else "patience",
            "train_s": round(train_s, 1),
            "members": result["members"],
            "train_samples_per_s": result["samples_per_s"],
            "settings": {**model.to_dict(), "lr": spec.lr, "batch_size": spec.batch_size},
            **({"scores": kept} if keep_scores else {}),
        }
