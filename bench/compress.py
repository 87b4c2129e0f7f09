"""Students and compression, per segment, on generated data or MovieLens-100k.

    .venv/bin/python bench/compress.py --data generated   # conf's `generate` defaults
    .venv/bin/python bench/compress.py --data ml-100k     # from the RecBole wheel (bench/peers.py)

In a work folder (default ~/.cache/patternlake/bench-compress/<data>) it builds the lake
once (ingest -> validate -> featurize -> segment -> mine), trains the teacher once
(``--backend``, single process by default), then runs ``distill`` and ``compress`` with
conf's settings (``--set students.x=...`` to change them) and prints:

* the ``patternlake models`` table (validation numbers, as the gates saw them);
* test NDCG@10 of teacher / students / int8 students (``evaluate``: full ranking);
* int8 runtime candidates on the same users in one run: fp32 teacher, fp32 students, int8
  students dequantized to fp32 kernels, int8 students on PyTorch's dynamic int8 kernels
  (ms per 1,000 users and the share of users whose top-10 equals the fp32 student's);
* the totals against docs/design.md's targets (student <= 1/10 teacher params with >= 95% of its
  NDCG@10; int8 >= 4x smaller than the fp32 student with >= 99% of its NDCG@10).

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


def runtimes(lake, config) -> dict:
    """fp32 teacher vs students (fp32, int8 dequant, int8 dynamic) on every user's test input."""
    from patternlake import registry
    from patternlake.models.student import from_bytes
    from patternlake.models.teacher import TeacherScorer
    from patternlake.sequence_reader import evaluation_arrays, read_table
    from patternlake.students.segment_training import ms_per_1000_users

    teacher, tags = registry.load_teacher(config)
    table = read_table(lake.files("user_sequences", int(tags["data.version"])))
    users, items, types, gaps, _ = evaluation_arrays(table, teacher.config.max_len, "test")
    x = torch.from_numpy(np.stack([items, types, gaps], axis=1))
    seg_of = {r.user_id: r.segment_id for r in lake.read("segments").collect()}
    groups = np.array([seg_of.get(u, -1) for u in users])
    out = {"users": int(len(users)), "segments": {}}

    totals = {"teacher": 0.0, "student": 0.0, "int8_dequant": 0.0, "int8_dynamic": 0.0}
    agree = {"int8_dequant": [], "int8_dynamic": []}
    for g in sorted(set(groups.tolist())):
        xs = x[torch.from_numpy(np.nonzero(groups == g)[0])]
        fp32_v = registry.student_versions(
            config, variant="fp32", segment=g, teacher_version=tags["version"]
        )
        int8_v = registry.student_versions(
            config, variant="int8", segment=g, teacher_version=tags["version"]
        )
        if not fp32_v or not int8_v:
            continue
        fp32 = from_bytes(registry.version_file(config, "student", fp32_v[0].version).read_bytes())
        blob = registry.version_file(config, "student", int8_v[0].version).read_bytes()
        models = {
            "teacher": TeacherScorer(teacher),
            "student": fp32,
            "int8_dequant": from_bytes(blob, "dequant"),
            "int8_dynamic": from_bytes(blob, "dynamic"),
        }
        row = {"users": int(len(xs))}
        with torch.no_grad():
            ref = fp32(xs).topk(10).indices.sort().values
        for name, m in models.items():
            ms = ms_per_1000_users(m, xs, batch=1024)
            row[f"{name}_ms_per_1000"] = round(ms, 2)
            totals[name] += ms * len(xs) / 1000
            if name.startswith("int8"):
                with torch.no_grad():
                    same = (m(xs).topk(10).indices.sort().values == ref).all(1).float().numpy()
                row[f"{name}_same_top10"] = round(float(same.mean()), 4)
                agree[name].append(same)
        out["segments"][int(g)] = row
    out["total_ms"] = {k: round(v, 1) for k, v in totals.items()}
    out["users_per_s"] = {
        k: round(len(users) / (v / 1000), 0) if v else None for k, v in totals.items()
    }
    out["same_top10"] = {
        k: round(float(np.concatenate(v).mean()), 4) if v else None for k, v in agree.items()
    }
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
    from patternlake.students.models_report import COLUMNS, model_report

    report["distill"] = step("distill", lambda: distill(spark, lake, config))
    report["compress"] = step("compress", lambda: compress(spark, lake, config))
    for part in ("distill", "compress"):
        for r in report[part]["segments"].values():
            r.pop("model", None)
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
    report["runtimes"] = step("runtimes", lambda: runtimes(lake, config))

    print("\nvalidation (as the gates saw it), per segment:")
    print(" ".join(f"{t:>{w}s}" for _, t, w, _ in COLUMNS))
    for r in rows:
        print(
            " ".join(f"{'-' if r[k] is None else format(r[k], f):>{w}s}" for k, _, w, f in COLUMNS)
        )
    m = ev["models"]
    print("\ntest NDCG@10 (full ranking), per segment:")
    print(
        f"{'segment':>8s} {'teacher':>8s} {'student':>8s} {'int8':>8s} {'stud/teach':>10s} {'int8/stud':>9s} {'markov':>8s}"
    )
    for g in sorted(m["teacher"]["segments"], key=int):
        t_, s_, i_ = (
            m[n]["segments"][g]["ndcg@10"] if n in m else float("nan")
            for n in ("teacher", "student", "student_int8")
        )
        print(
            f"{g:>8} {t_:8.4f} {s_:8.4f} {i_:8.4f} {s_ / max(t_, 1e-9):10.3f} {i_ / max(s_, 1e-9):9.3f} "
            f"{m['markov']['segments'][g]['ndcg@10']:8.4f}"
        )
    t_, s_, i_ = (m[n]["overall"]["ndcg@10"] for n in ("teacher", "student", "student_int8"))
    print(
        f"{'all':>8s} {t_:8.4f} {s_:8.4f} {i_:8.4f} {s_ / t_:10.3f} {i_ / s_:9.3f} "
        f"{m['markov']['overall']['ndcg@10']:8.4f}"
    )
    rt = report["runtimes"]
    print(
        f"\nscoring {rt['users']} users (ms in all, users/s, top-10 equal to the fp32 student's):"
    )
    for k in ("teacher", "student", "int8_dequant", "int8_dynamic"):
        print(
            f"  {k:14s} {rt['total_ms'][k]:9.1f} ms {rt['users_per_s'][k] or 0:>10,.0f} users/s "
            f"{rt['same_top10'].get(k) if k in rt['same_top10'] else '':>8}"
        )
    seg_rows = [r for r in rows if r["student_params"]]
    worst_size = max(r["student_params"] / r["teacher_params"] for r in seg_rows)
    worst_ret = min(
        r["student_ndcg_at_10"] / r["teacher_ndcg_at_10"]
        for r in seg_rows
        if r["teacher_ndcg_at_10"]
    )
    shrink = min(r["fp32_bytes"] / r["int8_bytes"] for r in seg_rows if r["int8_bytes"])
    int8_ret = min((r["int8_retention_pct"] or 0) / 100 for r in seg_rows)
    targets = {
        "student params / teacher (max over segments) <= 0.10": round(worst_size, 4),
        "student / teacher validation NDCG@10 (min over segments) >= 0.95": round(worst_ret, 4),
        "student / teacher test NDCG@10 (all users) >= 0.95": round(s_ / t_, 4),
        "fp32 / int8 bytes (min over segments) >= 4": round(shrink, 2),
        "int8 / fp32 student validation NDCG@10 (min over segments) >= 0.99": round(int8_ret, 4),
        "int8 / fp32 student test NDCG@10 (all users) >= 0.99": round(i_ / s_, 4),
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
