"""distill: the registered teacher + ``user_sequences`` -> one shared student for every user,
registered, gated and recorded in ``model_decisions``.

1. **The teacher's top-K, stored once** (``students.topk``): a Spark batch inference job
   over the ``user_sequences`` version the teacher was trained on writes ``teacher_topk``
   (the sequences plus the teacher's ``students.top_k`` best items and logits at every
   training target). A rerun for the same teacher and data reuses it.
2. **One student, trained like the teacher**: the widest ``students.d_model`` whose served
   int8 file fits ``students.max_bytes_ratio`` of the fp32 teacher's file, over the whole
   catalogue with the teacher's window and seen term, trained on every user by the
   teacher's training function and backend (``train.backend``, ``train.num_proc``: Horovod,
   DDP or one process) on ``alpha x T^2 x KL`` over the stored top-K plus ``(1 - alpha)
   x`` the next-item loss. Early stopping on the validation targets of the "tune" half of
   the users (``fit.split_of``).
3. **Gates on the other half**: the pooled gate is a paired bootstrap of per-user NDCG@10,
   student against teacher, over the "gate" half's validation targets: promoted when the
   ratio's 90% lower bound is at least ``students.gate``. Per segment only a harm guard:
   the segment goes back to the teacher when its ratio's 90% upper bound is under
   ``students.harm_floor``. Every decision, with its interval, goes to ``model_decisions``;
   each segment's champion alias points at the shared student or is removed (the teacher
   serves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pyspark.sql import SparkSession

from patternlake import registry
from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.models.backends import load_best, run_backend
from patternlake.models.fit import split_of
from patternlake.models.student import Student
from patternlake.models.teacher import TeacherScorer, teacher_from_bytes
from patternlake.models.train_spec import TrainSpec, counted_examples
from patternlake.sequence_reader import evaluation_arrays, read_table
from patternlake.sequence_schema import pinned_sequence_files
from patternlake.students import gates
from patternlake.students.promotion import Candidate, Verdict, record
from patternlake.students.topk import TABLE, store_teacher_topk
from patternlake.students.transforms import student_config

log = logging.getLogger(__name__)

SHARED = -1  # the segment id of decisions and versions about every user


def pinned_files(lake: Lake, tags: dict[str, str], stage: str) -> tuple[list[str], int]:
    """The files of the user_sequences version the teacher was trained on, and the version."""
    if "data.version" not in tags:
        version = lake.version("user_sequences")
        return lake.files("user_sequences", version), version
    version = int(tags["data.version"])
    return pinned_sequence_files(lake, version, stage), version


class GateUsers:
    """The "gate" half's validation inputs and each user's segment: what the gates of distill
    and compress judge on (and every user's validation input, for int8 fidelity)."""

    def __init__(self, spark: SparkSession, lake: Lake, files: list[str], max_len: int):
        users, items, types, gaps, target = evaluation_arrays(read_table(files), max_len, "valid")
        keep = split_of(users) == 1
        self.every_x = np.stack([items, types, gaps], axis=1)  # every user's (fidelity)
        self.users = users[keep]
        self.x = self.every_x[keep]
        self.target = target[keep]
        self.segment = np.full(len(self.users), SHARED, dtype=np.int64)
        # every segment of the table, with gate users or not: each one's alias is decided
        self.segment_ids: list[int] = []
        if lake.exists("segments"):
            self.segment_ids = sorted(
                int(r[0]) for r in lake.read("segments").select("segment_id").distinct().collect()
            )
        if lake.exists("segments") and len(self.users):
            ids = [str(u) for u in self.users]
            wanted = spark.createDataFrame([(u,) for u in ids], "user_id string")
            joined = wanted.join(lake.read("segments").select("user_id", "segment_id"), "user_id")
            found = {r.user_id: int(r.segment_id) for r in joined.collect()}
            self.segment = np.array([found.get(u, SHARED) for u in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.target)

    def ndcg(self, model: Any, rows: np.ndarray | None = None) -> np.ndarray:
        """Per gate user (of ``rows``, a mask, when given) NDCG@10 of ``model``."""
        if rows is None:
            ranks, _ = gates.ranks_and_top10(model, self.x, self.target)
        else:
            ranks, _ = gates.ranks_and_top10(model, self.x[rows], self.target[rows])
        return gates.per_user_ndcg(ranks)


def student_spec(
    config: Config, files: list[str], data_version: int, model: dict[str, Any], backend: str
) -> TrainSpec:
    """The shared student's training job: the teacher's training settings (``train``) with the
    student's own epochs, batch, learning rate and seed, its distillation, and early stopping
    on the "tune" half; checkpoints per (data, model, settings, world) as the teacher's."""
    s, t = config.students, config.train
    spec = TrainSpec.from_config(
        t,
        files=files,
        data_version=data_version,
        model=model,
        backend="horovod" if backend == "horovodrun" else backend,
        epochs=s.epochs,
        patience=s.patience,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        valid_users=t.valid_users,  # a fixed sample of the tune half, as the teacher's
        valid_part="tune",
        ema_decay=0.0,
        distill={"k": s.top_k, "alpha": s.alpha, "temperature": s.temperature},
        example_counts=counted_examples(files, model["max_len"], t.window_stride, data_version),
    )
    key = {k: v for k, v in asdict(spec).items() if k not in ("files", "example_counts")}
    key["files"] = sorted(Path(f).name for f in files)
    key["num_proc"] = 1 if backend == "single" else t.num_proc
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    spec.checkpoint_dir = str(
        Path(config.models.root).resolve() / "student" / "checkpoints" / digest
    )
    return spec


def distill(spark: SparkSession, lake: Lake, config: Config) -> dict[str, Any]:
    started = time.monotonic()
    registry.require_store(config, "distill")
    teacher_data, tags = registry.teacher_file(config)
    teacher = teacher_from_bytes(teacher_data)
    tc = teacher.config
    files, data_version = pinned_files(lake, tags, "distill")
    s, t = config.students, config.train
    stride = min(t.window_stride, tc.max_len) or tc.max_len
    budget = int(s.max_bytes_ratio * len(teacher_data))
    topk_version, topk = store_teacher_topk(
        spark, lake, teacher_data, tags["version"], data_version, s.top_k, stride
    )
    topk_files = lake.files(TABLE, topk_version)
    backend = t.backend
    num_proc = 1 if backend == "single" else t.num_proc
    searched: list[dict[str, Any]] = []
    if s.search.trials:
        s, searched = search(spark, config, tc, budget, topk_files, data_version)
        config = config.model_copy(update={"students": s})
    chosen = student_config(tc, budget, s.d_model, s.n_layers, s.n_heads, s.dropout, s.item_share)
    if chosen is None:
        raise PatternlakeError(
            f"distill: no student of widths {s.d_model} (n_layers {s.n_layers}, n_heads "
            f"{s.n_heads}, item_share {s.item_share}) fits {budget:,} bytes = "
            f"students.max_bytes_ratio {s.max_bytes_ratio} x the teacher's "
            f"{len(teacher_data):,}; allow more bytes or narrower widths"
        )
    cfg, int8_bytes = chosen
    spec = student_spec(config, topk_files, data_version, cfg.to_dict(), backend)
    log.info(
        "distill: shared student d_model %d x %d layers (int8 file %s bytes <= %s = %.2f x the "
        "teacher's), %s x %d processes, from %s v%d",
        cfg.d_model,
        cfg.n_layers,
        f"{int8_bytes:,}",
        f"{budget:,}",
        s.max_bytes_ratio,
        backend,
        num_proc,
        TABLE,
        topk_version,
    )
    trained = time.monotonic()
    result = run_backend(spark, spec, backend, num_proc)
    if result.get("diverged") or result["best_epoch"] < 0:
        raise PatternlakeError(
            f"distill: the student did not train ({result.get('diverged') or 'no epoch'}); "
            "nothing was registered"
        )
    train_s = round(time.monotonic() - trained, 1)
    student = Student(cfg, tc.n_items, None)
    student.net.load_state_dict(load_best(result).state_dict())
    student.eval()
    model = student.to_bytes(segment=SHARED, shared=True)

    judged = GateUsers(spark, lake, files, tc.max_len)
    teacher_ndcg = judged.ndcg(TeacherScorer(teacher))
    student_ndcg = judged.ndcg(student)
    pooled = gates.promotion(
        gates.paired_bootstrap(student_ndcg, teacher_ndcg, s.resamples, s.seed),
        s.gate,
        s.min_users,
    )
    numbers = {
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "item_rank": cfg.item_rank,
        "lr": s.lr,
        "alpha": s.alpha,
        "params": student.num_params(),
        "teacher_params": teacher.num_params(),
        "fp32_bytes": len(model),
        "int8_bytes": int8_bytes,
        "teacher_bytes": len(teacher_data),
        "budget_bytes": budget,
        "best_epoch": result["best_epoch"],
        "epochs_run": len(result["history"]),
        "tune_valid_ndcg@10": result["best_valid_ndcg@10"],
        "samples_per_s": result["samples_per_s"],
        "backend": result["backend"],
        "world": result["world"],
        "train_s": train_s,
        "teacher_topk": topk,
    }
    if searched:
        numbers["search"] = searched
    version = Candidate(
        segment=SHARED,
        variant="fp32",
        model=model,
        run_tags={"data.version": data_version, "teacher.version": tags["version"]},
        run_params={f"model.{k}": v for k, v in cfg.to_dict().items()}
        | {
            "temperature": s.temperature,
            "alpha": s.alpha,
            "top_k": s.top_k,
            "budget_bytes": budget,
            "backend": backend,
            "num_proc": num_proc,
        },
        run_metrics={
            "tune_valid_ndcg_at_10": result["best_valid_ndcg@10"],
            "gate_valid_ndcg_at_10": pooled.interval.candidate,
            "teacher_gate_valid_ndcg_at_10": pooled.interval.reference,
            "ratio": pooled.interval.ratio,
            "ratio_lower_90": pooled.interval.lower,
            "params": student.num_params(),
            "bytes": len(model),
        },
        version_tags={
            "shared": "true",
            "params": student.num_params(),
            "bytes": len(model),
            "valid_ndcg_at_10": round(pooled.interval.candidate, 6),
            "teacher_version": tags["version"],
            "data_version": data_version,
        },
        history=tuple(result["history"]),
        texts={"search.json": json.dumps(searched, indent=1)} if searched else {},
    ).register(config)
    verdicts = [
        Verdict.of_interval(
            "distill",
            SHARED,
            "fp32",
            pooled.interval,
            reference="teacher",
            threshold=s.gate,
            promoted=pooled.passed,
            champion=f"student v{version}" if pooled.passed else "teacher",
            reason=pooled.reason,
            details=numbers,
            version=version,
            params=student.num_params(),
            nbytes=len(model),
        )
    ]
    for g, guard in segment_guards(config, judged, student_ndcg, teacher_ndcg).items():
        serve = pooled.passed and guard.passed
        registry.set_champion(config, g, version if serve else None)
        verdicts.append(
            Verdict.of_guard(
                "distill",
                g,
                "fp32",
                guard,
                serve,
                f"student v{version}" if serve else "teacher",
                "teacher",
                s.harm_floor,
                pooled.passed,
                version,
                student.num_params(),
                len(model),
            )
        )
    out = record(lake, verdicts, tags["version"], started)
    log.info(
        "distill: shared student v%s, NDCG@10 vs teacher on %d gate users %s: %s",
        version,
        len(judged),
        pooled.interval.text(),
        "promoted" if pooled.passed else "not promoted (the teacher serves)",
    )
    return out


def search(
    spark: SparkSession,
    config: Config,
    teacher: Any,
    budget: int,
    files: list[str],
    data_version: int,
) -> tuple[Any, list[dict[str, Any]]]:
    """How to spend the byte budget, searched: ``students.search.trials`` Optuna (TPE)
    trials over depth, the item table's scheme (full or low-rank, ``item_share``), learning
    rate and alpha; each trial's width is the widest of ``students.d_model`` within the
    budget for its depth and scheme, it trains by the student's own training job (``epochs``
    / ``patience`` of the search) and scores its best validation NDCG@10 on the "tune" half
    (never the gate half). Returns the students settings with the best trial's choices and
    every trial."""
    import optuna

    s, q = config.students, config.students.search
    backend = config.train.backend
    num_proc = 1 if backend == "single" else config.train.num_proc
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        tried = s.model_copy(
            update={
                "n_layers": trial.suggest_categorical("n_layers", q.n_layers),
                "item_share": trial.suggest_categorical("item_share", q.item_share),
                "lr": trial.suggest_float("lr", *q.lr, log=True),
                "alpha": trial.suggest_float("alpha", *q.alpha),
            }
        )
        row: dict[str, Any] = {"trial": trial.number, **trial.params}
        chosen = student_config(
            teacher, budget, s.d_model, tried.n_layers, s.n_heads, s.dropout, tried.item_share
        )
        if chosen is None:
            rows.append(row | {"fits": False})
            raise optuna.TrialPruned(f"no width fits {budget:,} bytes")
        cfg, nbytes = chosen
        started = time.monotonic()
        run = config.model_copy(
            update={
                "students": tried.model_copy(update={"epochs": q.epochs, "patience": q.patience})
            }
        )
        spec = student_spec(run, files, data_version, cfg.to_dict(), backend)
        result = run_backend(spark, spec, backend, num_proc)
        trained = not result.get("diverged") and result["best_epoch"] >= 0
        value = float(result["best_valid_ndcg@10"]) if trained else 0.0
        rows.append(
            row
            | {
                "fits": True,
                "d_model": cfg.d_model,
                "item_rank": cfg.item_rank,
                "int8_bytes": nbytes,
                "tune_valid_ndcg@10": round(value, 6),
                "best_epoch": result["best_epoch"],
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        log.info("distill: search trial %d %s -> tune NDCG@10 %.4f", trial.number, rows[-1], value)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=s.seed)
    )
    study.optimize(objective, n_trials=q.trials)
    done = [r for r in rows if r.get("fits")]
    if not done:
        raise PatternlakeError(
            f"distill: no searched student fits {budget:,} bytes (students.search: n_layers "
            f"{q.n_layers}, item_share {q.item_share}); allow more bytes or narrower widths"
        )
    best = study.best_trial.params
    for r in rows:
        r["chosen"] = r["trial"] == study.best_trial.number
    log.info("distill: search chose %s of %d trials", best, len(rows))
    return s.model_copy(
        update={k: best[k] for k in ("n_layers", "item_share", "lr", "alpha")}
    ), rows


def segment_guards(
    config: Config, judged: GateUsers, model_ndcg: np.ndarray, reference_ndcg: np.ndarray
) -> dict[int, gates.Decision]:
    """Per segment of the gate users: the harm guard of the model against its reference on
    that segment's users, its upper bound at ``gates.harm_level`` of the number of segments
    (users without a segment are served by the teacher anyway)."""
    s = config.students
    out = {}
    # a segment without gate users gets no verdict of its own (the pooled gate decides)
    segments = sorted(({int(x) for x in judged.segment} | set(judged.segment_ids)) - {SHARED})
    level = gates.harm_level(len(segments))
    for g in segments:
        mine = judged.segment == g
        interval = gates.paired_bootstrap(
            model_ndcg[mine], reference_ndcg[mine], s.resamples, s.seed, wide_level=level
        )
        out[g] = gates.harm(interval, s.harm_floor, s.min_users)
    return out
