"""What a teacher training job trains on and with which settings: ``TrainSpec`` (plain
values, JSON-able, the same on every process), built from the lake and conf by
``build_spec``, which the train stage and the teacher's tuning share. The training itself is
``patternlake.models.fit``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patternlake.errors import PatternlakeError
from patternlake.models.teacher import TeacherConfig
from patternlake.sequence_reader import example_counts, item_id_count
from patternlake.sequence_schema import sequence_vocabulary

if TYPE_CHECKING:
    from patternlake.config import Config
    from patternlake.lake import Lake

log = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    files: list[str]
    data_version: int  # the user_sequences version trained on
    model: dict[str, Any]  # TeacherConfig fields
    backend: str  # horovod | ddp | single
    epochs: int = 20
    batch_size: int = 64  # per process: each rank's examples per step (global: x world)
    lr: float = 1e-3  # of one process; the optimizer's is lr x lr_scale(lr_scaling, world)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    patience: int = 3
    lr_scaling: str = "sqrt"  # none | sqrt | linear: lr x 1, sqrt(world), world
    schedule: str = "cosine"  # cosine | constant (after the warm-up)
    min_lr_ratio: float = 0.1  # cosine: the last step's learning rate, as a share of lr
    seed: int = 7
    valid_users: int = 0  # 0: every user's validation target
    threads: int = 1
    checkpoint_dir: str = ""
    result_path: str = ""  # horovodrun: rank 0 writes its result here
    max_batches_per_epoch: int = 0  # 0: all; >0 caps an epoch (benchmarks)
    window_stride: int = 0  # targets per training window (0: max_len, windows side by side)
    ema_decay: float = 0.0  # > 0: validate, keep and register an exponential moving average
    item_index_version: int = -1  # the item_index version of the catalogue (for evaluate)
    # sequence_reader.ExampleCounts of files for the model's window, counted once on the
    # driver (build_spec); None, or another window's: rank 0 counts and broadcasts
    example_counts: dict[str, Any] | None = None
    # a student's distillation (``students.distill``): {"k", "alpha", "temperature"}; files
    # are then a distillation table (``sequence_reader.SOFT_COLUMNS``); None: the teacher
    distill: dict[str, Any] | None = None
    # whose validation targets stop training: "" every user's (the sample of valid_users);
    # "tune" the users of ``split_of`` part 0 only, so that a gate can judge the others
    valid_part: str = ""

    @classmethod
    def from_config(cls, train: Any, **fields: Any) -> TrainSpec:
        """A spec with the settings of a ``train`` config section; ``fields`` add the rest
        (files, data version, model, backend) and override any setting."""
        settings = {
            "epochs": train.epochs,
            "batch_size": train.batch_size,
            "lr": train.lr,
            "warmup_steps": train.warmup_steps,
            "lr_scaling": train.lr_scaling,
            "schedule": train.schedule,
            "min_lr_ratio": train.min_lr_ratio,
            "weight_decay": train.weight_decay,
            "patience": train.patience,
            "seed": train.seed,
            "valid_users": train.valid_users,
            "threads": train.threads_per_proc,
            "window_stride": train.window_stride,
            "ema_decay": train.ema_decay,
        }
        return cls(**{**settings, **fields})


def lr_scale(rule: str, world: int) -> float:
    """How the learning rate grows with the number of processes: each adds ``batch_size``
    windows to the averaged gradient, so N processes take 1/N of the optimizer steps of one
    over an epoch. ``sqrt`` (the default: lr x sqrt(N), the usual rule for Adam, with the
    warm-up) makes up for part of the lost steps without the linear rule's risk: on
    MovieLens-100k, 2 processes at the unscaled lr made half the steps of 1 and stopped lower
    (test NDCG@10 0.0654 vs 0.0735), and the linear rule (x N) made 2-process training
    diverge-prone at lr 0.01."""
    return {"none": 1.0, "sqrt": world**0.5, "linear": float(world)}[rule]


def on_one_process(spec: TrainSpec, world: int) -> TrainSpec:
    """``spec`` for one process that trains as ``world`` processes would: their global batch
    (``batch_size x world`` windows a step) at their learning rate (``lr x lr_scale``), so
    the same optimizer steps. Benchmarks measure the default training this way."""
    return replace(
        spec,
        backend="single",
        batch_size=spec.batch_size * world,
        lr=spec.lr * lr_scale(spec.lr_scaling, world),
    )


def softmax_choice(mode: str, negatives: int, positions: int, n_items: int, budget_mb: int) -> int:
    """The teacher's ``sampled_softmax`` (0: full softmax): ``auto`` keeps the full softmax
    while one process batch's logits -- ``positions`` x ``n_items`` floats, about five
    times over with the seen mask, the softmax and its gradient -- fit in ``budget_mb``;
    ``sampled_softmax: 0`` (the setting before ``softmax`` existed) means full. Logged."""
    need_mb = positions * n_items * 4 * 5 / 2**20
    full = mode == "full" or negatives == 0 or (mode == "auto" and need_mb <= budget_mb)
    log.info(
        "train: %s softmax (%s: one batch's logits need %.0f MB, budget %d MB, %d items)",
        "full" if full else f"sampled ({negatives} negatives + in-batch)",
        mode,
        need_mb,
        budget_mb,
        n_items,
    )
    return 0 if full else negatives


def build_spec(lake: Lake, config: Config, backend: str) -> TrainSpec:
    """The spec of a teacher training job: the latest ``user_sequences`` version (its files
    and vocabulary), the catalogue size of the latest ``item_index``, the teacher and train
    settings of conf (or the tuned ones, ``train.use_tuned``) and its checkpoint folder."""
    version = lake.version("user_sequences")
    files = lake.files("user_sequences", version)
    item_version = lake.version("item_index")
    n_items = item_id_count(lake, item_version)
    vocabulary = sequence_vocabulary(lake, config, version)  # recorded with the table
    t = config.train
    teacher, lr, batch_size = config.teacher.model_dump(), t.lr, t.batch_size
    if t.use_tuned:
        tuned = tuned_teacher(lake)
        teacher.update(
            {k: tuned[k] for k in ("d_model", "n_heads", "n_layers", "dropout", "max_len")}
        )
        # a trial's (lr, batch_size) ran on one process: the same meaning as train's, so
        # lr_scaling carries it to num_proc processes as it does conf's
        lr, batch_size = tuned["lr"], tuned["batch_size"]
    teacher["sampled_softmax"] = softmax_choice(
        teacher.pop("softmax"),
        teacher["sampled_softmax"],
        positions=batch_size * teacher["max_len"],  # one process's batch
        n_items=n_items,
        budget_mb=t.softmax_memory_mb,
    )
    model = TeacherConfig(
        n_items=n_items,
        n_types=vocabulary.n_types,
        n_gaps=vocabulary.gap_buckets,
        **teacher,
    )
    if model.max_len > vocabulary.max_len:
        log.warning(
            "train: teacher.max_len %d exceeds the %d events user_sequences v%d keeps per "
            "user; positions beyond them stay padding",
            model.max_len,
            vocabulary.max_len,
            version,
        )
    spec = TrainSpec.from_config(
        t,
        files=files,
        data_version=version,
        item_index_version=item_version,
        model=model.to_dict(),
        backend="horovod" if backend == "horovodrun" else backend,
        batch_size=batch_size,
        lr=lr,
        example_counts=counted_examples(files, model.max_len, t.window_stride, version),
    )
    # one checkpoint folder per (data version, model, training settings, world size): a rerun
    # of the same job resumes, a changed job starts over
    derived = ("files", "checkpoint_dir", "result_path", "example_counts")
    key = {k: v for k, v in asdict(spec).items() if k not in derived}
    key["num_proc"] = 1 if backend == "single" else t.num_proc
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    spec.checkpoint_dir = str(
        Path(config.models.root).resolve() / "teacher" / "checkpoints" / digest
    )
    return spec


def counted_examples(
    files: list[str], max_len: int, window_stride: int, version: int
) -> dict[str, Any]:
    """The sharding plan's example counts (``sequence_reader.example_counts``), counted here,
    once, so that the training ranks do not each read the table to plan; logged."""
    started = time.perf_counter()
    counts = example_counts(files, max_len, min(window_stride, max_len) or None)
    log.info(
        "train: %d training examples in %d pieces of user_sequences v%d, counted once (%.1fs)",
        sum(counts.counts),
        len(counts.counts),
        version,
        time.perf_counter() - started,
    )
    return asdict(counts)


def tuned_teacher(lake: Lake) -> dict[str, Any]:
    """The chosen trial of the latest `patternlake tune teacher` study (``train.use_tuned``):
    its row of ``teacher_tuning`` (d_model, n_heads, n_layers, dropout, max_len, lr,
    batch_size, study, valid_ndcg_at_10, ...). Trials train on one process, so their
    ``batch_size`` is a per-process batch and ``lr`` the one-process learning rate, as
    ``train.batch_size`` and ``train.lr`` are."""
    if not lake.exists("teacher_tuning"):
        raise PatternlakeError(
            "train.use_tuned: teacher_tuning does not exist yet; run `patternlake tune teacher` "
            "first (or set train.use_tuned=false)"
        )
    row = (
        lake.read("teacher_tuning")
        .where("chosen")
        .orderBy("study_started", "study", ascending=False)
        .first()
    )
    if row is None:
        raise PatternlakeError("train.use_tuned: teacher_tuning has no chosen trial")
    tuned = row.asDict()
    log.info(
        "train teacher: tuned configuration of study %s (trial %d, validation NDCG@10 %.4f)",
        tuned["study"],
        tuned["trial"],
        tuned["valid_ndcg_at_10"],
    )
    return tuned
