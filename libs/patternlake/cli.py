"""The ``patternlake`` command line.

    patternlake [--conf ENV|FILE] [--set KEY=VALUE ...] COMMAND [...]

A user error (bad path, bad config, missing table) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from patternlake.config import Config, load_config, validate_config
from patternlake.errors import PatternlakeError

log = logging.getLogger("patternlake")

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with our exit code and one-line errors; its subcommands merge the global
    options given after them with those given before (``_Subcommands``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER_ERROR, f"patternlake: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="patternlake", description="Personalized pattern discovery on the lakehouse."
    )
    _add_global_options(parser, defaults=True)
    # the same options are accepted after the command too (jobs/*.py pass them that way)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(group: Any, name: str, help: str) -> argparse.ArgumentParser:
        return group.add_parser(name, help=help, description=help, parents=[common])

    _add_generate(sub, command)
    _add_stages(sub, command)
    _add_tools(sub, command)
    _add_run_and_export(sub, command)
    _add_lake(sub, command)
    return parser


def _add_generate(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    g = command(sub, "generate", "write synthetic events with planted patterns and ground truth")
    g.add_argument(
        "--out", required=True, help="output folder (events/ and truth/ are written inside)"
    )
    for name, typ, text in (
        ("users", int, "number of users"),
        ("items", int, "catalogue size"),
        ("events", int, "number of distinct events"),
        ("segments", int, "latent user segments"),
        ("rules-per-segment", int, "planted chains per segment"),
        ("rule-length", int, "items per planted chain"),
        ("rule-strength", float, "chance a started chain is completed"),
        ("rule-noise", float, "chance a chain item is replaced by noise"),
        ("chain-rate", float, "share of picks that start a chain"),
        ("files", int, "number of time-ordered output files"),
        ("seed", int, "random seed"),
        ("start", str, "first possible event time (ISO-8601)"),
        ("days", int, "days covered by the events"),
    ):
        g.add_argument(
            f"--{name}",
            type=typ,
            default=None,
            help=f"{text} (default: generate.{name.replace('-', '_')} in conf)",
        )
    g.add_argument("--format", choices=["csv", "jsonl", "parquet"], default=None)
    g.set_defaults(func=cmd_generate, needs_spark=False)


def _add_tools(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Commands over the lake that are not pipeline stages: models, sql, report, monitor,
    forget-user."""
    mo = command(
        sub,
        "models",
        "per segment: params, bytes fp32/int8, NDCG@10 teacher/student/int8, retention, ms per "
        "1,000 users, champion (also written to the lake table model_report)",
    )
    mo.add_argument("--json", action="store_true", help="print JSON rows")
    mo.set_defaults(func=cmd_models, needs_spark=True)

    sq = command(
        sub,
        "sql",
        "run Spark SQL over views of every lake table (named as in lake.tables)",
    )
    sq.add_argument(
        "query", help='e.g. "SELECT segment_id, count(*) FROM user_patterns GROUP BY 1"'
    )
    sq.add_argument("--limit", type=int, default=50, help="rows printed (default 50)")
    sq.add_argument("--json", action="store_true", help="print JSON rows")
    sq.set_defaults(func=cmd_sql, needs_spark=True)

    rp = command(
        sub,
        "report",
        "one static HTML file with plots: data quality, segments and patterns, teacher curve, "
        "students and compression, scoring, drift",
    )
    rp.add_argument("--out", default=None, help="HTML file (default: <lake.root>/ops/report.html)")
    rp.set_defaults(func=cmd_report, needs_spark=True)

    mn = command(
        sub,
        "monitor",
        "drift of recent batches from the champions' training data (event-type mix, items, "
        "user features, recent NDCG@10) -> ops/drift",
    )
    mn.add_argument(
        "--auto-retrain", action="store_true", help="on an alarm, run the train pipeline"
    )
    mn.add_argument("--json", action="store_true", help="print one JSON object")
    mn.set_defaults(func=cmd_monitor, needs_spark=True)

    fg = command(
        sub,
        "forget-user",
        "remove every row of these users from every lake table, vacuum the old files and log "
        "history, log only salted hashes (ops/forget_log), mark the models for retraining",
    )
    fg.add_argument("user_ids", nargs="+", metavar="ID", help="user ids, as in user_id")
    fg.add_argument("--json", action="store_true", help="print one JSON object")
    fg.set_defaults(func=cmd_forget_user, needs_spark=True)


def _add_run_and_export(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    r = command(
        sub,
        "run",
        "run a pipeline from pipelines/ (daily: ingest -> validate -> featurize -> segment -> mine)",
    )
    r.add_argument("pipeline", help="pipeline name, e.g. daily")
    r.add_argument("--input", default=None, help="raw events to ingest first (file or folder)")
    r.add_argument("--format", choices=["auto", "csv", "tsv", "jsonl", "parquet"], default=None)
    r.add_argument("--map", dest="mapping", default=None, metavar="FIELD=COLUMN,...")
    r.add_argument("--full", action="store_true", help="featurize from scratch")
    r.add_argument("--json", action="store_true", help="print every step's result as JSON")
    r.add_argument(
        "--resume",
        action="store_true",
        help="start at the step where the last run of this pipeline failed (ops/runs)",
    )
    r.add_argument(
        "--strict",
        action="store_true",
        help="a step that would be skipped (score without a registered teacher, ingest "
        "without --input) fails the run instead (exit 2): for schedules that must score "
        "every day",
    )
    r.set_defaults(func=cmd_run, needs_spark=True)

    ex = command(
        sub,
        "export",
        "print a pipeline as spark-submit commands or as a Databricks Asset Bundle job",
    )
    ex.add_argument("target", choices=["spark-submit", "databricks"])
    ex.add_argument("pipeline", help="pipeline name, e.g. daily")
    ex.add_argument(
        "--env", default=None, help="--conf of the exported jobs (default: cluster / databricks)"
    )
    ex.add_argument("--master", default="spark://127.0.0.1:7077", help="spark-submit master")
    ex.set_defaults(func=cmd_export, needs_spark=False)


def _add_lake(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    c = command(sub, "config", "print the resolved configuration as JSON")
    c.set_defaults(func=cmd_config, needs_spark=False)

    lk = command(sub, "lake", "inspect and maintain lake tables")
    lsub = lk.add_subparsers(dest="lake_command", metavar="ACTION", parser_class=_Parser)
    lsub.required = True
    t = command(lsub, "tables", "list tables with version, files and rows")
    t.set_defaults(func=cmd_lake_tables, needs_spark=True)
    h = command(lsub, "history", "commits of one table, newest first")
    h.add_argument("table")
    h.add_argument("--limit", type=int, default=20)
    h.set_defaults(func=cmd_lake_history, needs_spark=True)
    v = command(lsub, "vacuum", "delete files older versions no longer need")
    v.add_argument("table")
    v.add_argument("--retention-hours", type=int, default=None)
    v.add_argument("--dry-run", action="store_true")
    v.set_defaults(func=cmd_lake_vacuum, needs_spark=True)
    o = command(lsub, "compact", "rewrite small files into large ones")
    o.add_argument("table")
    o.add_argument("--target-mb", type=int, default=None)
    o.set_defaults(func=cmd_lake_compact, needs_spark=True)


# CLI groups above stages with more than one word (``tune_teacher``: ``tune teacher``)
GROUPS = {
    "tune": ("search model architectures and hyperparameters (Optuna)", "MODEL"),
    "item": ("per-item tables for BI", "TABLE"),
}


def _add_stages(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """One subcommand per declared stage (``pipeline.STAGES``), in their order."""
    from patternlake.pipeline import STAGES

    groups: dict[str, Any] = {}
    for stage in STAGES.values():
        *group, word = stage.command
        parent = sub
        if group:
            (name,) = group
            if name not in groups:
                text, metavar = GROUPS[name]
                groups[name] = command(sub, name, text).add_subparsers(
                    dest=f"{name}_command", metavar=metavar, parser_class=_Parser, required=True
                )
            parent = groups[name]
        p = command(parent, word, stage.help)
        p.epilog = (
            f"reads {', '.join(stage.inputs) or 'raw files'}; writes "
            f"{', '.join(stage.outputs) or 'no table'}; conf section: {stage.section} "
            f"(--set {stage.section}.KEY=VALUE); job: jobs/{stage.job}.py; pipeline step: "
            f"{stage.name}"
        )
        for option in stage.options:
            option.add_to(p)
        p.set_defaults(func=cmd_stage, stage=stage.name, needs_spark=True)


class _Subcommands(argparse._SubParsersAction):
    """A subcommand's parser fills a fresh namespace that argparse then copies over its
    parent's, so ``--set`` after the command would replace every ``--set`` before it. Here the
    global options merge wherever they stand, at any depth (``lake --set .. tables --set ..``):
    every ``--set`` applies in the order given (a later one wins per key), the last ``--conf``
    wins, ``-v`` anywhere counts."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        before = {k: getattr(namespace, k, None) for k in ("overrides", "conf", "verbose")}
        namespace.overrides, namespace.conf, namespace.verbose = [], None, False
        super().__call__(parser, namespace, values, option_string)
        namespace.overrides = [*(before["overrides"] or []), *(namespace.overrides or [])]
        namespace.conf = namespace.conf if namespace.conf is not None else before["conf"]
        namespace.verbose = bool(namespace.verbose or before["verbose"])


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--conf",
        default=default(None),
        help="environment (local, cluster, databricks) or a YAML file; default local",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=default([]),
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set spark.shuffle_partitions=8 (repeatable)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="debug logging"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.conf, args.overrides)
        _setup_logging("DEBUG" if args.verbose else config.logging.level)
        func: Callable[..., Any] = args.func
        if args.needs_spark:
            from patternlake.lake import Lake
            from patternlake.spark import get_spark

            spark = get_spark(config.spark)
            func(args, config, Lake(spark, config.lake))
        else:
            func(args, config)
    except PatternlakeError as exc:
        print(f"patternlake: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("patternlake: interrupted", file=sys.stderr)
        return 130
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger().setLevel(level)
    # third-party INFO notices a user cannot act on (matplotlib.category: "Using categorical
    # units to plot a list of strings that are all parsable as floats or dates"); their
    # warnings and errors stay. Spark's own log levels: patternlake.spark.LOG4J.
    for noisy in ("py4j", "urllib3", "great_expectations", "mlflow", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow sets its loggers' level again when it is imported (later, lazily), from this
    # variable ("Creating initial MLflow database tables..."); a user's own setting wins
    if level != "DEBUG":
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Horovod and py4j log chatty INFO lines through the root logger; keep their warnings."""
    if record.levelno >= logging.WARNING:
        return True
    return not any(part in record.pathname for part in ("/horovod/", "/py4j/"))


# ---- commands ----------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, config: Config) -> None:
    from patternlake.synthetic.generate import generate

    params = config.generate.model_dump()
    for key in params:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value
    config = validate_config(
        {**config.model_dump(by_alias=True), "generate": params}
    )  # flags checked like conf
    meta = generate(config.generate, args.out)
    print(json.dumps({k: meta[k] for k in ("rows", "unique_events", "duplicates", "rules")}))


def cmd_stage(args: argparse.Namespace, config: Config, lake: Any) -> None:
    """Any declared stage: its options from the command line, then the runner's path (input
    check, timing log), then its result printed as the stage declares."""
    from patternlake.pipeline import STAGES, run_stage

    stage = STAGES[args.stage]
    options = {o.key: o.value(getattr(args, o.key)) for o in stage.options}
    SHOW[stage.show](run_stage(stage.name, lake, config, options), options)


def _show_json(result: Any, options: dict[str, Any]) -> None:
    from patternlake.pipeline import _plain

    print(json.dumps(_plain(result), default=str))


def _show_json_lines(result: list[Any], options: dict[str, Any]) -> None:
    for item in result:
        _show_json(item, options)


def _show_batch(result: Any, options: dict[str, Any]) -> None:
    skipped = len(result.skipped)
    if result.noop:
        print(json.dumps({"noop": True, "reason": "already ingested", "skipped_files": skipped}))
        return
    batch = {"batch_id": result.batch_id, "rows": result.rows, "files": len(result.files)}
    print(json.dumps(batch | {"skipped_files": skipped}))


def _show_evaluation(result: dict[str, Any], options: dict[str, Any]) -> None:
    from patternlake.models.metrics import METRICS

    if options.get("json"):
        print(json.dumps(result))
        return
    print(f"{'model':12s} {'params':>10s} {'bytes':>10s} " + " ".join(f"{m:>11s}" for m in METRICS))
    for name, m in result["models"].items():
        print(
            f"{name:12s} {m['params']:>10d} {m['bytes']:>10d} "
            + " ".join(f"{m['overall'][k]:>11.4f}" for k in METRICS)
        )
    print(
        f"({result['protocol']['users']} users, mask_history={result['protocol']['mask_history']}, "
        f"user_sequences@v{result['data_version']})"
    )


# how a stage's result is printed (``Stage.show``)
SHOW: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "json": _show_json,
    "json_lines": _show_json_lines,
    "batch": _show_batch,
    "evaluation": _show_evaluation,
}


def cmd_run(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from patternlake.ingest.ingest import parse_mapping
    from patternlake.pipeline import run_pipeline

    options = {
        "input": args.input,
        "format": args.format,
        "mapping": parse_mapping(args.mapping),
        "full": args.full,
    }
    result = run_pipeline(
        args.pipeline, lake, config, options, resume=args.resume, strict=args.strict
    )
    if args.json:
        print(json.dumps(result, default=str))
        return
    print(f"run {args.pipeline} {result['run_id']} (steps recorded in ops/runs):")
    for step, seconds in result["seconds"].items():
        print(f"  {step:14s} {seconds:7.1f}s  {_summary(result[step])}")
    skipped = result["skipped"]
    if not skipped:
        print(f"run {args.pipeline}: every step ran")
        return
    print(f"run {args.pipeline}: {len(skipped)} step(s) skipped (--strict makes a skip fail):")
    for step, reason in skipped.items():
        print(f"  {step}: skipped, {reason}")


def _summary(value: Any, limit: int = 4) -> str:
    """A short line for a step's result: its first few scalar fields."""
    if value is None:
        return "skipped"
    if isinstance(value, list):
        return f"{len(value)} item(s)" + (f"; last: {_summary(value[-1], 3)}" if value else "")
    if not isinstance(value, dict):
        return str(value)[:80]
    scalars = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in value.items()
        if isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= 40)
    ]
    return ", ".join(scalars[:limit]) or f"{len(value)} fields"


def cmd_export(args: argparse.Namespace, config: Config) -> None:
    from patternlake.export import export_databricks, export_spark_submit

    if args.target == "spark-submit":
        print(export_spark_submit(args.pipeline, args.env or "cluster", args.master), end="")
    else:
        print(export_databricks(args.pipeline, args.env or "databricks"), end="")


def cmd_report(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from patternlake.reporting.report import build_report

    result = build_report(lake, config, args.out)
    print(f"report: {result['path']} ({result['plots']} plots, {result['bytes'] / 1024:.0f} KB)")


def cmd_monitor(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from patternlake.monitoring.monitor import monitor
    from patternlake.pipeline import run_pipeline

    retrain = (lambda: run_pipeline("train", lake, config, {})) if args.auto_retrain else None
    result = monitor(lake.spark, lake, config, retrain)
    if args.json:
        print(json.dumps(result, default=str))
        return
    print(f"monitor: {result['status']} ({result['basis']})")
    print(
        f"  {'check':20s} {'stat':>8s} {'value':>9s} {'band':>7s} {'floor':>7s} {'n ref':>9s} {'n cur':>9s}  status"
    )
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for c in result["checks"]:
        print(
            f"  {c['check']:20s} {c['statistic']:>8s} {fmt(c['value']):>9s} {fmt(c['threshold']):>7s} "
            f"{fmt(c['noise_floor']):>7s} {c['n_ref']:>9,} {c['n_cur']:>9,}  {c['status']}"
        )
    if result["action"]:
        print(f"  action: {result['action']}")


def cmd_forget_user(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from patternlake.privacy.forget import forget_users

    result = forget_users(lake.spark, lake, config, args.user_ids)
    if args.json:
        print(json.dumps(result, default=str))
        return
    removed = result["rows_removed"]
    print(
        f"forgot {result['users']} user(s): {sum(removed.values()):,} rows removed from "
        f"{sum(1 for n in removed.values() if n)} tables, {result['files_rewritten']} old "
        f"files deleted, log history expired (forget_id {result['forget_id']})"
    )
    for name, n in sorted(removed.items()):
        if n:
            print(f"  {name:20s} {n:>8,} rows")
    if result["text_files_redacted"]:
        print(f"  redacted in {len(result['text_files_redacted'])} report file(s)")
    if result["models_marked"]:
        print(
            f"  {len(result['models_marked'])} model versions trained before are tagged "
            "retrain_required: run `patternlake run train` to replace them"
        )


def cmd_sql(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from pyspark.errors import PySparkException

    lake.register_views()
    try:
        df = lake.spark.sql(args.query)
        rows = df.limit(args.limit).collect()
    except PySparkException as e:
        raise PatternlakeError(f"sql: {str(e).splitlines()[0]}") from None
    if args.json:
        for r in rows:
            print(json.dumps(r.asDict(recursive=True), default=str))
        return
    df.limit(args.limit).show(args.limit, truncate=60)


def cmd_models(args: argparse.Namespace, config: Config, lake: Any) -> None:
    from patternlake.students.models_report import COLUMNS, model_report

    rows = model_report(lake, config)
    if args.json:
        print(json.dumps(rows, default=str))
        return
    print(" ".join(f"{title:>{width}s}" for _, title, width, _ in COLUMNS))
    for r in rows:
        print(
            " ".join(
                f"{'-' if r[key] is None else format(r[key], fmt):>{width}s}"
                for key, _, width, fmt in COLUMNS
            )
        )


def cmd_config(args: argparse.Namespace, config: Config) -> None:
    print(json.dumps(config.model_dump(by_alias=True), indent=2))


def cmd_lake_tables(args: argparse.Namespace, config: Config, lake: Any) -> None:
    for name in sorted(config.lake.tables):
        if not lake.exists(name):
            print(f"{name:20s} (not written yet)  {lake.uri(name)}")
            continue
        files = lake.files(name)
        rows = lake.read(name).count()
        print(
            f"{name:20s} version={lake.version(name):<4d} files={len(files):<5d} rows={rows:<10d} {lake.uri(name)}"
        )


def cmd_lake_history(args: argparse.Namespace, config: Config, lake: Any) -> None:
    for entry in lake.history(args.table, args.limit):
        print(json.dumps(entry, default=str))


def cmd_lake_vacuum(args: argparse.Namespace, config: Config, lake: Any) -> None:
    removed = lake.vacuum(args.table, args.retention_hours, args.dry_run)
    print(json.dumps({"files": len(removed), "dry_run": args.dry_run}))


def cmd_lake_compact(args: argparse.Namespace, config: Config, lake: Any) -> None:
    print(json.dumps(lake.compact(args.table, args.target_mb), default=str))


if __name__ == "__main__":
    sys.exit(main())
