"""Peers side by side: RecBole 1.2.1's SASRec and GRU4Rec next to our models, one split.

    .venv/bin/python bench/peers.py                        # all models, table + JSON file
    .venv/bin/python bench/peers.py --models markov,popularity --json
    .venv/bin/python bench/peers.py --models sasrec --max-len 200 --rerun
    .venv/bin/python bench/peers.py --models teacher,markov,popularity,sasrec,gru4rec \
        --reuse bench/results/peers.json --teacher-seeds 7,8,9   # peers from an earlier run

Data: public MovieLens-100k (``ml-100k.inter``, shipped inside the RecBole 1.2.1 wheel on
PyPI; downloaded once with ``pip download`` into ${PATTERNLAKE_CACHE:-~/.cache/patternlake}),
or any ``--input`` file in the same layout (user, item, rating, timestamp; tab-separated).

Split (docs/design.md's protocol, built once by ``build_split`` and given to every model): per
user, events ordered by time, ties by line order in the source file; users with fewer than
3 events are not evaluated (their events are training data); the last event is the test
target, the one before it the validation target, the rest is training. Full ranking over
the whole catalogue, the user's past items NOT masked; NDCG@10, HR@10, MRR@10 with
patternlake's rank rule (ties count against the target). Only validation selects anything
(early stopping); the table shows test.

RecBole runs in its own virtual environment (${cache}/peers-venv: torch 2.13.0 CPU,
recbole 1.2.1 without ray, numpy < 2), created here when missing, through
bench/peers/recbole_runner.py. It reads the split as an atomic file whose timestamps are
per-user ordinals, with ``eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}``,
so its leave-one-out is exactly ours; the runner reports RecBole's own metrics too, and this
script checks that RecBole saw the same users, items and training samples.

Adding a model (e.g. our teacher): write ``run_x(split: Split, ctx: RunContext) -> dict``
returning at least ``params``, ``test`` (metrics dict, see ``evaluate_on_split``) and
``train_samples_per_s``, and put it into ``MODELS``. Peer results are cached per
(model, settings, split) in ${cache}/peers-results; ``--rerun`` trains them again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "recbole_runner.py"
DEFAULT_OUT = HERE / "results" / "peers.json"
RECBOLE = "recbole==1.2.1"
ML100K_IN_WHEEL = "recbole/dataset_example/ml-100k/ml-100k.inter"
# The peers venv, in install order. torch first and exactly 2.13.0: the only spec that takes
# the local CPU wheel (anything else pulls GBs of CUDA). recbole itself goes in with
# --no-deps: its requirement ray<=2.6.3 is only used by recbole.quick_start's tuning, which
# the runner does not import. numpy < 2 because RecBole uses np.float_ & co.
PEERS_TORCH = "torch==2.13.0"
PEERS_REQUIREMENTS = [
    "numpy==1.26.4",
    "scipy==1.17.1",
    "pandas==2.2.3",
    "scikit-learn==1.9.1",
    "tqdm",
    "colorlog==4.7.2",
    "colorama==0.4.4",
    "pyyaml",
    "tensorboard",
    "thop",
    "tabulate",
    "plotly",
    "texttable",
    "psutil",
]
METRIC_KEYS = ("ndcg@10", "hr@10", "mrr@10")


def cache_dir() -> Path:
    root = os.environ.get("PATTERNLAKE_CACHE") or Path.home() / ".cache" / "patternlake"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def ensure_peers_venv(cache: Path) -> Path:
    """The peers venv's python; created (idempotently) when missing or outdated."""
    venv = cache / "peers-venv"
    python = venv / "bin" / "python"
    spec = "\n".join([PEERS_TORCH, RECBOLE, *PEERS_REQUIREMENTS])
    marker = venv / ".peers-ready"
    if python.exists() and marker.exists() and marker.read_text() == spec:
        return python
    log(f"creating the peers venv in {venv} (torch, recbole, numpy<2; a few minutes)")
    subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, PEERS_TORCH], check=True)
    subprocess.run([*pip, "--no-deps", str(recbole_wheel(cache, python))], check=True)
    subprocess.run([*pip, *PEERS_REQUIREMENTS], check=True)
    subprocess.run(
        [str(python), "-c", "import recbole.model.sequential_recommender, numpy, torch"],
        check=True,
    )
    marker.write_text(spec)
    return python


def recbole_wheel(cache: Path, python: str | Path | None = None) -> Path:
    """The RecBole 1.2.1 wheel (it also carries MovieLens-100k), downloaded once."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [str(python or "python3"), "-m", "pip"]
    subprocess.run([*pip, "download", RECBOLE, "--no-deps", "-d", str(wheels)], check=True)
    return sorted(wheels.glob("recbole-1.2.1-*.whl"))[0]


def movielens_100k(cache: Path) -> Path:
    """Path of ml-100k.inter, extracted from the RecBole wheel into the cache."""
    target = cache / "data" / "ml-100k" / "ml-100k.inter"
    if target.exists():
        return target
    python = cache / "peers-venv" / "bin" / "python"
    wheel = recbole_wheel(cache, python if python.exists() else None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(ML100K_IN_WHEEL))
        tmp.rename(target)
    return target


# --------------------------------------------------------------------------------- split


@dataclass
class Split:
    """The protocol's split in our item id space (1..n_items-1, 0 = padding).

    ``train[u]`` / ``train_times[u]``: user u's training events, time-ordered (the whole
    history for users that are not evaluated). ``valid[u]``, ``test[u]``: the targets, 0
    where u is not evaluated (``evaluable[u]`` False). ``*_time``: their timestamps.
    """

    users: np.ndarray  # (U,) source user tokens
    item_tokens: np.ndarray  # (n_items,) source item token of each id; [0] = ""
    train: list[np.ndarray]
    train_times: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    valid_time: np.ndarray
    test_time: np.ndarray
    source: str = ""
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_tokens)

    @property
    def evaluable(self) -> np.ndarray:
        return self.test > 0

    def train_interactions(self) -> int:
        """Training targets: every training event but each user's first."""
        return int(sum(max(len(t) - 1, 0) for t in self.train))

    def sequences(self, which: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """For evaluable users: (inputs, input times, targets) of ``which`` in
        {"valid", "test"}; the test input is the training part plus the validation target."""
        idx = np.flatnonzero(self.evaluable)
        if which == "valid":
            return [self.train[u] for u in idx], [self.train_times[u] for u in idx], self.valid[idx]
        if which != "test":
            raise ValueError(which)
        seqs = [np.append(self.train[u], self.valid[u]) for u in idx]
        times = [np.append(self.train_times[u], self.valid_time[u]) for u in idx]
        return seqs, times, self.test[idx]

    def training_pairs(self, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded (inputs, next-item targets) of every user's training part, the last
        ``max_len`` transitions of each (all of them when None), as patternlake's
        ``training_arrays`` lays them out."""
        rows = [t for t in self.train if len(t) >= 2]
        width = max_len or max(len(t) - 1 for t in rows)
        return pad_left([t[:-1] for t in rows], width), pad_left([t[1:] for t in rows], width)


def pad_left(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[i, max_len - len(s) :] = s
    return out


def load_events(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, time) in line order from a tab-separated MovieLens-style file (user,
    item, rating, timestamp; an optional header line such as RecBole's is skipped)."""
    users, items, times = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            try:
                t = float(parts[3])
            except ValueError:
                if n == 0:
                    continue  # header
                raise
            users.append(parts[0])
            items.append(parts[1])
            times.append(t)
    return np.array(users, dtype=object), np.array(items, dtype=object), np.array(times)


def build_split(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, min_events: int = 3, source: str = ""
) -> Split:
    """The protocol's split from events given in source (line) order."""
    line = np.arange(len(users))
    user_tokens, user_code = np.unique(users.astype(str), return_inverse=True)
    # item ids in order of first appearance in (time, line) order; 0 is padding
    by_time = np.lexsort((line, times))
    item_tokens, first_pos = np.unique(items[by_time].astype(str), return_index=True)
    order = np.argsort(first_pos, kind="stable")
    item_id_of = np.empty(len(item_tokens), dtype=np.int64)
    item_id_of[order] = np.arange(1, len(item_tokens) + 1)
    _, item_code = np.unique(items.astype(str), return_inverse=True)
    item_ids = item_id_of[item_code]

    order = np.lexsort((line, times, user_code))  # user, time, line
    u_sorted, i_sorted, t_sorted = user_code[order], item_ids[order], times[order]
    bounds = np.flatnonzero(np.diff(u_sorted)) + 1
    n_users = len(user_tokens)
    train, train_times = [], []
    valid = np.zeros(n_users, dtype=np.int64)
    test = np.zeros(n_users, dtype=np.int64)
    valid_time = np.zeros(n_users)
    test_time = np.zeros(n_users)
    for seq_items, seq_times in zip(
        np.split(i_sorted, bounds), np.split(t_sorted, bounds), strict=True
    ):
        u = len(train)
        if len(seq_items) >= min_events:
            valid[u], test[u] = seq_items[-2], seq_items[-1]
            valid_time[u], test_time[u] = seq_times[-2], seq_times[-1]
            seq_items, seq_times = seq_items[:-2], seq_times[:-2]
        train.append(seq_items)
        train_times.append(seq_times)
    tokens = np.empty(len(item_tokens) + 1, dtype=object)
    tokens[0] = ""
    tokens[item_id_of] = item_tokens
    digest = hashlib.sha256()
    for t, v, s in zip(train, valid, test, strict=True):
        digest.update(t.tobytes() + np.array([v, s]).tobytes())
    return Split(
        users=user_tokens,
        item_tokens=tokens,
        train=train,
        train_times=train_times,
        valid=valid,
        test=test,
        valid_time=valid_time,
        test_time=test_time,
        source=source,
        fingerprint=digest.hexdigest()[:16],
    )


def load_split(path: Path, min_events: int = 3) -> Split:
    return build_split(*load_events(path), min_events=min_events, source=str(path))


def write_recbole_input(split: Split, data_dir: Path, dataset: str) -> Path:
    """``data_dir/dataset/dataset.inter``: user, our item id, per-user ordinal as timestamp.
    RecBole keeps timestamps as float32 and sorts by them; unique small integers per user
    make its time order (and so its leave-one-out) exactly ours."""
    path = data_dir / dataset / f"{dataset}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, user in enumerate(split.users):
            seq = list(split.train[u])
            if split.test[u] > 0:
                seq += [split.valid[u], split.test[u]]
            f.writelines(f"{user}\t{item}\t{k}\n" for k, item in enumerate(seq))
    return path


# ------------------------------------------------------------------------------ evaluation


def evaluate_on_split(
    split: Split,
    score: Callable[[np.ndarray, np.ndarray], Any],
    which: str = "test",
    max_len: int = 200,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Metrics of ``score(items, times) -> (b, n_items) scores`` (torch tensor) on the
    split's ``which`` targets: inputs are left-padded (b, max_len) item ids and their
    timestamps (0 in padding). patternlake's evaluate_scorer, nothing masked."""
    from patternlake.models.metrics import evaluate_scorer

    seqs, times, targets = split.sequences(which)
    items = pad_left(seqs, max_len)
    stamps = np.zeros(items.shape)
    for i, t in enumerate(times):
        t = t[-max_len:]
        if len(t):
            stamps[i, max_len - len(t) :] = t
    overall, _ = evaluate_scorer(
        lambda s: score(items[s], stamps[s]),
        len(targets),
        targets,
        np.zeros(len(targets), dtype=np.int64),
        split.n_items,
        batch_size,
        history=None,
    )
    return overall


@dataclass
class RunContext:
    cache: Path
    threads: int = 2
    max_len: int = 50
    epochs: int = 200
    stopping_step: int = 10
    batch_size: int = 256
    dropout: float = 0.2
    seed: int = 2020
    max_train_s: float = 1800.0  # wall-clock budget of one peer's fit (0: none)
    budgets: dict[str, float] = field(default_factory=dict)  # per model, e.g. {"sasrec": 3000}
    baseline_max_len: int | None = None  # transitions per user the baselines fit (None: all)
    rerun: bool = False
    teacher_seeds: tuple[int, ...] = ()  # () : the conf's seed, one run
    teacher_set: dict[str, Any] = field(default_factory=dict)  # TrainSpec/TeacherConfig fields


def _fit_baseline(model: Any, split: Split, ctx: RunContext) -> dict[str, Any]:
    inputs, targets = split.training_pairs(ctx.baseline_max_len)
    t = time.perf_counter()
    model.fit(inputs, targets)
    fit_s = time.perf_counter() - t
    samples = int((targets > 0).sum())
    return {
        "params": model.num_params(),
        "valid": evaluate_on_split(split, lambda x, _: model.scores(x), "valid", 1),
        "test": evaluate_on_split(split, lambda x, _: model.scores(x), "test", 1),
        "train_samples": samples,
        "train_s": round(fit_s, 4),
        "train_samples_per_s": samples / max(fit_s, 1e-9),
        "fit_on": f"last {ctx.baseline_max_len} transitions per user"
        if ctx.baseline_max_len
        else "every training transition",
    }


def run_markov(split: Split, ctx: RunContext) -> dict[str, Any]:
    from patternlake.models.baselines import MarkovChain

    return {"kind": "patternlake baseline"} | _fit_baseline(MarkovChain(split.n_items), split, ctx)


def run_popularity(split: Split, ctx: RunContext) -> dict[str, Any]:
    from patternlake.models.baselines import Popularity

    return {"kind": "patternlake baseline"} | _fit_baseline(Popularity(split.n_items), split, ctx)


def recbole_params(model: str, ctx: RunContext) -> dict[str, Any]:
    common = {
        "MAX_ITEM_LIST_LENGTH": ctx.max_len,
        "train_batch_size": ctx.batch_size,
        "eval_batch_size": 1024,
        "learning_rate": 1e-3,
        "epochs": ctx.epochs,
        "stopping_step": ctx.stopping_step,
        "seed": ctx.seed,
        "loss_type": "CE",
    }
    if model == "SASRec":
        return common | {
            "hidden_size": 64,
            "inner_size": 256,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dropout_prob": ctx.dropout,
            "attn_dropout_prob": ctx.dropout,
        }
    if model == "GRU4Rec":
        return common | {
            "embedding_size": 64,
            "hidden_size": 128,
            "num_layers": 1,
            "dropout_prob": max(ctx.dropout, 0.3),
        }
    return common


def run_recbole(model: str, split: Split, ctx: RunContext) -> dict[str, Any]:
    params = recbole_params(model, ctx)
    budget = ctx.budgets.get(model.lower(), ctx.max_train_s)
    key = hashlib.sha256(
        json.dumps(
            [model, params, ctx.threads, budget, split.fingerprint, RECBOLE],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cached = ctx.cache / "peers-results" / f"{model}-{key}.json"
    if cached.exists() and not ctx.rerun:
        log(f"{model}: reusing {cached} (--rerun to train again)")
        return json.loads(cached.read_text())
    python = ensure_peers_venv(ctx.cache)
    with tempfile.TemporaryDirectory(prefix="peers-recbole-", dir=ctx.cache) as tmp:
        work = Path(tmp)
        dataset = "plsplit"
        write_recbole_input(split, work / "data", dataset)
        job = {
            "work_dir": str(work),
            "data_dir": str(work / "data"),
            "dataset": dataset,
            "model": model,
            "params": params,
            "threads": ctx.threads,
            "max_train_s": budget,
            "out": str(work / "result.json"),
        }
        (work / "job.json").write_text(json.dumps(job))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(ctx.threads),
            "MKL_NUM_THREADS": str(ctx.threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONNOUSERSITE": "1",
        }
        env.pop("PYTHONPATH", None)
        log(f"{model}: training in the peers venv (budget {budget:.0f} s) ...")
        t = time.perf_counter()
        proc = subprocess.run(
            [str(python), str(RUNNER), str(work / "job.json")],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise RuntimeError(f"{model}: RecBole runner failed ({proc.returncode})")
        result = json.loads((work / "result.json").read_text())
    result["kind"] = "RecBole 1.2.1 (isolated venv)"
    result["wall_s"] = round(time.perf_counter() - t, 1)
    check_same_split(model, result, split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    log(
        f"{model}: test NDCG@10 {result['test']['ndcg@10']:.4f}, {result['epochs']} epochs, "
        f"{result['train_samples_per_s']:.0f} samples/s ({result['wall_s']} s)"
    )
    return result


def check_same_split(model: str, result: dict[str, Any], split: Split) -> None:
    """RecBole must have seen our users, catalogue and training targets exactly."""
    expected = {
        "n_items": split.n_items,
        "test users": int(split.evaluable.sum()),
        "train samples per epoch": split.train_interactions(),
    }
    seen = {
        "n_items": result["n_items"],
        "test users": result["test"]["users"],
        "train samples per epoch": result["samples_per_epoch"],
    }
    result["same_split"] = expected == seen
    if expected != seen:
        log(f"WARNING {model}: RecBole's split differs from ours: {seen} vs {expected}")


def run_teacher(split: Split, ctx: RunContext) -> dict[str, Any]:
    """Our teacher with the packaged conf (conf/base.yaml) defaults plus
    ``--teacher-set``, single process, ``ctx.threads`` threads; with ``--teacher-seeds``
    one training per seed: the row shows the mean over seeds (each seed's numbers in
    ``runs``), since one run on 943 test users moves by about +-0.006 NDCG@10."""
    sys.path.insert(0, str(HERE))
    from peers_teacher import run_teacher as train_and_test

    seeds = ctx.teacher_seeds or (None,)
    runs = []
    for seed in seeds:
        overrides = dict(ctx.teacher_set)
        if seed is not None:
            overrides["seed"] = seed
        t = time.perf_counter()
        r = train_and_test(split, ctx, overrides)
        r["seed"], r["wall_s"] = seed, round(time.perf_counter() - t, 1)
        log(
            f"teacher seed {seed}: valid NDCG@10 {r['valid']['ndcg@10']:.4f}, test "
            f"{r['test']['ndcg@10']:.4f} ({r['epochs']} epochs, best {r['best_epoch']}, "
            f"{r['wall_s']:.0f} s)"
        )
        runs.append(r)
    if len(runs) == 1:
        return runs[0]

    def mean(which: str) -> dict[str, float]:
        keys = runs[0][which].keys()
        return {k: float(np.mean([r[which][k] for r in runs])) for k in keys}

    test = [r["test"]["ndcg@10"] for r in runs]
    return {
        **{k: runs[0][k] for k in ("kind", "params", "settings")},
        "valid": mean("valid"),
        "test": mean("test"),
        "test_ndcg@10_sd": float(np.std(test, ddof=1)),
        "epochs": round(float(np.mean([r["epochs"] for r in runs])), 1),
        "best_epoch": round(float(np.mean([r["best_epoch"] for r in runs])), 1),
        "stopped_by": f"patience; mean of seeds {list(seeds)}, test NDCG@10 sd "
        f"{np.std(test, ddof=1):.4f}",
        "train_s": round(float(np.mean([r["train_s"] for r in runs])), 1),
        "train_samples_per_s": float(np.mean([r["train_samples_per_s"] for r in runs])),
        "runs": runs,
    }


def reused_results(path: Path, names: list[str], split: Split) -> dict[str, dict[str, Any]]:
    """``names``' results from an earlier run's JSON (``--reuse``), refused unless that run
    used this split (same fingerprint); each is marked with where it came from."""
    report = json.loads(path.read_text())
    theirs = report["protocol"]["split_fingerprint"]
    if theirs != split.fingerprint:
        raise SystemExit(f"--reuse {path}: split {theirs} is not this split {split.fingerprint}")
    out = {}
    for name in names:
        if name not in report["models"]:
            raise SystemExit(f"--reuse {path}: no {name!r} in it (has {sorted(report['models'])})")
        out[name] = {**report["models"][name], "reused_from": str(path)}
    return out


MODELS: dict[str, Callable[[Split, RunContext], dict[str, Any]]] = {
    "teacher": run_teacher,
    "sasrec": lambda split, ctx: run_recbole("SASRec", split, ctx),
    "gru4rec": lambda split, ctx: run_recbole("GRU4Rec", split, ctx),
    "markov": run_markov,
    "popularity": run_popularity,
}
LABELS = {
    "teacher": "patternlake teacher",
    "sasrec": "RecBole SASRec",
    "gru4rec": "RecBole GRU4Rec",
}


# --------------------------------------------------------------------------------- report


def with_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    sas = results.get("sasrec", {})
    mk = results.get("markov", {})
    for r in results.values():
        nd = r["test"]["ndcg@10"]
        r["ratios"] = {
            "ndcg@10_vs_sasrec": ratio(nd, sas.get("test", {}).get("ndcg@10")),
            "ndcg@10_vs_markov": ratio(nd, mk.get("test", {}).get("ndcg@10")),
            "samples_per_s_vs_sasrec": ratio(
                r.get("train_samples_per_s"), sas.get("train_samples_per_s")
            ),
            "params_vs_sasrec": ratio(r.get("params"), sas.get("params")),
        }
    return results


def stopped(r: dict[str, Any]) -> str:
    if "epochs" not in r:
        return f"fit {r.get('train_s', 0):.3f} s"
    how = f"{r['epochs']} epochs, best {r['best_epoch']}, stopped by {r.get('stopped_by', 'patience')}"
    return how + (f" (reused: {r['reused_from']})" if r.get("reused_from") else "")


def yaml_value(text: str) -> Any:
    """``--teacher-set`` values as YAML scalars (0.995 -> float, 25 -> int, true -> bool)."""
    import yaml

    return yaml.safe_load(text)


def table(results: dict[str, dict[str, Any]]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = (
        "| model | params | NDCG@10 | HR@10 | MRR@10 | train samples/s | "
        "NDCG vs SASRec | NDCG vs Markov | speed vs SASRec | training |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, r in results.items():
        t, q = r["test"], r["ratios"]
        lines.append(
            f"| {LABELS.get(name, name)} | {r['params']:,} | {t['ndcg@10']:.4f} | "
            f"{t['hr@10']:.4f} | {t['mrr@10']:.4f} | {f(r.get('train_samples_per_s'), ',.0f')} "
            f"| {f(q['ndcg@10_vs_sasrec'], '.2f')} | {f(q['ndcg@10_vs_markov'], '.2f')} "
            f"| {f(q['samples_per_s_vs_sasrec'], '.2f')} | {stopped(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="sasrec,gru4rec,markov,popularity")
    ap.add_argument("--input", default=None, help="MovieLens-style TSV (default ml-100k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=50, help="peers' MAX_ITEM_LIST_LENGTH")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--stopping-step", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument(
        "--max-train-s",
        default="1800",
        help="wall-clock budget of each peer's fit in s (0: none), or per model: "
        "sasrec=3000,gru4rec=900",
    )
    ap.add_argument(
        "--baseline-max-len",
        type=int,
        default=None,
        help="fit Markov/popularity on each user's last N transitions (default: all)",
    )
    ap.add_argument("--rerun", action="store_true", help="ignore cached peer results")
    ap.add_argument(
        "--reuse",
        default=None,
        help="take the RecBole peers' results from this earlier JSON (same split required)",
    )
    ap.add_argument("--teacher-seeds", default="", help="e.g. 7,8,9: one teacher per seed")
    ap.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        help="teacher override key=value (TrainSpec / TeacherConfig field), repeatable",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file ('' for none)")
    args = ap.parse_args(argv)

    # On a shared 2-core machine OpenMP threads that spin at barriers stall each other: a
    # SASRec step took 3-4 s with 2 spinning threads vs 0.85 s passive (0.7 s with 1).
    # Every model here (peers in their subprocess too) runs with the same policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    budgets = {
        k.strip().lower(): float(v)
        for k, _, v in (
            part.rpartition("=") for part in str(args.max_train_s).split(",") if part.strip()
        )
    }
    cache = cache_dir()
    path = Path(args.input) if args.input else movielens_100k(cache)
    split = load_split(path)
    ctx = RunContext(
        cache=cache,
        threads=args.threads,
        max_len=args.max_len,
        epochs=args.epochs,
        stopping_step=args.stopping_step,
        batch_size=args.batch_size,
        dropout=args.dropout,
        max_train_s=float(budgets.pop("", 1800)),
        budgets=budgets,
        baseline_max_len=args.baseline_max_len,
        rerun=args.rerun,
        teacher_seeds=tuple(int(x) for x in args.teacher_seeds.split(",") if x.strip()),
        teacher_set={k: yaml_value(v) for k, _, v in (a.partition("=") for a in args.teacher_set)},
    )
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
    log(
        f"split of {path}: {len(split.users)} users ({int(split.evaluable.sum())} evaluated), "
        f"{split.n_items - 1} items, {split.train_interactions()} training targets "
        f"(fingerprint {split.fingerprint})"
    )
    peers = {"sasrec", "gru4rec"}
    reused = (
        reused_results(Path(args.reuse), [n for n in names if n in peers], split)
        if args.reuse
        else {}
    )
    results = {name: reused.get(name) or MODELS[name](split, ctx) for name in names}
    report = {
        "protocol": {
            "data": split.source,
            "split": "per user: last = test, one before = validation, rest = training",
            "order": "time, ties by line order",
            "min_events": 3,
            "ranking": "full catalogue",
            "mask_history": False,
            "rank_rule": "items scoring >= the target, minus one (ties against the target)",
            "selection": "validation NDCG@10 only (early stopping); test reported",
            "users": len(split.users),
            "evaluated_users": int(split.evaluable.sum()),
            "items": split.n_items - 1,
            "train_targets": split.train_interactions(),
            "split_fingerprint": split.fingerprint,
            "threads": args.threads,
        },
        "settings": vars(args),
        "models": with_ratios(results),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(table(results))
        masks = {n: r.get("mask_history") for n, r in results.items() if "mask_history" in r}
        print(f"\npast items masked: no (peers' evaluators checked: {masks})")
        if args.out:
            print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
