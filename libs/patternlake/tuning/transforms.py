"""Pure pieces of `tune teacher`: the search space (the pruning rule, the Pareto front and
the choice of one configuration are shared with the students' search: ``model_selection``). No
Spark, no files; tested on hand-made values."""

from __future__ import annotations

from typing import Any

from patternlake.config import TuneSpaceConfig

MODEL_KEYS = ("d_model", "n_heads", "n_layers", "dropout", "max_len")  # TeacherConfig fields
SEARCHED = (*MODEL_KEYS, "lr", "batch_size")


def suggest(trial: Any, space: TuneSpaceConfig) -> dict[str, Any]:
    """One point of the search space (``trial`` is an ``optuna.Trial``). Every n_heads choice
    divides every d_model choice (checked when conf is loaded), so any pair is valid."""
    return {
        "d_model": trial.suggest_categorical("d_model", space.d_model),
        "n_heads": trial.suggest_categorical("n_heads", space.n_heads),
        "n_layers": trial.suggest_int("n_layers", *space.n_layers),
        "dropout": trial.suggest_float("dropout", *space.dropout),
        "max_len": trial.suggest_categorical("max_len", space.max_len),
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
    }
