"""The platform's CLI stages at catalogue scale: the same users and events over a small and a
large catalogue, side by side in one run.

    .venv/bin/python bench/scale_pipeline.py [--items 20000,1000000] [--users 200000]
        [--events 10000000] [--epochs 1] [--out bench/results/scale_pipeline.json]

(also ``bench/scale.py --pipeline ...``). Per catalogue size, in a fresh lake under a
temporary folder: ``patternlake generate`` (not timed as a stage), then the commands a user
runs -- ``run daily --input`` (ingest, validate, featurize, segment, mine; score is skipped
before a teacher exists), ``train`` (the teacher, ``--epochs`` epochs at most), ``distill``,
``compress`` and ``heads`` (``--epochs`` each: the rest of ``run train`` but its evaluation),
``evaluate --json`` and ``score`` -- each its own process on local Spark (``local[2]``).

Printed per stage and catalogue: wall time; peak RSS of the driver's Python process, of the
Spark JVM and of the largest other Python process (a Spark Python worker, or a training
process); the stage's rate: training targets/s (``samples_per_s`` of the teacher's run,
over every process), evaluation users/s (evaluated users over the command's wall time) and
scoring users/s (users scored, explanations and rules included, over the command's wall
time); the items the teacher ranks (those with events: Zipf popularity leaves much of a
large catalogue without any unless ``--zipf`` flattens it). Then each ratio large / small.
A stage that fails is recorded with its exit code and last error line; after a failed
``run daily`` or ``train`` the catalogue's later stages are not run (after a failed
``distill``, ``compress`` or ``heads``, ``score`` serves what the registry says).
``--skip distill,compress,heads`` leaves the students out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class PeakRss:
    """Samples the process tree of ``pid`` every 0.2 s: the peak RSS of the root (the
    driver's Python), of any Java process (the Spark JVM) and of the largest other Python
    process."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = {"driver_mb": 0.0, "jvm_mb": 0.0, "worker_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    mb = p.memory_info().rss / 2**20
                    exe = " ".join(p.cmdline()[:1]) or p.name()
                except psutil.Error:
                    continue
                if p.pid == self.root.pid:
                    key = "driver_mb"
                elif "java" in os.path.basename(exe):
                    key = "jvm_mb"
                elif "python" in os.path.basename(exe):
                    key = "worker_mb"
                else:
                    continue  # a shell between them
                self.peak[key] = max(self.peak[key], mb)
            self._stop.wait(0.2)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def cli(work: Path, *args: str) -> list[str]:
    sets = {
        "lake.root": work / "lake",
        "models.root": work / "models",
        "mlflow.tracking_uri": f"sqlite:///{work}/mlruns.db",
        "mlflow.artifact_location": work / "mlartifacts",
    }
    return [
        PY,
        "-m",
        "patternlake.cli",
        *(x for k, v in sets.items() for x in ("--set", f"{k}={v}")),
        *args,
    ]


def run_stage(cmd: list[str], log: Path) -> dict:
    started = time.monotonic()
    env = os.environ | {"PYTHONPATH": str(ROOT / "libs")}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env
        )
        rss = PeakRss(proc.pid)
        out, _ = proc.communicate()
    peak = rss.stop()
    wall = time.monotonic() - started
    result = {"rc": proc.returncode, "wall_s": round(wall, 1), **peak}
    parsed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if parsed:
        result["json"] = parsed[-1]
    if proc.returncode != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        causes = [x for x in lines if "Error" in x and not x.lstrip().startswith("at ")]
        result["error"] = (causes or lines or ["(no output)"])[-1][:300]
    return result


def one_catalogue(
    work: Path,
    items: int,
    users: int,
    events: int,
    epochs: int,
    skip: set[str],
    zipf: float | None = None,
) -> dict:
    data = work / "data"
    popularity = ["--set", f"generate.zipf_exponent={zipf}"] if zipf else []
    gen = run_stage(
        [PY, "-m", "patternlake.cli", *popularity, "generate", "--out", str(data),
         "--users", str(users), "--items", str(items), "--events", str(events),
         "--format", "parquet"],
        work / "generate.log",
    )  # fmt: skip
    stages = {"generate": gen}
    if gen["rc"] != 0:
        return stages
    caps = [
        "--set", f"train.epochs={epochs}",
        "--set", f"students.epochs={epochs}",
        "--set", f"heads.epochs={epochs}",
    ]  # fmt: skip
    plan = [
        ("run daily", cli(work, *caps, "run", "daily", "--input", str(data / "events"))),
        ("train", cli(work, *caps, "train")),
        ("distill", cli(work, *caps, "distill")),
        ("compress", cli(work, *caps, "compress")),
        ("heads", cli(work, *caps, "heads")),
        ("evaluate", cli(work, *caps, "evaluate", "--json")),
        ("score", cli(work, *caps, "score")),
    ]
    for name, cmd in plan:
        if name in skip:
            continue
        print(f"  {items:,} items: {name} ...", flush=True)
        r = run_stage(cmd, work / f"{name.replace(' ', '_')}.log")
        stages[name] = r
        if name == "train" and r["rc"] == 0:
            r |= trained_catalogue(r.get("json") or {})
        if r["rc"] != 0:
            print(f"    failed (rc {r['rc']}): {r.get('error')}", flush=True)
            if name in ("run daily", "train"):  # the stages after need their output
                break
    _rates(stages, users)
    return stages


def trained_catalogue(train: dict) -> dict:
    """The teacher's item count and loss, read from its best checkpoint: the model's catalogue
    is the items that have events, which at few events per item is well below the generated
    catalogue (Zipf popularity leaves the tail unseen)."""
    path = train.get("best_path")
    if not path or not Path(path).exists():
        return {}
    from patternlake.models.backends import load_best

    config = load_best(train).config
    return {"model_items": config.n_items, "sampled_softmax": config.sampled_softmax}


def _rates(stages: dict, users: int) -> None:
    train = stages.get("train", {}).get("json") or {}
    if "samples_per_s" in train:
        stages["train"]["rate"] = train["samples_per_s"]
        stages["train"]["unit"] = "targets/s"
    ev = stages.get("evaluate", {}).get("json") or {}
    if ev.get("protocol"):
        n = ev["protocol"]["users"]
        stages["evaluate"]["rate"] = round(n / stages["evaluate"]["wall_s"], 1)
        stages["evaluate"]["unit"] = "users/s"
        stages["evaluate"]["users"] = n
        stages["evaluate"]["teacher_ndcg@10"] = (
            ev["models"].get("teacher", {}).get("overall", {}).get("ndcg@10")
        )
    if stages.get("score", {}).get("rc") == 0:
        stages["score"]["rate"] = round(users / stages["score"]["wall_s"], 1)
        stages["score"]["unit"] = "users/s"


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    names = ["run daily", "train", "distill", "compress", "heads", "evaluate", "score"]
    lines = [
        f"{'stage':10s} {'items':>10s} {'wall s':>8s} {'rate':>18s} {'driver MB':>10s} "
        f"{'JVM MB':>8s} {'worker MB':>10s}  status"
    ]
    for name in names:
        for n in sizes:
            r = results[n].get(name)
            if r is None:
                lines.append(f"{name:10s} {n:>10,d} {'-':>8s} {'not run':>18s}")
                continue
            rate = f"{r['rate']:,.1f} {r['unit']}" if "rate" in r else "-"
            status = "ok" if r["rc"] == 0 else f"rc {r['rc']}: {r.get('error', '')[:80]}"
            lines.append(
                f"{name:10s} {n:>10,d} {r['wall_s']:8.1f} {rate:>18s} {r['driver_mb']:10.0f} "
                f"{r['jvm_mb']:8.0f} {r['worker_mb']:10.0f}  {status}"
            )
    for n in sizes:
        train = results[n].get("train") or {}
        if "model_items" in train:
            loss = "sampled softmax" if train.get("sampled_softmax") else "full softmax"
            lines.append(
                f"catalogue {n:,}: the teacher ranks {train['model_items']:,} items (those "
                f"with events), {loss}"
            )
    if len(sizes) == 2:
        small, large = (results[n] for n in sizes)
        lines.append(f"\nratios {sizes[1]:,} / {sizes[0]:,} items:")
        for name in names:
            a, b = small.get(name), large.get(name)
            if a and b and a["rc"] == 0 and b["rc"] == 0:
                parts = [f"wall {b['wall_s'] / a['wall_s']:.2f}x"]
                if "rate" in a and a["rate"]:
                    parts.append(f"rate {b['rate'] / a['rate']:.2f}x")
                parts.append(
                    f"largest RSS {max(b['driver_mb'], b['jvm_mb'], b['worker_mb']) / 1024:.2f} GB"
                )
                lines.append(f"  {name:10s} " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--items", default="20000,1000000")
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--keep", action="store_true", help="keep the lakes (printed)")
    p.add_argument("--skip", default="", help="stages not to run, e.g. distill,compress")
    p.add_argument(
        "--zipf",
        type=float,
        default=None,
        help="items' popularity exponent (generate.zipf_exponent; conf's 1.1 leaves most of a "
        "1M catalogue without events at 500k events: 0.5 with 4M events reaches ~940k items)",
    )
    args = p.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    sizes = [int(x) for x in args.items.split(",")]
    print(
        f"CLI stages, local[2]: {args.users:,} users, {args.events:,} events, catalogues "
        f"{', '.join(f'{n:,}' for n in sizes)} items, {args.epochs} epoch(s) of training"
        + (f", Zipf exponent {args.zipf}" if args.zipf else ""),
        flush=True,
    )
    results = {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
        results[n] = one_catalogue(work, n, args.users, args.events, args.epochs, skip, args.zipf)
        if args.keep:
            print(f"  lake: {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print()
    print(table(results))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "results": results}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
