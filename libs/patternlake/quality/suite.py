"""The event expectation suite: Great Expectations for the record, Spark for the row split.

The suite lives in ``conf/expectations/events.json`` (``validate.suite``, relative to the conf
dir: the repository's top-level ``conf/``, carried in the wheel as ``patternlake/conf/``,
unless another is used) in Great Expectations' own format.
Each expectation carries ``meta.reason``, the reason code a failing row gets. The suite is
compiled into Spark columns so that one pass over a batch does all the work:

* ``with_violation_flags`` adds one boolean column per quarantine rule, each rule evaluated
  once per row; the three below read those columns, so it comes first;
* ``row_reasons`` tags each row with the reason codes of every expectation it breaks (what
  splits silver/quarantine), and ``reason_counts`` counts the rows per code;
* ``suite_metrics`` are the aggregates Great Expectations itself computes per expectation
  (rows in the domain, missing, unexpected), observed on that same pass;
* ``gx_record`` turns them into Great Expectations' own result objects
  (``ExpectationSuiteValidationResult``, with GX's success and percentage rules), kept as JSON
  and rendered as HTML.

``run_gx`` instead lets Great Expectations validate the batch on Spark itself (about one scan
per expectation); ``validate.gx: run`` uses it and checks that both agree, and the test suite
checks on the bad-input corpus that the record equals what GX computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import reduce
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from patternlake.config import ValidateConfig, default_conf_dir
from patternlake.errors import ConfigError
from patternlake.times import parse_utc

log = logging.getLogger(__name__)

DEDUPLICATE = "deduplicate"
SUPPORTED = {
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_null",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_between",
    "expect_column_value_lengths_to_be_between",
    "expect_column_values_to_match_regex",
    "expect_column_values_to_be_unique",
}


@dataclass(frozen=True)
class Expectation:
    type: str
    kwargs: dict[str, Any]  # parameters resolved
    raw: dict[str, Any]  # as in the suite file (with $PARAMETER references)
    reason: str
    action: str  # "quarantine" or "deduplicate"


@dataclass(frozen=True)
class EventSuite:
    name: str
    expectations: list[Expectation]
    parameters: dict[str, Any]
    source: dict[str, Any]

    @property
    def quarantine_rules(self) -> list[Expectation]:
        return [e for e in self.expectations if e.action != DEDUPLICATE]

    @property
    def reason_codes(self) -> list[str]:
        """The distinct reason codes a row can be quarantined with, sorted."""
        return sorted({e.reason for e in self.quarantine_rules})


def suite_parameters(conf: ValidateConfig, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    return {
        "min_event_time": _parse_time(conf.min_event_time, "validate.min_event_time"),
        "max_event_time": now + timedelta(minutes=conf.future_tolerance_minutes),
        "allowed_event_types": list(conf.allowed_event_types),
        "max_id_length": conf.max_id_length,
        "id_pattern": conf.id_pattern,
    }


def load_suite(
    conf: ValidateConfig, now: datetime | None = None, conf_dir: Path | None = None
) -> EventSuite:
    path = Path(conf.suite)
    if not path.is_absolute():
        path = (conf_dir or default_conf_dir()) / path
    try:
        source = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"validate.suite: {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"validate.suite: {path} is not valid JSON: {exc}") from None
    params = suite_parameters(conf, now)
    expectations = []
    for i, item in enumerate(source.get("expectations", [])):
        where = f"validate.suite {path.name} expectation {i}"
        etype = item.get("type")
        if etype not in SUPPORTED:
            raise ConfigError(
                f"{where}: type {etype!r} is not supported for row-level checks ({sorted(SUPPORTED)})"
            )
        meta = item.get("meta") or {}
        if not meta.get("reason"):
            raise ConfigError(f"{where}: meta.reason (the quarantine reason code) is required")
        kwargs = {k: _resolve(v, params, where) for k, v in item.get("kwargs", {}).items()}
        if "column" not in kwargs:
            raise ConfigError(f"{where}: kwargs.column is required")
        action = meta.get("action", "quarantine")
        if action not in ("quarantine", DEDUPLICATE):
            raise ConfigError(f"{where}: meta.action must be 'quarantine' or 'deduplicate'")
        if (etype == "expect_column_values_to_be_unique") != (action == DEDUPLICATE):
            raise ConfigError(
                f"{where}: uniqueness is enforced by deduplication (meta.action: deduplicate)"
            )
        expectations.append(Expectation(etype, kwargs, item, meta["reason"], action))
    return EventSuite(source.get("name", path.stem), expectations, params, source)


def violation(e: Expectation) -> Column:
    """True where a row breaks expectation ``e`` (GX semantics: nulls are ignored except by
    the null expectations, and ``row_condition`` limits the rows considered)."""
    k = e.kwargs
    c = F.col(f"`{k['column']}`")
    if e.type == "expect_column_values_to_not_be_null":
        bad = c.isNull()
    elif e.type == "expect_column_values_to_be_null":
        bad = c.isNotNull()
    elif e.type == "expect_column_values_to_be_in_set":
        bad = c.isNotNull() & ~c.isin(list(k["value_set"]))
    elif e.type == "expect_column_values_to_be_between":
        bad = F.lit(False)
        if k.get("min_value") is not None:
            bad = bad | (c < F.lit(k["min_value"]))
        if k.get("max_value") is not None:
            bad = bad | (c > F.lit(k["max_value"]))
        bad = c.isNotNull() & bad
    elif e.type == "expect_column_value_lengths_to_be_between":
        n = F.length(c)
        bad = F.lit(False)
        if k.get("min_value") is not None:
            bad = bad | (n < k["min_value"])
        if k.get("max_value") is not None:
            bad = bad | (n > k["max_value"])
        bad = c.isNotNull() & bad
    elif e.type == "expect_column_values_to_match_regex":
        bad = c.isNotNull() & ~c.rlike(k["regex"])
    else:  # uniqueness: handled by deduplication
        return F.lit(False)
    condition = k.get("row_condition")
    if isinstance(
        condition, dict
    ):  # GX 1.9+ form: {"type": "pass_through", "pass_through_filter": SQL}
        condition = condition.get("pass_through_filter")
    if condition:
        bad = bad & F.coalesce(F.expr(condition), F.lit(False))
    return F.coalesce(bad, F.lit(False))


def flag_name(i: int) -> str:
    """The column of ``with_violation_flags`` for expectation ``i`` (its position in the suite)."""
    return f"_v{i}"


def _flagged_rules(suite: EventSuite) -> list[tuple[str, Expectation]]:
    """(flag column, rule) for each quarantine rule, in the suite's order."""
    return [(flag_name(i), e) for i, e in enumerate(suite.expectations) if e.action != DEDUPLICATE]


def with_violation_flags(df: DataFrame, suite: EventSuite) -> DataFrame:
    """``df`` with one boolean column per quarantine rule (``flag_name``), true where the row
    breaks it. Each rule (regexes, string lengths) is evaluated once per row here;
    ``row_reasons``, ``reason_counts`` and ``suite_metrics`` read the flags instead of
    evaluating it again for the reasons, the reason counts and Great Expectations' counts."""
    return df.select("*", *[violation(e).alias(name) for name, e in _flagged_rules(suite)])


def _any_flag(names: list[str]) -> Column:
    return reduce(lambda a, b: a | b, [F.col(n) for n in names])


def row_reasons(suite: EventSuite) -> Column:
    """array<string> of the reason codes of every quarantine rule the row breaks (read from
    ``with_violation_flags``' columns). A valid row gets the empty array without building one
    to compact (``array_compact`` is a per-element lambda)."""
    rules = _flagged_rules(suite)
    if not rules:
        return F.array().cast("array<string>")
    tags = [F.when(F.col(name), F.lit(e.reason)) for name, e in rules]
    return F.when(
        _any_flag([name for name, _ in rules]), F.array_compact(F.array(*tags))
    ).otherwise(F.array().cast("array<string>"))


def reason_counts(suite: EventSuite) -> list[Column]:
    """Per reason code (``suite.reason_codes`` order), the rows breaking a rule with that
    code, as ``r{i}``, from ``with_violation_flags``' columns."""
    rules = _flagged_rules(suite)
    return [
        F.count_if(_any_flag([name for name, e in rules if e.reason == code])).alias(f"r{i}")
        for i, code in enumerate(suite.reason_codes)
    ]


DEDUPE_COUNT = "_gx_nonunique"  # rows whose event_id another row of the batch also has


def suite_metrics(suite: EventSuite) -> list[Column]:
    """Aggregates over a typed batch with ``with_violation_flags``' columns: per expectation
    ``i`` the rows of its domain (``row_condition``) ``e{i}_n``, those with a null value
    ``e{i}_missing`` and those breaking it ``e{i}_bad``, all in one pass. Uniqueness needs a
    shuffle: its count comes from the deduplication (``DEDUPE_COUNT``)."""
    out: list[Column] = []
    for i, e in enumerate(suite.expectations):
        domain = _domain(e)
        out += [
            F.count_if(domain).alias(f"e{i}_n"),
            F.count_if(domain & F.col(f"`{e.kwargs['column']}`").isNull()).alias(f"e{i}_missing"),
        ]
        if e.action != DEDUPLICATE:
            out.append(F.count_if(F.col(flag_name(i))).alias(f"e{i}_bad"))
    return out


def _domain(e: Expectation) -> Column:
    condition = e.kwargs.get("row_condition")
    if isinstance(condition, dict):
        condition = condition.get("pass_through_filter")
    return F.coalesce(F.expr(condition), F.lit(False)) if condition else F.lit(True)


NULL_CHECKS = {"expect_column_values_to_not_be_null", "expect_column_values_to_be_null"}


def _import_gx() -> Any:
    """The great_expectations module, imported with GX's usage analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def import_gx_in_background() -> threading.Thread:
    """Start importing Great Expectations in a thread and return it: the import takes about
    5 s of Python (GX's module tree, pydantic models, scipy), and validate's first Spark job
    runs meanwhile (the driver thread only waits on the JVM then). ``gx_record`` and
    ``run_gx`` import it as usual; Python's import lock makes them wait for this import if it
    has not finished."""

    def load() -> None:
        with contextlib.suppress(Exception):  # an import error shows where GX is used
            _import_gx()

    thread = threading.Thread(target=load, name="import great_expectations", daemon=True)
    thread.start()
    return thread


def gx_record(
    suite: EventSuite,
    metrics: dict[str, int],
    samples: dict[str, list[Any]],
    batch_id: str,
) -> dict[str, Any]:
    """Great Expectations' validation result for counts computed by ``suite_metrics`` (and,
    for uniqueness, ``metrics[DEDUPE_COUNT]`` with ``e{i}_n``/``e{i}_missing`` of the key
    column), built from GX's own result classes with GX's rules: success is
    ``(considered - unexpected) / considered >= mostly`` (considered: every row for the null
    checks, non-null rows otherwise), percentages as GX's BASIC result format gives them.
    ``samples[reason]`` is up to 20 unexpected values (``partial_unexpected_list``)."""
    gx = _import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    results = []
    for i, e in enumerate(suite.expectations):
        n = int(metrics[f"e{i}_n"])
        missing = int(metrics[f"e{i}_missing"])
        bad = int(metrics[DEDUPE_COUNT] if e.action == DEDUPLICATE else metrics[f"e{i}_bad"])
        mostly = float(e.kwargs.get("mostly", 1.0))
        considered = n if e.type in NULL_CHECKS else n - missing
        success = considered == 0 or (considered - bad) / considered >= mostly
        result: dict[str, Any] = {
            "element_count": n,
            "unexpected_count": bad,
            "unexpected_percent": (bad / considered * 100) if considered else None,
            "partial_unexpected_list": list(samples.get(e.reason, []))[:20],
        }
        if e.type not in NULL_CHECKS:
            result.update(
                missing_count=missing,
                missing_percent=missing / n * 100 if n else None,
                unexpected_percent_total=bad / n * 100 if n else None,
                unexpected_percent_nonmissing=(bad / considered * 100) if considered else None,
            )
        config = ExpectationConfiguration(
            type=e.type,
            kwargs={"batch_id": f"patternlake-{batch_id}", **e.raw["kwargs"]},
            meta=e.raw.get("meta", {}),
        )
        results.append(
            ExpectationValidationResult(
                success=success,
                expectation_config=config,
                result=result,
                exception_info={
                    "raised_exception": False,
                    "exception_traceback": None,
                    "exception_message": None,
                },
            )
        )
    ok = sum(r.success for r in results)
    record = ExpectationSuiteValidationResult(
        success=ok == len(results),
        results=results,
        suite_name=suite.name,
        suite_parameters={},
        statistics={
            "evaluated_expectations": len(results),
            "successful_expectations": ok,
            "unsuccessful_expectations": len(results) - ok,
            "success_percent": ok / len(results) * 100 if results else None,
        },
        meta={
            "great_expectations_version": gx.__version__,
            "batch_spec": {"batch_data": "SparkDataFrame"},
            "computed_by": "patternlake single pass (validate.gx: record)",
            "batch_id": batch_id,
        },
    )
    return json.loads(json.dumps(record.to_json_dict(), default=str))


def run_gx(df: DataFrame, suite: EventSuite, batch_id: str) -> dict[str, Any]:
    """Validate ``df`` with Great Expectations (ephemeral context, Spark data source)."""
    gx = _import_gx()
    from great_expectations.core.expectation_suite import ExpectationSuite

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    with contextlib.suppress(Exception):  # a GX without the setting: progress bars are cosmetic
        context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    source = context.data_sources.add_spark(name="patternlake")
    asset = source.add_dataframe_asset(name="events")
    batch_def = asset.add_batch_definition_whole_dataframe(batch_id)
    gx_suite = ExpectationSuite(
        name=suite.name,
        expectations=[
            {"type": e.type, "kwargs": e.raw["kwargs"], "meta": e.raw.get("meta", {})}
            for e in suite.expectations
        ],
    )
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(
        gx_suite, expectation_parameters=suite.parameters, result_format="BASIC"
    )
    return json.loads(json.dumps(result.to_json_dict(), default=str))


def _resolve(value: Any, params: dict[str, Any], where: str) -> Any:
    if isinstance(value, dict) and set(value) == {"$PARAMETER"}:
        name = value["$PARAMETER"]
        if name not in params:
            raise ConfigError(f"{where}: unknown $PARAMETER {name!r} (known: {sorted(params)})")
        return params[name]
    return value


def _parse_time(text: str, key: str) -> datetime:
    try:
        return parse_utc(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an ISO-8601 time") from None
