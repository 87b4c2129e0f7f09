"""`tune teacher`: the pruning rule, the Pareto front and the choice, and a small real study
(two processes, one journal storage) whose chosen configuration `run train` picks up."""

from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from patternlake.config import TuneSpaceConfig, load_config
from patternlake.errors import ConfigError, PatternlakeError
from patternlake.lake import Lake
from patternlake.model_selection import choose, pareto_front, should_prune
from patternlake.models.train_spec import build_spec
from patternlake.tuning.transforms import SEARCHED
from patternlake.tuning.tune_teacher import (
    HISTORY_ATTR,
    TABLE,
    objective,
    open_storage,
    storage_path,
    tune_teacher,
)
from tests.conftest import in_folder, with_overrides
from tests.training import handmade
from tests.training.test_distributed import small_item, spec_for
from tests.training.test_train import write_version

TINY_SPACE = TuneSpaceConfig(
    d_model=[8, 32],
    n_heads=[1, 2],
    n_layers=(1, 2),
    dropout=(0.0, 0.1),
    max_len=[4, 8],
    lr=(3e-3, 1e-2),
    batch_size=[32, 64],
)


# ---- the pruning rule ----------------------------------------------------------------------


def test_a_clearly_worse_trial_is_pruned_once_prune_after_epochs_are_done():
    finished = [[0.10, 0.30, 0.40], [0.20, 0.35, 0.45], [0.15, 0.25, 0.50]]
    bad = [0.01, 0.02]
    assert not should_prune(bad[:1], finished, prune_after=2, startup_trials=3)  # too early
    assert should_prune(bad, finished, prune_after=2, startup_trials=3)
    assert not should_prune(bad, finished[:2], prune_after=2, startup_trials=3)  # too few done
    # compared at the same epoch: the median of the finished trials' best after 2 epochs is
    # 0.30, so 0.31 survives although it is far below their final 0.45
    assert not should_prune([0.05, 0.31], finished, prune_after=2, startup_trials=3)
    assert should_prune([0.05, 0.29], finished, prune_after=2, startup_trials=3)
    # a finished trial that stopped early (patience) counts with its final best
    assert should_prune([0.1, 0.2, 0.3, 0.35], [[0.4], [0.5], [0.6]], 2, 3)


def test_the_pruning_hook_prunes_a_real_trial_that_learns_nothing(tmp_path):
    files = handmade.layouts(tmp_path / "data", small_item)["one_file"]
    base = asdict(spec_for(files, "single", tmp_path / "unused", epochs=1))
    config = load_config("local", environ={})
    study = optuna.create_study(directions=["maximize", "minimize"])
    for history in ([0.3, 0.5, 0.6], [0.2, 0.4, 0.5], [0.3, 0.45, 0.7]):
        study.add_trial(
            optuna.trial.create_trial(
                values=[max(history), 1000.0], user_attrs={HISTORY_ATTR: history}
            )
        )
    frozen_lr = TINY_SPACE.model_copy(update={"lr": (1e-9, 1e-9), "d_model": [8]})
    tune = config.tune.model_copy(
        update={"space": frozen_lr, "epochs_per_trial": 6, "prune_after": 2, "patience": 6}
    )
    study.optimize(lambda t: objective(t, base, tune), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_at_epoch"] == 1  # after 2 of 6 epochs
    assert len(trial.user_attrs[HISTORY_ATTR]) == 2
    assert max(trial.user_attrs[HISTORY_ATTR]) < 0.4


# ---- the front and the choice --------------------------------------------------------------


def row(trial: int, ndcg: float | None, params: int, state: str = "COMPLETE") -> dict:
    return {"trial": trial, "valid_ndcg_at_10": ndcg, "params": params, "state": state}


def test_pareto_front_and_the_choice_within_the_parameter_budget():
    rows = [
        row(0, 0.30, 1000),
        row(1, 0.40, 5000),
        row(2, 0.35, 5000),  # dominated by 1
        row(3, 0.25, 2000),  # dominated by 0
        row(4, 0.45, 20000),
        row(5, 0.90, 100, "PRUNED"),  # not finished: never on the front
        row(6, None, 100, "FAIL"),
    ]
    front = pareto_front(rows)
    assert [r["trial"] for r in front] == [4, 1, 0]
    assert choose(front, None)["trial"] == 4
    assert choose(front, 5000)["trial"] == 1
    assert choose(front, 1000)["trial"] == 0
    assert choose(front, 10)["trial"] == 4  # nothing fits: the best NDCG@10
    assert choose([], None) is None


def test_heads_that_do_not_divide_the_width_fail_at_load():
    with pytest.raises(ConfigError, match=r"tune.space.*3 does not divide 32"):
        load_config("local", ["tune.space.n_heads=[1, 3]"], environ={})


# ---- a small real study --------------------------------------------------------------------


@pytest.fixture
def tune_lake(spark, config, tmp_path):
    cfg = in_folder(
        config,
        tmp_path,
        train={"backend": "single", "warmup_steps": 1},
        tune={
            "n_trials": 4,
            "parallel": 2,
            "epochs_per_trial": 3,
            "patience": 3,
            "prune_after": 2,
            # pruning depends on which trials finish first; here it never starts (4 finished
            # trials are never there while one runs), so every trial completes and each
            # process's seeded sampler gives the same configurations every time
            "prune_startup_trials": 4,
            "max_params": 5000,  # d_model 8 fits (~2-3k), d_model 32 does not (~12k+)
            "space": TINY_SPACE,
        },
    )
    lake = Lake(spark, cfg.lake)
    write_version(spark, lake, range(200), n_items=60)
    return cfg, lake


def test_use_tuned_without_a_study_says_to_run_tune_first(tune_lake):
    cfg, lake = tune_lake
    with pytest.raises(PatternlakeError, match="patternlake tune teacher"):
        build_spec(lake, with_overrides(cfg, train={"use_tuned": True}), "single")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_small_parallel_study_is_kept_and_train_uses_its_choice(spark, tune_lake):
    cfg, lake = tune_lake
    summary = tune_teacher(lake, cfg)

    # every trial of both processes is in the one journal storage
    study = optuna.load_study(study_name=summary["study"], storage=open_storage(storage_path(cfg)))
    assert Path(summary["storage"]) == storage_path(cfg)
    trials = study.get_trials()
    assert len(trials) == 4
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    # and the two processes ran at the same time: some trials of 0 and 1 overlap
    assert any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
        if a.user_attrs["worker"] == 0 and b.user_attrs["worker"] == 1
    )

    # the lake table holds every trial, with the front and the one chosen
    rows = [r.asDict() for r in lake.read(TABLE).where(f"study = '{summary['study']}'").collect()]
    assert sorted(r["trial"] for r in rows) == [t.number for t in trials]
    by_trial = {t.number: t for t in trials}
    for r in rows:
        t = by_trial[r["trial"]]
        assert r["state"] == t.state.name
        assert {k: r[k] for k in SEARCHED} == pytest.approx(t.params)
        if r["state"] == "COMPLETE":
            assert r["valid_ndcg_at_10"] == pytest.approx(t.values[0])
            assert r["params"] == int(t.values[1])
        assert r["epochs_run"] == len(r[HISTORY_ATTR]) > 0
    front = pareto_front(rows)
    assert sorted(r["trial"] for r in rows if r["pareto"]) == sorted(f["trial"] for f in front)
    # Optuna's own front agrees
    assert {t.number for t in study.best_trials} == {f["trial"] for f in front}
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["pareto"]
    within = [f for f in front if f["params"] <= 5000]
    assert within, "the seeds should give at least one small finished trial"
    assert chosen[0]["params"] <= 5000
    assert chosen[0]["valid_ndcg_at_10"] == max(f["valid_ndcg_at_10"] for f in within)
    assert summary["chosen"]["trial"] == chosen[0]["trial"]

    # MLflow has the run with the front as a JSON artifact
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["chosen.trial"] == str(chosen[0]["trial"])
    assert run.data.metrics["pareto_size"] == len(front)
    assert "tuning/study.json" in [f.path for f in client.list_artifacts(run.info.run_id, "tuning")]

    # `run train` with train.use_tuned builds the chosen configuration
    spec = build_spec(lake, with_overrides(cfg, train={"use_tuned": True}), "single")
    c = chosen[0]
    assert {k: spec.model[k] for k in ("d_model", "n_heads", "n_layers", "max_len")} == {
        k: c[k] for k in ("d_model", "n_heads", "n_layers", "max_len")
    }
    assert spec.model["dropout"] == pytest.approx(c["dropout"])
    assert (spec.lr, spec.batch_size) == (pytest.approx(c["lr"]), c["batch_size"])
    plain = build_spec(lake, cfg, "single")
    assert plain.model["d_model"] == cfg.teacher.d_model and plain.lr == cfg.train.lr
