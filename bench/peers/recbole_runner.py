"""Trains one RecBole 1.2.1 sequential model on a split written by bench/peers.py.

Runs ONLY inside the isolated peers virtual environment (RecBole needs numpy < 2); it never
imports patternlake. bench/peers.py starts it as

    <peers-venv>/bin/python bench/peers/recbole_runner.py JOB.json

where JOB.json holds: data_dir, dataset (the atomic file is data_dir/dataset/dataset.inter
with per-user ordinals as timestamps), model ("SASRec", "GRU4Rec", ...), params (RecBole
config overrides), threads, max_train_s (a wall-clock budget for the whole fit: when spent,
training stops at the next validation as if patience ran out) and out (the result JSON).

Two RecBole 1.2.1 issues under torch 2.13 are patched here, in this process only:
* ``torch.load`` defaults to ``weights_only=True`` since torch 2.6; RecBole's checkpoints
  hold its Config object, so restoring the best epoch needs ``weights_only=False``;
* ``recbole.quick_start`` imports ray (pinned <= 2.6.3); it is not imported here, the run
  is assembled from Config / create_dataset / data_preparation / get_model / get_trainer.

Metrics: RecBole's own test result (its topk-based NDCG/Hit/MRR) AND the ranks computed
from the same scores the way patternlake does it (rank = number of items scoring >= the
target, minus one: ties count against the target), which is what bench/peers.py prints.
For sequential models RecBole's full-sort evaluation does NOT mask the user's past items
(the dataloader passes no history index; only the padding item 0 is set to -inf): this is
recorded as ``mask_history: false`` after checking it on the dataloader at run time.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

_torch_load = torch.load
torch.load = functools.partial(_torch_load, weights_only=False)


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    torch.set_num_threads(int(job.get("threads", 2)))

    import recbole.trainer.trainer as rb_trainer
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.dataloader import FullSortEvalDataLoader
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    work = Path(job["work_dir"])
    params = {
        "data_path": job["data_dir"],
        "checkpoint_dir": str(work / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "train_neg_sample_args": None,
        "metrics": ["NDCG", "Hit", "MRR"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "use_gpu": torch.cuda.is_available(),
        "show_progress": False,
        "log_wandb": False,
        "state": "INFO",
        **job.get("params", {}),
    }
    config = Config(model=job["model"], dataset=job["dataset"], config_dict=params)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(int(job.get("threads", 2)))

    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    prep_s = time.perf_counter() - t0

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    # training time and samples: only _train_epoch (forward, backward, step, batching)
    stats = {
        "train_s": 0.0,
        "samples": 0,
        "epochs": 0,
        "stopped_by": "epochs",
        "best_epoch": -1,
        "valid_curve": [],
    }
    fit_started = time.perf_counter()
    train_epoch = trainer._train_epoch

    def timed_train_epoch(train_data, epoch_idx, *args, **kwargs):
        t = time.perf_counter()
        out = train_epoch(train_data, epoch_idx, *args, **kwargs)
        stats["train_s"] += time.perf_counter() - t
        stats["samples"] += int(train_data.sample_size)
        stats["epochs"] += 1
        return out

    trainer._train_epoch = timed_train_epoch
    stopping = rb_trainer.early_stopping
    budget = float(job.get("max_train_s") or 0)

    def early_stopping_with_budget(*args, **kwargs):
        best, cur_step, stop, update = stopping(*args, **kwargs)
        stats["valid_curve"].append(round(float(args[0]), 5))
        if update:
            stats["best_epoch"] = stats["epochs"] - 1
        if stop:
            stats["stopped_by"] = "patience"
        elif budget and time.perf_counter() - fit_started > budget:
            stats["stopped_by"] = "time budget"
            stop = True
        return best, cur_step, stop, update

    rb_trainer.early_stopping = early_stopping_with_budget

    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False
    )
    fit_s = time.perf_counter() - fit_started
    recbole_test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)

    # patternlake's rank definition on the same (best-epoch) scores
    ranks, masked = [], False
    model.eval()
    with torch.no_grad():
        for batch in test_data:
            masked = masked or batch[1] is not None  # history index: masks past items
            _, scores, pos_u, pos_i = trainer._full_sort_batch_eval(batch)
            target = scores[pos_u, pos_i]
            ranks.append(((scores >= target[:, None]).sum(dim=1) - 1).cpu().numpy())
    r = np.concatenate(ranks)
    ours = {
        "users": int(len(r)),
        "ndcg@10": float(np.where(r < 10, 1.0 / np.log2(r + 2), 0.0).mean()),
        "hr@10": float((r < 10).mean()),
        "mrr@10": float(np.where(r < 10, 1.0 / (r + 1), 0.0).mean()),
        "ndcg@20": float(np.where(r < 20, 1.0 / np.log2(r + 2), 0.0).mean()),
        "hr@20": float((r < 20).mean()),
    }
    result = {
        "model": job["model"],
        "params": int(sum(p.numel() for p in model.parameters())),
        "test": ours,
        "recbole_test": {k: float(v) for k, v in recbole_test.items()},
        "best_valid": {k: float(v) for k, v in best_valid_result.items()},
        "best_valid_score": float(best_valid_score),
        "train_samples": stats["samples"],
        "train_s": round(stats["train_s"], 3),
        "train_samples_per_s": stats["samples"] / max(stats["train_s"], 1e-9),
        "samples_per_epoch": int(train_data.sample_size),
        "epochs": stats["epochs"],
        "best_epoch": stats["best_epoch"],
        "valid_ndcg10_per_epoch": stats["valid_curve"],
        "stopped_by": stats["stopped_by"],
        "fit_s": round(fit_s, 3),
        "prep_s": round(prep_s, 3),
        "mask_history": bool(masked),
        "eval_loader": type(test_data).__name__,
        "full_sort": isinstance(test_data, FullSortEvalDataLoader),
        "n_items": int(dataset.item_num),  # includes RecBole's padding item
        "n_users": int(dataset.user_num - 1),
        "threads": torch.get_num_threads(),
        "config": {
            k: config[k]
            for k in (
                "MAX_ITEM_LIST_LENGTH",
                "train_batch_size",
                "learning_rate",
                "epochs",
                "stopping_step",
                "seed",
                "loss_type",
            )
        }
        | {k: v for k, v in job.get("params", {}).items() if k not in ("data_path",)},
        "versions": {
            "recbole": __import__("recbole").__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }
    Path(job["out"]).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
