"""The per-segment student search: an Optuna study under the size budget, with the pieces
it shares with the teacher's tuner (``model_selection``: the median pruning rule, the Pareto
front of validation NDCG@10 vs parameters, the choice within a parameter budget).

Runs inside a segment's Spark task (in-memory study, one thread): each trial samples a
width, depth, dropout, learning rate and catalogue share, is skipped at once if it does not
fit the budget, trains ``students.search_epochs`` epochs of distillation with the median
rule pruning it after ``prune_after`` epochs, and is scored by its best validation NDCG@10
on the segment's users. Only validation targets select anything.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import optuna

from patternlake.model_selection import choose, pareto_front, should_prune
from patternlake.models.student import Student, count_params
from patternlake.models.teacher import SequentialTeacher
from patternlake.students.transforms import segment_catalogue

HISTORY = "valid_ndcg_by_epoch"


def search_student(
    teacher: SequentialTeacher, data: Any, s: dict[str, Any], budget: int
) -> dict[str, Any]:
    """-> {"chosen": {d_model, n_layers, dropout, lr, catalogue_share, params,
    valid_ndcg_at_10, trial}, "trials": [...]}; chosen is None if no trial completed."""
    from patternlake.students.segment_training import train_student

    targets = data.train[3].numpy().ravel()
    space = s["space"]

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        share = trial.suggest_categorical("catalogue_share", space["catalogue_share"])
        d = trial.suggest_categorical("d_model", s["d_model"])
        layers = trial.suggest_int("n_layers", *space["n_layers"])
        dropout = trial.suggest_float("dropout", *space["dropout"])
        lr = trial.suggest_float("lr", *space["lr"], log=True)
        catalogue = segment_catalogue(targets, share)
        n_items = teacher.config.n_items if catalogue is None else len(catalogue) + 2
        cfg = replace(
            teacher.config,
            n_items=n_items,
            d_model=d,
            n_layers=layers,
            n_heads=s["n_heads"] if d % s["n_heads"] == 0 else 1,
            dropout=dropout,
            sampled_softmax=0,
        )
        params = count_params(cfg)
        trial.set_user_attr("params", params)
        if params > budget:
            trial.set_user_attr("over_budget", True)
            raise optuna.TrialPruned(f"{params} params > budget {budget}")
        history: list[float] = []

        def on_epoch(epoch: int, ndcg: float) -> None:
            history.append(ndcg)
            trial.set_user_attr(HISTORY, history)
            finished = [
                t.user_attrs.get(HISTORY, [])
                for t in trial.study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
                )
            ]
            if should_prune(history, finished, s["prune_after"], 2):
                raise optuna.TrialPruned(f"epoch {epoch}: below the median")

        student = Student(cfg, teacher.config.n_items, catalogue)
        fit = train_student(
            student, teacher, data, {**s, "lr": lr}, s["search_epochs"], on_epoch=on_epoch
        )
        return fit["best_valid_ndcg@10"], float(params)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=s["seed"]),
    )
    study.optimize(objective, n_trials=s["search_trials"])
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "valid_ndcg_at_10": t.values[0] if t.values else None,
            "params": t.user_attrs.get("params"),
            **t.params,
        }
        for t in study.trials
    ]
    front = pareto_front(rows)
    chosen = choose(front, budget)
    return {"chosen": chosen, "trials": rows, "pareto": [r["trial"] for r in front]}
