"""The shared student, its int8 form and the served fleet, on generated data or MovieLens-100k.

    .venv/bin/python bench/compress.py --data generated   # conf's `generate` defaults
    .venv/bin/python bench/compress.py --data ml-100k     # from the RecBole wheel (bench/peers.py)

In a work folder (default ~/.cache/patternlake/bench-compress/<data>) it builds the lake
once (ingest -> validate -> featurize -> segment -> mine), trains the teacher once
(``--backend``, single process by default), then runs ``distill``, ``compress`` and ``heads`` with
conf's settings (``--set students.x=...`` to change them) and prints:

* the ``patternlake models`` table (validation numbers on the gate users, with the 90%
  bounds the gates decided on);
* test NDCG@10 of teacher / shared student / int8 / served fleet / Markov (``evaluate``);
* the served fleet against the teacher on the test targets: the ratio with paired-bootstrap
  90% bounds, overall and per segment, the bytes each segment and the whole fleet serve
  against the fp32 and an int8 teacher, top-10 users/s of teacher and fleet in one run;
* the totals against the targets of docs/students.md.

Results go to bench/results/compress-<data>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patternlake.config import load_config  # noqa: E402
from patternlake.lake import Lake  # noqa: E402
from patternlake.spark import get_spark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def work_config(work: Path, overrides: list[str] = ()):
    """conf with the lake, model store and MLflow of a bench work folder."""
    return load_config(
        "local",
        [
            f"lake.root={work}/lake",
            f"models.root={work}/models",
            f"mlflow.tracking_uri=sqlite:///{work}/mlruns.db",
            f"mlflow.artifact_location={work}/artifacts",
            "spark.ui=false",
            "spark.shuffle_partitions=4",
            *overrides,
        ],
    )


def build_lake(spark, lake, config, data: str, work: Path) -> None:
    from patternlake.pipeline import run_pipeline

    if lake.exists("segment_patterns"):
        return
    if data == "generated":
        from patternlake.synthetic.generate import generate

        generate(config.generate, work / "data")
        options = {"input": str(work / "data" / "events")}
    else:
        from peers import cache_dir, movielens_100k

        path = movielens_100k(cache_dir())
        options = {
            "input": str(path),
            "format": "tsv",
            "mapping": {
                "user_id": "user_id:token",
                "item_id": "item_id:token",
                "event_time": "timestamp:float",
            },
        }
    run_pipeline("daily", lake, config, options)


def has_teacher(config) -> bool:
    from patternlake import registry

    try:
        registry.load_teacher(config)
        return True
    except Exception:
        return False


def fleet_test(lake, config, resamples: int = 2000) -> dict:
    """The served fleet against the teacher on every user's *test* target: per-user NDCG@10
    of both (each user scored by their segment's champion, the teacher where none), the
    ratio with its paired-bootstrap 90% bounds overall and per segment; bytes of what each
    segment serves and of the whole fleet (a shared file once) against the fp32 and an
    int8 teacher; top-10 users/s of the teacher and of the fleet's models, same run."""
    from patternlake import registry
    from patternlake.models import ranking
    from patternlake.models.student import Student, from_bytes, quantized_bytes
    from patternlake.models.teacher import TeacherScorer, teacher_bytes
    from patternlake.scoring.score import champion_payload
    from patternlake.sequence_reader import evaluation_arrays, read_table
    from patternlake.students import gates

    teacher, tags = registry.load_teacher(config)
    t_bytes = len(teacher_bytes(teacher))
    shell = Student(teacher.config, teacher.config.n_items, None)
    int8_teacher = None
    if hasattr(teacher, "item_emb"):  # one network (an ensemble has no single-file int8 form)
        shell.net.load_state_dict(teacher.state_dict())
        int8_teacher = len(quantized_bytes(shell))
    table = read_table(lake.files("user_sequences", int(tags["data.version"])))
    users, items, types, gaps, target = evaluation_arrays(table, teacher.config.max_len, "test")
    x = np.stack([items, types, gaps], axis=1)
    seg_of = dict(lake.read("segments").select("user_id", "segment_id").toPandas().values)
    groups = np.array([seg_of.get(u, -1) for u in users])
    segments = sorted({int(g) for g in groups} - {-1})
    # what score serves: each segment's champion, every file once (a head's shared file too)
    payload, _ = champion_payload(config, segments)
    files, bases = payload["files"], payload["bases"]
    served = {g: v for g, (_, v) in payload["students"].items()}
    names = {g: f"{n} v{v}" for g, (n, v) in payload["students"].items()}
    models = {
        v: from_bytes(files[v], config.compress.runtime, base=files.get(bases.get(v, "")))
        for v in sorted(set(served.values()))
    }
    t_ndcg = gates.per_user_ndcg(gates.ranks_and_top10(TeacherScorer(teacher), x, target)[0])
    f_ndcg = t_ndcg.copy()
    for v, m in models.items():
        mine = np.isin(groups, [g for g, sv in served.items() if sv == v])
        f_ndcg[mine] = gates.per_user_ndcg(gates.ranks_and_top10(m, x[mine], target[mine])[0])
    out = {
        "users": int(len(users)),
        "teacher_bytes": t_bytes,
        "int8_teacher_bytes": int8_teacher,
        "fleet_bytes": sum(len(b) for b in files.values())
        + (t_bytes if len(served) < len(segments) else 0),
        "overall": gates.paired_bootstrap(f_ndcg, t_ndcg, resamples).as_dict(),
        "segments": {},
    }
    base_ndcg = {}  # a head's segment: its shared student on the same test users
    for v, b in bases.items():
        base = from_bytes(files[b], config.compress.runtime)
        mine = np.isin(groups, [g for g, sv in served.items() if sv == v])
        base_ndcg[v] = (
            mine,
            gates.per_user_ndcg(gates.ranks_and_top10(base, x[mine], target[mine])[0]),
        )
    for g in segments:
        mine = groups == g
        # what the segment needs to score: its file, and a head's shared file too
        nbytes = t_bytes
        if g in served:
            nbytes = len(files[served[g]]) + len(files.get(bases.get(served[g], ""), b""))
        out["segments"][g] = {
            "served_by": names.get(g, "teacher"),
            "bytes": nbytes,
            "bytes_vs_teacher": round(nbytes / t_bytes, 4),
            **gates.paired_bootstrap(f_ndcg[mine], t_ndcg[mine], resamples).as_dict(),
        }
        if g in served and served[g] in base_ndcg:  # head / its shared student, test users
            rows, shared = base_ndcg[served[g]]
            own = groups[rows] == g
            out["segments"][g]["head_vs_shared"] = gates.paired_bootstrap(
                f_ndcg[mine], shared[own], resamples
            ).as_dict()

    def users_per_s(model) -> float:
        r = ranking.ranker_for(model)
        xt = torch.from_numpy(x)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(xt), 1024):
                    ranking.top_k(r, r.encode(xt[s : s + 1024]), 10)
            best = min(best, time.perf_counter() - t)
        return round(len(xt) / best, 1)

    out["users_per_s"] = {"teacher": users_per_s(TeacherScorer(teacher))}
    for v, m in models.items():
        out["users_per_s"][f"{'student-head' if v in bases else 'student'} v{v}"] = users_per_s(m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", choices=["generated", "ml-100k"], default="generated")
    ap.add_argument("--work", default=None)
    ap.add_argument("--backend", default="single", help="teacher training backend")
    ap.add_argument("--retrain", action="store_true", help="train the teacher again")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = Path(args.work or Path.home() / ".cache" / "patternlake" / "bench-compress" / args.data)
    work.mkdir(parents=True, exist_ok=True)
    config = work_config(work, args.overrides)
    spark = get_spark(config.spark)
    lake = Lake(spark, config.lake)
    report: dict = {
        "data": args.data,
        "work": str(work),
        "overrides": args.overrides,
        "seconds": {},
    }

    def step(name, fn):
        t = time.perf_counter()
        result = fn()
        report["seconds"][name] = round(time.perf_counter() - t, 1)
        print(f"[bench] {name}: {report['seconds'][name]}s", flush=True)
        return result

    step("lake", lambda: build_lake(spark, lake, config, args.data, work))
    if args.retrain or not has_teacher(config):
        from patternlake.training.train import train_teacher

        step("teacher", lambda: train_teacher(spark, lake, config, args.backend))
    from patternlake.evaluation.evaluate import evaluate_models
    from patternlake.students.compress import compress
    from patternlake.students.distill import distill
    from patternlake.students.heads import heads
    from patternlake.students.models_report import COLUMNS, model_report

    report["distill"] = step("distill", lambda: distill(spark, lake, config))
    report["compress"] = step("compress", lambda: compress(spark, lake, config))
    report["heads"] = step("heads", lambda: heads(spark, lake, config))
    rows = model_report(lake, config)
    report["models"] = rows
    ev = step("evaluate", lambda: evaluate_models(spark, lake, config))
    report["evaluate"] = {k: v for k, v in ev.items() if k != "models"} | {
        "models": {
            n: {
                "params": m["params"],
                "bytes": m["bytes"],
                "overall": m["overall"],
                "segments": m["segments"],
            }
            for n, m in ev["models"].items()
        }
    }
    test = report["test"] = step("fleet on test", lambda: fleet_test(lake, config))

    print("\nvalidation, gate users (segment -1: every user, the pooled gate):")
    print(" ".join(f"{t:>{w}s}" for _, t, w, _ in COLUMNS))
    for r in rows:
        print(
            " ".join(f"{'-' if r[k] is None else format(r[k], f):>{w}s}" for k, _, w, f in COLUMNS)
        )
    m = ev["models"]
    print("\ntest NDCG@10 (full ranking; evaluate), per segment:")
    names = [n for n in ("teacher", "student", "student_int8", "fleet", "markov") if n in m]
    print(f"{'segment':>8s} " + " ".join(f"{n:>12s}" for n in names))
    for g in sorted(m["teacher"]["segments"], key=int):
        print(f"{g:>8} " + " ".join(f"{m[n]['segments'][g]['ndcg@10']:12.4f}" for n in names))
    print(f"{'all':>8s} " + " ".join(f"{m[n]['overall']['ndcg@10']:12.4f}" for n in names))
    o = test["overall"]
    print(
        f"\nserved fleet / teacher, test NDCG@10, {test['users']} users: {o['ratio']:.3f} "
        f"(90% bounds {o['lower']:.3f}-{o['upper']:.3f}); per segment:"
    )
    for g, r in test["segments"].items():
        print(
            f"  segment {g}: {r['served_by']:>16s} {r['ratio']:.3f} ({r['lower']:.3f}-"
            f"{r['upper']:.3f}), {r['users']} users, {r['bytes']:,} bytes "
            f"({r['bytes_vs_teacher']:.3f} of the teacher)"
        )
        if "head_vs_shared" in r:
            h = r["head_vs_shared"]
            print(
                f"    head / its shared student: {h['ratio']:.3f} ({h['lower']:.3f}-"
                f"{h['upper']:.3f})"
            )
    print(
        f"bytes: fp32 teacher {test['teacher_bytes']:,}, int8 teacher "
        f"{test['int8_teacher_bytes'] or 0:,}, fleet {test['fleet_bytes']:,} "
        f"({test['fleet_bytes'] / test['teacher_bytes']:.3f} of the fp32 teacher)"
    )
    print(f"top-10 users/s: {test['users_per_s']}")
    fleet_speed = [v for k, v in test["users_per_s"].items() if k != "teacher"]
    shared = report["compress"]["shared"]
    targets = {
        "served fleet / teacher test NDCG@10 >= 0.90 (aim 0.95)": o["ratio"],
        "  its 90% bounds": [o["lower"], o["upper"]],
        "bytes per segment / fp32 teacher <= 0.10": max(
            (r["bytes_vs_teacher"] for r in test["segments"].values()), default=None
        ),
        "fleet bytes / fp32 teacher <= 0.15": round(test["fleet_bytes"] / test["teacher_bytes"], 4),
        "int8 mean top-10 overlap with fp32 >= 0.95": shared["tried"][-1]["top10_overlap"],
        "lowest segment test ratio (served) >= 0.80": min(
            (r["ratio"] for r in test["segments"].values()), default=None
        ),
        "fleet users/s / teacher >= 5": (
            round(min(fleet_speed) / test["users_per_s"]["teacher"], 2) if fleet_speed else None
        ),
        "champions": ev.get("champions"),
    }
    report["targets"] = targets
    print("\ntargets:")
    for k, v in targets.items():
        print(f"  {k}: {v}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"compress-{args.data}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
