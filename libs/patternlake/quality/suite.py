"""The event expectation suite: Great Expectations for the record, Spark for the row split.

The suite lives in ``conf/expectations/events.json`` in Great Expectations' own format.
Each expectation carries ``meta.reason``, the reason code a failing row gets. The same
suite is used twice per batch:

* ``row_reasons`` compiles every expectation into a Spark column predicate, so one pass
  over the batch tags each row with all its reason codes (what splits silver/quarantine);
* ``run_gx`` validates the batch with Great Expectations on Spark and returns its result
  (kept as JSON, rendered as HTML).

The validate job checks that both agree: GX's unexpected count of every expectation must
equal the number of rows tagged with its reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from patternlake.config import ValidateConfig, default_conf_dir
from patternlake.errors import ConfigError

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


def row_reasons(suite: EventSuite) -> Column:
    """array<string> of the reason codes of every quarantine rule the row breaks."""
    tags = [F.when(violation(e), F.lit(e.reason)) for e in suite.quarantine_rules]
    return F.array_compact(F.array(*tags)) if tags else F.array().cast("array<string>")


def run_gx(df: DataFrame, suite: EventSuite, batch_id: str) -> dict[str, Any]:
    """Validate ``df`` with Great Expectations (ephemeral context, Spark data source)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
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
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an ISO-8601 time") from None
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
