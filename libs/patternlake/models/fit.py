"""One training function for every backend: Horovod (``horovod.spark.run``, which starts
one Spark task per process with ``mapPartitionsWithIndex``, or ``horovodrun``), torch DDP
(``TorchDistributor``, on Spark barrier tasks) and a single process.

Each process builds the same model from the same seed, averages gradients with the others,
trains on windows over every user's whole training part (``sequence_reader``; the plan's
example counts come with the spec, counted once, so no rank reads the table to plan), takes
``batch_size`` windows per process and step (a global batch of ``batch_size x world``),
follows a step schedule (linear warm-up, then cosine or constant) at ``lr x
lr_scale(lr_scaling, world)``, validates NDCG@10 after every epoch (rank 0, broadcast to all
so that all stop together), checkpoints to the model store and resumes from the last
checkpoint after a crash (model, optimizer and scheduler state). An epoch whose mean
training loss or validation NDCG@10 is not finite stops the run on every rank: it is neither
checkpointed nor saved as best, and the result says why (``diverged``), so that the job
raises instead of registering the model. With sampled softmax the item table trains
row-wise (``sparse_item_table``: a sparse gradient, ``optim.LazyAdamW`` and a row-wise
weight average), so a step's cost does not grow with the catalogue.

    python -m patternlake.models.fit SPEC.json   # what `horovodrun` launches
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from patternlake.models import ranking
from patternlake.models.metrics import evaluate_ranks, ranker_ranks
from patternlake.models.optim import LazyAdamW, WeightAverage
from patternlake.models.teacher import SequentialTeacher, TeacherConfig, pick_device
from patternlake.models.train_spec import TrainSpec, lr_scale
from patternlake.sequence_reader import (
    ExampleCounts,
    ShardedSequences,
    evaluation_arrays,
    example_counts,
    read_table,
    training_item_counts,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def lr_schedule(kind: str, warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the base learning rate at each optimizer step: linear warm-up over
    ``warmup_steps``, then constant or a cosine decay to ``min_ratio`` at ``total_steps``."""
    import math

    warmup = max(1, warmup_steps)
    span = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _progress(show: bool, total: int, initial: int) -> Any:
    """An epoch progress bar on a terminal (rank 0 only); silent in logs, tasks and CI."""
    from patternlake.progress import progress

    return progress(desc="teacher", total=total, initial=initial, unit="epoch", show=show)


def _steps_per_epoch(data: ShardedSequences, spec: TrainSpec) -> int:
    n = data.batches_per_epoch()
    return min(n, spec.max_batches_per_epoch) if spec.max_batches_per_epoch else n


class _Comm:
    """The few collective operations training needs, for each backend."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "horovod":
            import horovod.torch as hvd

            hvd.init()
            self.hvd = hvd
            self.rank, self.world, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        elif backend == "ddp":
            import torch.distributed as dist

            if not dist.is_initialized():
                # NCCL for the gradients on GPUs; Gloo for the CPU tensors of the epoch's
                # loss and validation sums and for broadcast_object
                dist.init_process_group(
                    "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
                )
            self.dist = dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0

    def broadcast_object(self, obj: Any) -> Any:
        if self.backend == "horovod":
            # collectives are matched by name; the default name is the object's type, which
            # differs between the root (a value) and the others (None)
            self._calls = getattr(self, "_calls", 0) + 1
            return self.hvd.broadcast_object(
                obj, root_rank=0, name=f"broadcast_object.{self._calls}"
            )
        if self.backend == "ddp":
            box = [obj]
            self.dist.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def allreduce_sum(self, value: float) -> float:
        if self.backend == "horovod":
            t = torch.tensor([value], dtype=torch.float64)  # sums of validation NDCG: exact
            return float(self.hvd.allreduce(t, op=self.hvd.Sum).item())
        if self.backend == "ddp":
            t = torch.tensor([value], dtype=torch.float64)
            self.dist.all_reduce(t)
            return float(t.item())
        return value

    def close(self) -> None:
        if self.backend == "ddp" and self.dist.is_initialized():
            self.dist.destroy_process_group()


def train_worker(
    spec_dict: dict[str, Any], on_epoch: Callable[[int, float], None] | None = None
) -> dict[str, Any] | None:
    """Runs in every training process; every rank returns rank 0's result.

    ``on_epoch(epoch, valid_ndcg@10)``, if given, is called on rank 0 after each finished
    epoch; it may raise to stop training (the tuner's pruning; single-process use only)."""
    spec = TrainSpec(**spec_dict)
    comm = _Comm(spec.backend)
    run = _build(spec, comm)
    ckpt_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
    state, resumed_from = _resume(run, ckpt_dir)
    # rank 0's view of where the run stands wins (every rank then runs the same epochs)
    state = comm.broadcast_object(state)
    run.train_model = _distribute(run, state)
    # the fixed validation sample (train.valid_users), drawn once by rank 0; every rank
    # ranks its own share of it each epoch and the sums are all-reduced
    valid = comm.broadcast_object(validation_set(spec, run.cfg) if comm.rank == 0 else None)
    valid = tuple(a[comm.rank :: comm.world] for a in valid)
    samples, train_seconds, diverged = _epochs(run, state, ckpt_dir, valid, on_epoch)

    total_samples = comm.allreduce_sum(float(samples))
    result = None
    if comm.rank == 0:
        result = {
            "history": state["history"],
            "best_epoch": state["best_epoch"],
            "best_valid_ndcg@10": state["best"],
            "best_path": str(ckpt_dir / "best.pt") if ckpt_dir else "",
            "world": comm.world,
            "backend": spec.backend,
            "device": str(run.device),
            # samples = training interactions predicted (window positions with a target), the
            # unit peers such as RecBole count (one sample = one target interaction)
            "samples_per_s": round(total_samples / train_seconds, 1) if train_seconds else 0.0,
            "resumed_from": resumed_from,
            "params": run.model.num_params(),
            "diverged": diverged,
        }
        if spec.result_path:
            Path(spec.result_path).write_text(json.dumps(result))
    # every rank returns rank 0's result: TorchDistributor keeps whichever rank writes last
    result = comm.broadcast_object(result)
    comm.close()
    return result


@dataclass
class _Run:
    """One process's training: its model (``train_model``: wrapped for DDP, else the model
    itself), optimizer, schedule, average and shard of the data."""

    spec: TrainSpec
    comm: _Comm
    device: torch.device
    cfg: TeacherConfig
    model: SequentialTeacher
    opt: Any  # AdamW (LazyAdamW with a row-wise item table), or Horovod's wrapper around it
    sched: Any
    ema: WeightAverage | None
    data: ShardedSequences
    train_model: torch.nn.Module | None = None


def _build(spec: TrainSpec, comm: _Comm) -> _Run:
    """Seeds, device, model, optimizer, this process's shard and the schedule, in the same
    order on every rank (the same seed gives every rank the same initial weights)."""
    torch.set_num_threads(max(1, spec.threads))
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(comm.local_rank)
        device = torch.device("cuda", comm.local_rank)

    cfg = TeacherConfig(**spec.model)
    model = SequentialTeacher(cfg).to(device)
    if spec.distill:
        model.distill = (float(spec.distill["alpha"]), float(spec.distill["temperature"]))
    if cfg.sampled_softmax > 0:
        # the sampler's popularity: counted once, by rank 0, from the item column only
        counts = training_item_counts(spec.files, cfg.n_items) if comm.rank == 0 else None
        model.set_sampling(comm.broadcast_object(counts))
    scale = lr_scale(spec.lr_scaling, comm.world)
    sparse = sparse_item_table(cfg, spec.backend, device)
    model.item_emb.sparse = sparse  # the item table's gradient: the rows a step touches
    optimizer = LazyAdamW if sparse else torch.optim.AdamW
    opt = optimizer(model.parameters(), lr=spec.lr * scale, weight_decay=spec.weight_decay)
    if spec.backend == "horovod":
        # wrap before loading a checkpoint: DistributedOptimizer builds a new optimizer (of
        # the same class, over the same parameter groups) with an empty state
        opt = comm.hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    stride = min(spec.window_stride, cfg.max_len) or None
    data = ShardedSequences(
        spec.files,
        comm.rank,
        comm.world,
        cfg.max_len,
        spec.batch_size,  # per process
        spec.seed,
        stride=stride,
        counts=_example_counts(spec, cfg.max_len, stride, comm),
        soft_k=int(spec.distill["k"]) if spec.distill else 0,
    )
    if comm.rank == 0:
        log.info(
            "train: %d process(es) x %d windows = a global batch of %d, %d steps an epoch; "
            "lr %g x %.4g (lr_scaling %s) = %g",
            comm.world,
            spec.batch_size,
            spec.batch_size * comm.world,
            data.batches_per_epoch(),
            spec.lr,
            scale,
            spec.lr_scaling,
            spec.lr * scale,
        )
    total_steps = spec.epochs * _steps_per_epoch(data, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_schedule(spec.schedule, spec.warmup_steps, total_steps, spec.min_lr_ratio)
    )
    rows = (ITEM_TABLE,) if sparse else ()
    ema = WeightAverage(model, spec.ema_decay, sparse=rows) if spec.ema_decay > 0 else None
    return _Run(spec, comm, device, cfg, model, opt, sched, ema, data)


def _example_counts(
    spec: TrainSpec, max_len: int, stride: int | None, comm: _Comm
) -> ExampleCounts:
    """The plan's example counts, the same on every rank (so every rank runs the same
    steps): the spec's when they are for this window (``build_spec`` counted them on the
    driver), else counted by rank 0, from two columns, and broadcast."""
    given = ExampleCounts(**spec.example_counts) if spec.example_counts else None
    if given is not None and given.fits(max_len, stride):
        return given
    counts = None
    if comm.rank == 0:
        started = time.perf_counter()
        counts = example_counts(spec.files, max_len, stride)
        log.info(
            "train: counted %d training examples for max_len %d (%s; %.1fs)",
            sum(counts.counts),
            max_len,
            "the spec's are another window's" if given else "none in the spec",
            time.perf_counter() - started,
        )
    return comm.broadcast_object(counts)


def _resume(run: _Run, ckpt_dir: Path | None) -> tuple[dict[str, Any], str | None]:
    """The run's state (epoch, best, history, bad epochs) and the checkpoint it resumed
    from: the newest in ``ckpt_dir``, loaded into the model, optimizer, schedule and
    average; a fresh state when there is none."""
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "history": [], "bad_epochs": 0}
    last = _latest_checkpoint(ckpt_dir) if ckpt_dir else None
    if last is None:
        return state, None
    # every rank reads the same file from the shared model store
    saved = torch.load(last, map_location=run.device, weights_only=False)
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    if run.ema is not None and saved.get("ema") is not None:
        run.ema.load_state_dict(saved["ema"])
    return saved["state"], str(last)


def _distribute(run: _Run, state: dict[str, Any]) -> torch.nn.Module:
    """The model to train: Horovod starts every rank from rank 0's weights (and, resumed,
    its optimizer state); DDP wraps the model; a single process trains it as it is."""
    comm = run.comm
    if run.spec.backend == "horovod":
        hvd = comm.hvd
        hvd.broadcast_parameters(run.model.state_dict(), root_rank=0)
        if state["epoch"] > 0:  # resumed (rank 0 says): its Adam moments and step counts
            # (on a fresh start every state is empty; broadcasting would take a zero step)
            hvd.broadcast_optimizer_state(run.opt, root_rank=0)
    elif run.spec.backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            run.model, device_ids=[comm.local_rank] if run.device.type == "cuda" else None
        )
    return run.model


def _epochs(
    run: _Run,
    state: dict[str, Any],
    ckpt_dir: Path | None,
    valid: tuple[np.ndarray, ...] | None,
    on_epoch: Callable[[int, float], None] | None,
) -> tuple[int, float, str | None]:
    """Trains from ``state["epoch"]`` until ``spec.epochs``, patience or divergence,
    updating ``state``; (training samples, training seconds, why it diverged or None)."""
    spec, comm = run.spec, run.comm
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else nullcontext()
    )
    samples, train_seconds = 0, 0.0
    diverged = None
    bar = _progress(comm.rank == 0, spec.epochs, state["epoch"])
    for epoch in range(state["epoch"], spec.epochs):
        started = time.perf_counter()
        loss_sum, steps, epoch_samples = _train_epoch(run, epoch, amp)
        samples += epoch_samples
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        mean_loss = comm.allreduce_sum(loss_sum / max(steps, 1)) / comm.world
        if run.ema is not None:
            run.ema.sync(run.model)  # every row of a row-wise average current
        evaluated = run.ema.model if run.ema is not None else run.model  # kept and registered
        share = validate_ndcg(evaluated, valid, run.cfg, run.device) * len(valid[0])
        ndcg = comm.allreduce_sum(share) / max(1.0, comm.allreduce_sum(float(len(valid[0]))))
        diverged = _divergence(epoch, mean_loss, ndcg)
        if diverged:  # every rank sees the same (all-reduced, broadcast) values: all stop
            break
        lr = run.opt.param_groups[0]["lr"]
        improved = _record_epoch(state, epoch, mean_loss, steps, ndcg, elapsed, lr)
        if comm.rank == 0 and ckpt_dir:
            _save(ckpt_dir, epoch, run.model, run.opt, run.sched, state, improved, run.ema)
        if comm.rank == 0 and on_epoch is not None:
            on_epoch(epoch, ndcg)
        bar.set_postfix(loss=f"{mean_loss:.3f}", ndcg=f"{ndcg:.4f}", best=f"{state['best']:.4f}")
        bar.update(1)
        if state["bad_epochs"] >= spec.patience:
            break
    bar.close()
    return samples, train_seconds, diverged


def _train_epoch(run: _Run, epoch: int, amp: Any) -> tuple[float, int, int]:
    """One epoch over this process's shard (at most ``spec.max_batches_per_epoch``
    batches): (summed loss, optimizer steps, training samples = targets predicted)."""
    spec = run.spec
    run.model.train()
    loss_sum, steps, samples = 0.0, 0, 0
    for b, batch in enumerate(prefetch(run.data.epoch(epoch))):
        if spec.max_batches_per_epoch and b >= spec.max_batches_per_epoch:
            break
        batch = batch.to(run.device)
        with amp:  # forward() is the training loss (so DDP's hooks see it)
            loss = run.train_model(
                batch.items,
                batch.types,
                batch.gaps,
                batch.targets,
                batch.soft_items,
                batch.soft_logits,
            )
        run.opt.zero_grad()
        loss.backward()
        _step(run)
        run.sched.step()
        if run.ema is not None:
            run.ema.update(run.model)
        loss_sum += float(loss.detach())
        steps += 1
        samples += int((batch.targets > 0).sum())  # training interactions (targets)
    return loss_sum, steps, samples


ITEM_TABLE = "item_emb.weight"


def sparse_item_table(cfg: TeacherConfig, backend: str, device: torch.device) -> bool:
    """Whether the item table trains row-wise (sparse gradient, LazyAdamW, row-wise weight
    average): with sampled softmax a step touches only its batch's items and candidates, so
    a step's cost does not grow with the catalogue. Not with the full softmax (every row has
    a gradient), and not under DDP on CUDA, whose NCCL all-reduce takes dense tensors only
    (Horovod all-gathers sparse gradients; DDP over gloo reduces them)."""
    if cfg.sampled_softmax <= 0:
        return False
    return not (backend == "ddp" and device.type == "cuda")


def _step(run: _Run) -> None:
    """The optimizer step; with a row-wise weight average, the rows the step will change
    are brought up to date first, from the reduced gradient (Horovod reduces in
    ``synchronize``, which ``step`` would otherwise call)."""
    if run.ema is None or not run.ema.sparse:
        run.opt.step()
        return
    if run.spec.backend == "horovod":
        run.opt.synchronize()
        run.ema.before_step(run.model)
        with run.opt.skip_synchronize():
            run.opt.step()
        return
    run.ema.before_step(run.model)
    run.opt.step()


def prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``batches`` prepared on a background thread, up to ``depth`` ahead, while the
    training thread runs the model (Arrow decoding and numpy windowing release the GIL for
    most of their work). An error in the producer is raised here; leaving the loop early
    stops the producer."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _divergence(epoch: int, mean_loss: float, ndcg: float) -> str | None:
    """Why the run stops at ``epoch`` when its loss or validation NDCG@10 is not finite."""
    if math.isfinite(mean_loss) and math.isfinite(ndcg):
        return None
    bad = {"training loss": mean_loss, "validation NDCG@10": ndcg}
    return (
        f"epoch {epoch}: "
        + ", ".join(f"{k} is {v}" for k, v in bad.items() if not math.isfinite(v))
        + "; the model diverged (try a lower train.lr or more train.warmup_steps); "
        "this epoch is neither checkpointed nor kept as best"
    )


def _record_epoch(
    state: dict[str, Any],
    epoch: int,
    mean_loss: float,
    steps: int,
    ndcg: float,
    seconds: float,
    lr: float,
) -> bool:
    """Appends the epoch to ``state["history"]``, moves the best and the patience count and
    the next epoch; whether it improved on the best."""
    improved = ndcg > state["best"]
    state["history"].append(
        {
            "epoch": epoch,
            "loss": round(mean_loss, 5),
            "steps": steps,
            "valid_ndcg@10": ndcg,
            "seconds": round(seconds, 2),
            "lr": lr,
        }
    )
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    if improved:
        state["best"], state["best_epoch"] = ndcg, epoch
    state["epoch"] = epoch + 1
    return improved


def split_of(users: np.ndarray) -> np.ndarray:
    """Each user id's part (0 or 1), fixed by a hash of the id: a student's training stops on
    the validation targets of part 0 ("tune") and its gates judge part 1 ("gate"), so no
    choice is judged on the users it was made on."""
    return np.fromiter((zlib.crc32(str(u).encode()) & 1 for u in users), np.int64, len(users))


def validation_set(spec: TrainSpec, cfg: TeacherConfig) -> tuple[np.ndarray, ...]:
    users, items, types, gaps, target = evaluation_arrays(
        read_table(spec.files), cfg.max_len, "valid"
    )
    if spec.valid_part:
        keep = split_of(users) == {"tune": 0, "gate": 1}[spec.valid_part]
        users, items, types, gaps, target = (a[keep] for a in (users, items, types, gaps, target))
    if 0 < spec.valid_users < len(users):
        pick = np.random.default_rng(spec.seed).choice(len(users), spec.valid_users, replace=False)
        items, types, gaps, target = items[pick], types[pick], gaps[pick], target[pick]
    return items, types, gaps, target


@torch.no_grad()
def validate_ndcg(
    model: SequentialTeacher,
    valid: tuple[np.ndarray, ...] | None,
    cfg: TeacherConfig,
    device: torch.device,
) -> float:
    if valid is None or len(valid[0]) == 0:
        return 0.0
    items, types, gaps, target = valid
    model.eval()

    def inputs(s: slice) -> torch.Tensor:
        return torch.from_numpy(np.stack([items[s], types[s], gaps[s]], axis=1)).to(device)

    # target ranks counted over item chunks: no (users x catalogue) matrix on the host
    rank = ranker_ranks(ranking.ranker_for(model), inputs)
    overall, _ = evaluate_ranks(
        rank, len(target), target, np.zeros(len(target)), cfg.n_items, batch_size=512
    )
    return float(overall["ndcg@10"])


KEEP_CHECKPOINTS = 3


def _latest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = sorted(directory.glob("epoch-*.pt"))
    return found[-1] if found else None


def _save(
    directory: Path,
    epoch: int,
    model: SequentialTeacher,
    opt: Any,
    sched: Any,
    state: dict,
    best: bool,
    ema: WeightAverage | None = None,
) -> None:
    """Atomic: write to a temporary name, then rename (a crash never leaves half a file).
    With an average, ``best.pt`` holds the averaged weights (what was validated)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": opt.state_dict(),  # Horovod's DistributedOptimizer is an AdamW too
        "scheduler": sched.state_dict(),
        "state": state,
        "config": model.config.to_dict(),
    }
    tmp = directory / f".epoch-{epoch:04d}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, directory / f"epoch-{epoch:04d}.pt")
    # resuming needs the newest; a few more cover a file lost with a crashed disk write
    # (was: every epoch kept, 2.5 MB each for the ml-100k teacher, 500 MB over 200 epochs)
    for old in sorted(directory.glob("epoch-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    if best:
        tmp = directory / ".best.pt.tmp"
        kept = ema.model if ema is not None else model
        torch.save(
            {"model": kept.state_dict(), "config": model.config.to_dict(), "epoch": epoch}, tmp
        )
        os.replace(tmp, directory / "best.pt")


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(argv[0]).read_text())
    train_worker(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
