"""tune_teacher: ``user_sequences`` (a pinned Delta version) -> ``teacher_tuning``.

An Optuna study with two objectives, validation NDCG@10 (maximize) and parameter count
(minimize), over the teacher's width, depth, heads, dropout, window and the learning rate
and batch size (``tune.space``). ``tune.parallel`` spawned processes run trials against
one shared Optuna journal file under ``models.root/tuning``; each trial is one
single-process, one-thread ``train_worker`` run of at most ``tune.epochs_per_trial``
epochs, pruned by a median rule on its per-epoch validation NDCG@10 (Optuna's pruners do
not take multi-objective studies). Only validation targets are ever looked at.

Kept: every trial as a row of the lake table ``teacher_tuning`` (with ``pareto`` and
``chosen`` flags), and one MLflow run with the front and the chosen configuration (JSON
artifact). ``train.use_tuned: true`` makes ``run train`` use the chosen configuration.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState

from patternlake.config import Config, TuneConfig
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.model_selection import choose, pareto_front, should_prune
from patternlake.models.fit import train_worker
from patternlake.models.teacher import SequentialTeacher, TeacherConfig
from patternlake.models.train_spec import build_spec
from patternlake.registry import use_experiment
from patternlake.tuning.transforms import (
    MODEL_KEYS,
    SEARCHED,
    suggest,
)

log = logging.getLogger(__name__)
TABLE = "teacher_tuning"
HISTORY_ATTR = "valid_ndcg_by_epoch"


def storage_path(config: Config) -> Path:
    """The Optuna journal every process of every study writes to."""
    return Path(config.models.root).resolve() / "tuning" / "teacher.journal"


def open_storage(path: str | Path) -> JournalStorage:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def trial_spec(base: dict[str, Any], params: dict[str, Any], tune: TuneConfig) -> dict[str, Any]:
    """The TrainSpec (as a dict) of one trial: ``base`` (from ``build_spec``) with the trial's
    model, learning rate and batch size, the per-trial budget, one thread, no checkpoints.
    One process: the batch size is per process and the global batch at once, and the
    learning rate is unscaled (``train.use_tuned`` reads both with ``train``'s meaning).
    ``base``'s example counts are for conf's ``max_len``; a trial with another window
    counts its own (``fit``)."""
    model = {**base["model"], **{k: params[k] for k in MODEL_KEYS}}
    return {
        **base,
        "model": model,
        "backend": "single",
        "lr": params["lr"],
        "batch_size": params["batch_size"],
        "epochs": tune.epochs_per_trial,
        "patience": tune.patience,
        "threads": 1,
        "checkpoint_dir": "",
        "result_path": "",
    }


def count_params(model: dict[str, Any]) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return SequentialTeacher(TeacherConfig(**model)).num_params()


def objective(
    trial: Trial, base: dict[str, Any], tune: TuneConfig, worker: int = 0
) -> tuple[float, float]:
    """Train one configuration; (best validation NDCG@10, parameters). Raises
    ``optuna.TrialPruned`` when the median rule says so after an epoch."""
    params = suggest(trial, tune.space)
    spec = trial_spec(base, params, tune)
    n_params = count_params(spec["model"])
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("params", n_params)
    history: list[float] = []

    def on_epoch(epoch: int, ndcg: float) -> None:
        history.append(float(ndcg))
        trial.set_user_attr(HISTORY_ATTR, history)
        finished = [
            t.user_attrs.get(HISTORY_ATTR, [])
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        if should_prune(history, finished, tune.prune_after, tune.prune_startup_trials):
            trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"epoch {epoch}: NDCG@10 {max(history):.4f} below median")

    started = time.monotonic()
    result = train_worker(spec, on_epoch)
    trial.set_user_attr("best_epoch", result["best_epoch"])
    trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
    log.info(
        "tune trial %d (worker %d): %s -> NDCG@10 %.4f, %d params (%.1fs)",
        trial.number,
        worker,
        params,
        result["best_valid_ndcg@10"],
        n_params,
        time.monotonic() - started,
    )
    if result["diverged"] or result["best_epoch"] < 0:
        trial.set_user_attr("diverged", result["diverged"] or "no epoch finished")
        return float("nan"), float(n_params)  # Optuna records a FAIL
    return float(result["best_valid_ndcg@10"]), float(n_params)


def run_trials(
    path: str,
    study_name: str,
    base: dict[str, Any],
    tune: dict[str, Any],
    worker: int,
    n_trials: int,
    log_level: str = "INFO",
) -> None:
    """One tuning process (spawned): ``n_trials`` trials of the shared study."""
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s tune[{worker}]: %(message)s",
        datefmt="%H:%M:%S",
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    cfg = TuneConfig.model_validate(tune)
    # each process its own seed; the constant liar keeps parallel TPE from re-picking
    # the points the other process is running
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + worker, constant_liar=True)
    study = optuna.load_study(study_name=study_name, storage=open_storage(path), sampler=sampler)
    study.optimize(lambda trial: objective(trial, base, cfg, worker), n_trials=n_trials)


def _wait_with_progress(procs: list[Any], path: Path, study_name: str, n_trials: int) -> None:
    """Wait for the trial processes; on a terminal, a bar of finished trials."""
    from patternlake.progress import enabled, progress

    if not enabled():
        for p in procs:
            p.join()
        return
    with progress(desc="tune teacher", total=n_trials, unit="trial") as bar:
        while any(p.is_alive() for p in procs):
            time.sleep(2.0)
            try:
                trials = optuna.load_study(
                    study_name=study_name, storage=open_storage(path)
                ).get_trials(deepcopy=False)
            except Exception:  # the study is created by the first process
                continue
            done = sum(t.state.is_finished() for t in trials)
            bar.update(done - bar.n)
        for p in procs:
            p.join()


def tune_teacher(lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    tune = config.tune
    # the base spec is the train section's, never the result of an earlier study
    plain = config.model_copy(
        update={"train": config.train.model_copy(update={"use_tuned": False})}
    )
    base = asdict(build_spec(lake, plain, "single"))
    when = datetime.now().replace(microsecond=0)  # local, like Optuna's trial times
    study_name = f"teacher-v{base['data_version']}-{when:%Y%m%dT%H%M%S}"
    path = storage_path(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=open_storage(path), directions=["maximize", "minimize"]
    )
    study.set_user_attr("data_version", base["data_version"])
    processes = min(tune.parallel, tune.n_trials)
    shares = [
        tune.n_trials // processes + (i < tune.n_trials % processes) for i in range(processes)
    ]
    log.info(
        "tune teacher: study %s, %d trials in %d processes, user_sequences@v%d, storage %s",
        study_name,
        tune.n_trials,
        processes,
        base["data_version"],
        path,
    )
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    procs = [
        ctx.Process(
            target=run_trials,
            args=(str(path), study_name, base, tune.model_dump(), i, n, level),
            name=f"tune-{i}",
        )
        for i, n in enumerate(shares)
    ]
    try:
        for p in procs:
            p.start()
        _wait_with_progress(procs, path, study_name, tune.n_trials)
    finally:  # interrupted (Ctrl-C, a kill): no trial process outlives the command
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tune: processes {failed} failed (their log is above)")

    trials = optuna.load_study(study_name=study_name, storage=open_storage(path)).get_trials()
    rows = [trial_row(t, study_name, when, base, tune.max_params) for t in trials]
    front = pareto_front(rows)
    chosen = choose(front, tune.max_params)
    if chosen is None:
        raise PatternlakeError(
            f"tune: no trial of study {study_name} finished (states: "
            f"{sorted({r['state'] for r in rows})}); try more tune.n_trials, a higher "
            "tune.prune_startup_trials or a lower tune.space.lr"
        )
    for r in rows:
        r["pareto"] = any(r["trial"] == f["trial"] for f in front)
        r["chosen"] = r["trial"] == chosen["trial"]
    table = contract(TABLE)
    schema, columns = table.ddl(), table.names
    version = lake.write(
        lake.spark.createDataFrame([tuple(r[c] for c in columns) for r in rows], schema),
        TABLE,
        "append",
        commit_info={"patternlake.study": study_name},
    )
    summary = {
        "study": study_name,
        "storage": str(path),
        "data_version": base["data_version"],
        "states": {
            s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})
        },
        "workers": sorted({r["worker"] for r in rows if r["worker"] is not None}),
        "pareto": [_brief(r) for r in front],
        "chosen": _brief(chosen),
        "max_params": tune.max_params,
        "table_version": version,
    }
    summary["mlflow_run_id"] = log_to_mlflow(config, summary, rows)
    summary["seconds"] = round(time.monotonic() - started, 1)
    log.info(
        "tune teacher: %s; Pareto front %d trials; chosen trial %d: NDCG@10 %.4f, %d params "
        "(%s); %s v%d (%.1fs)",
        summary["states"],
        len(front),
        chosen["trial"],
        chosen["valid_ndcg_at_10"],
        chosen["params"],
        {k: chosen[k] for k in SEARCHED},
        TABLE,
        version,
        summary["seconds"],
    )
    return summary


def trial_row(
    t: FrozenTrial, study: str, started: datetime, base: dict[str, Any], max_params: int | None
) -> dict[str, Any]:
    """One row of teacher_tuning (``pareto`` and ``chosen`` are set once all are in)."""
    attrs = t.user_attrs
    return {
        "study": study,
        "study_started": started,
        "data_version": base["data_version"],
        "item_index_version": base["item_index_version"],
        "trial": t.number,
        "state": t.state.name,
        "worker": attrs.get("worker"),
        "valid_ndcg_at_10": t.values[0] if t.state == TrialState.COMPLETE else None,
        "params": attrs.get("params"),
        **{k: t.params.get(k) for k in SEARCHED},
        "epochs_run": len(attrs.get(HISTORY_ATTR, [])),
        "best_epoch": attrs.get("best_epoch"),
        "pruned_at_epoch": attrs.get("pruned_at_epoch"),
        HISTORY_ATTR: list(attrs.get(HISTORY_ATTR, [])),
        "started": t.datetime_start,
        "finished": t.datetime_complete,
        "pareto": False,
        "chosen": False,
        "max_params": max_params,
    }


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "trial": r["trial"],
        "valid_ndcg_at_10": r["valid_ndcg_at_10"],
        "params": r["params"],
        **{k: r[k] for k in SEARCHED},
    }


def log_to_mlflow(config: Config, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    import mlflow

    use_experiment(config)
    chosen = summary["chosen"]
    with mlflow.start_run(run_name="teacher-tuning") as run:
        t = config.tune
        mlflow.log_params(
            {
                "study": summary["study"],
                "n_trials": t.n_trials,
                "parallel": t.parallel,
                "epochs_per_trial": t.epochs_per_trial,
                "patience": t.patience,
                "prune_after": t.prune_after,
                "max_params": t.max_params,
                **{f"chosen.{k}": chosen[k] for k in ("trial", *SEARCHED)},
            }
        )
        mlflow.set_tags(
            {
                "data.table": "user_sequences",
                "data.version": summary["data_version"],
                "patternlake.role": "teacher-tuning",
                "tuning.table": TABLE,
                "tuning.table.version": summary["table_version"],
            }
        )
        mlflow.log_metrics(
            {
                "chosen_valid_ndcg_at_10": chosen["valid_ndcg_at_10"],
                "chosen_params": chosen["params"],
                "pareto_size": len(summary["pareto"]),
                **{f"trials_{s.lower()}": n for s, n in summary["states"].items()},
            }
        )
        for step, front in enumerate(sorted(summary["pareto"], key=lambda r: r["params"])):
            mlflow.log_metrics(
                {
                    "pareto_params": front["params"],
                    "pareto_valid_ndcg_at_10": front["valid_ndcg_at_10"],
                },
                step=step,
            )
        plain = [
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
            for r in rows
        ]
        mlflow.log_dict({**summary, "trials": plain}, "tuning/study.json")
        return run.info.run_id
