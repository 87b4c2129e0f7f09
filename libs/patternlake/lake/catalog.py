"""The catalog of table contracts: every lake table's schema and the stage that writes it.

One entry per name of ``lake.tables`` (conf says where a table lives and how it is laid out;
this module says what it holds). Stages build their frames from these schemas
(``contract("runs").ddl()``) and `Lake` checks every write and merge to a catalogued table
against its contract, so a schema is written down once, here.

The rules of the check (``Contract.mismatches``; `Lake` raises ``SchemaMismatchError`` and
writes nothing):

* columns are matched by name, case-insensitively (as Delta matches them);
* a column of the data that the contract does not name is refused (a family such as
  ``share_* double`` admits every column with that prefix, of that type);
* a contract column absent from the data is refused when it is ``NOT NULL``; a nullable
  one is written as null (Delta's rule; a table created by the write gets it too);
* types must be equal, nullability aside: no widening (an ``int`` is not a ``bigint``,
  a ``timestamp_ntz`` not a ``timestamp``); cast in the stage;
* ``NOT NULL`` is checked on the rows: the write fails before its commit when such a column
  holds a null (Spark's nullable flags say how a column was computed, not what it holds:
  ``createDataFrame`` marks every column nullable, ``lit`` none, so they are not compared).

Types are written as Spark prints them (``DataType.simpleString()``: ``bigint``, ``int``,
``array<struct<a:int>>``), so that they compare as text, without a Spark session.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pyspark.sql.types import ArrayType, DataType, MapType, StructType

from patternlake.errors import ConfigError

CATALOG = "patternlake.lake.catalog"


@dataclass(frozen=True)
class Column:
    name: str  # for a family: the prefix (``share_``)
    type: str  # Spark SQL type as ``simpleString()`` prints it
    nullable: bool = True

    def __str__(self) -> str:
        return self.type if self.nullable else f"{self.type} NOT NULL"


@dataclass(frozen=True)
class Contract:
    table: str
    producers: tuple[str, ...]  # Stage names (pipeline.STAGES) or CLI commands
    columns: tuple[Column, ...]
    families: tuple[Column, ...] = ()  # ``share_* double``: any number of such columns
    doc: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.table} has no column {name!r} in {CATALOG}")

    def ddl(self, *names: str) -> str:
        """``"a string, b bigint"`` for ``createDataFrame``, ``mapInPandas`` or a cast: every
        column in order, or ``names`` in that order. Nullable throughout: `Lake` checks
        ``NOT NULL`` on the rows, with a message naming the table and the column."""
        cols = [self.column(n) for n in names] if names else self.columns
        return ", ".join(f"{c.name} {c.type}" for c in cols)

    def mismatches(self, schema: StructType) -> list[str]:
        """What keeps data of ``schema`` from this table (empty: it fits), one line each,
        naming the column, the expected type and the actual one."""
        ours = {c.name.lower(): c for c in self.columns}
        given = {f.name.lower(): f for f in schema.fields}
        problems = []
        for f in schema.fields:
            actual = type_text(f.dataType)
            want = ours.get(f.name.lower()) or next(
                (g for g in self.families if f.name.lower().startswith(g.name.lower())), None
            )
            if want is None:
                problems.append(f"column {f.name} ({actual}) is not in the contract")
            elif actual != want.type:
                problems.append(f"column {f.name}: expected {want.type}, got {actual}")
        for c in self.columns:
            if not c.nullable and c.name.lower() not in given:
                problems.append(f"column {c.name} ({c}) is missing")
        return problems


def type_text(t: DataType) -> str:
    """A type as the catalog writes it: ``simpleString()`` without nullability, struct field
    names in lower case (Delta's names compare case-insensitively)."""
    if isinstance(t, ArrayType):
        return f"array<{type_text(t.elementType)}>"
    if isinstance(t, MapType):
        return f"map<{type_text(t.keyType)},{type_text(t.valueType)}>"
    if isinstance(t, StructType):
        return (
            "struct<"
            + ",".join(f"{f.name.lower()}:{type_text(f.dataType)}" for f in t.fields)
            + ">"
        )
    return t.simpleString()


def _columns(spec: str) -> list[Column]:
    """``"a string NOT NULL, b array<struct<x:int,y:int>>"`` -> columns (commas inside
    ``<>`` or ``()`` belong to the type)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"<": 1, "(": 1, ">": -1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    out = []
    for part in parts:
        words = part.split()
        nullable = [w.upper() for w in words[-2:]] != ["NOT", "NULL"]
        if not nullable:
            words = words[:-2]
        if len(words) < 2:
            raise ValueError(f"{CATALOG}: {part.strip()!r} is not 'name type [NOT NULL]'")
        out.append(Column(words[0], "".join(words[1:]).lower(), nullable))
    return out


def _contract(table: str, producers: str | tuple[str, ...], schema: str, doc: str) -> Contract:
    cols = _columns(schema)
    fixed = tuple(c for c in cols if not c.name.endswith("*"))
    families = tuple(Column(c.name[:-1], c.type, c.nullable) for c in cols if c.name.endswith("*"))
    names = [c.name.lower() for c in fixed]
    if len(set(names)) != len(names):
        raise ValueError(f"{CATALOG}: {table} names a column twice")
    producers = (producers,) if isinstance(producers, str) else producers
    return Contract(table, producers, fixed, families, doc)


def _catalog(contracts: Iterable[Contract]) -> dict[str, Contract]:
    return {c.table: c for c in contracts}


CONTRACTS: dict[str, Contract] = _catalog(
    [
        _contract(
            "bronze_events",
            "ingest",
            "user_id string, item_id string, event_time string, event_type string, "
            "event_id string, properties map<string,string>, _raw string, _source_file string, "
            "_line_ordinal bigint, _source_fingerprint string, _batch_id string NOT NULL, "
            "_ingested_at timestamp NOT NULL, _source_format string NOT NULL",
            "raw rows as received (strings), other source columns in properties, the raw text "
            "of unparsable rows in _raw; one batch per ingest",
        ),
        _contract(
            "ingest_log",
            "ingest",
            "batch_id string NOT NULL, source_file string NOT NULL, fingerprint string NOT NULL, "
            "bytes bigint, rows bigint, format string, ingested_at timestamp NOT NULL",
            "one row per ingested file (sha256 fingerprint: a file is ingested once)",
        ),
        _contract(
            "silver_events",
            "validate",
            "event_id string NOT NULL, user_id string NOT NULL, item_id string NOT NULL, "
            "event_type string NOT NULL, event_time timestamp NOT NULL, "
            "properties map<string,string>, _batch_id string NOT NULL, _source_file string, "
            "_line_ordinal bigint, _ingested_at timestamp",
            "typed, valid, deduplicated events (one row per event_id)",
        ),
        _contract(
            "quarantine_events",
            "validate",
            "event_id string, user_id string, item_id string, event_type string, "
            "event_time_raw string, event_time timestamp, properties map<string,string>, "
            "_raw string, reasons array<string> NOT NULL, _batch_id string NOT NULL, "
            "_source_file string, _ingested_at timestamp, _validated_at timestamp NOT NULL",
            "every rejected row with all its reason codes",
        ),
        _contract(
            "validation_results",
            "validate",
            "batch_id string NOT NULL, status string NOT NULL, bronze_rows bigint, "
            "silver_rows bigint, quarantined_rows bigint, duplicate_rows bigint, "
            "invalid_share double, reason_counts map<string,bigint>, gx_success boolean, "
            "report_path string, gx_result string, validated_at timestamp NOT NULL",
            "one row per validation of a batch (Great Expectations' result as JSON)",
        ),
        _contract(
            "featurize_log",
            "featurize",
            "batch_id string NOT NULL, featurized_at timestamp NOT NULL, mode string NOT NULL, "
            "silver_version bigint",
            "the silver batches featurized so far",
        ),
        _contract(
            "item_index",
            "featurize",
            "item_id string NOT NULL, item_idx int NOT NULL, first_seen timestamp, first_batch int",
            "stable integer ids of items (0 is padding)",
        ),
        _contract(
            "user_sequences",
            "featurize",
            "user_id string NOT NULL, n_events int NOT NULL, item_seq array<int> NOT NULL, "
            "type_seq array<int> NOT NULL, gap_seq array<int> NOT NULL, "
            "time_seq array<bigint> NOT NULL, valid_item int, test_item int, "
            "last_event_time timestamp",
            "each user's last features.max_history events and the evaluation split",
        ),
        _contract(
            "teacher_topk",
            ("distill", "heads"),
            "user_id string NOT NULL, n_events int NOT NULL, item_seq array<int> NOT NULL, "
            "type_seq array<int> NOT NULL, gap_seq array<int> NOT NULL, "
            "time_seq array<bigint> NOT NULL, valid_item int, test_item int, "
            "last_event_time timestamp, topk_items array<int> NOT NULL, "
            "topk_logits array<float> NOT NULL, teacher_version string NOT NULL, "
            "data_version bigint NOT NULL, k int NOT NULL, stride int NOT NULL",
            "user_sequences of the version a teacher was trained on, with the teacher's k best "
            "items and logits at every training target (what the shared student distils from)",
        ),
        _contract(
            "user_features",
            "featurize",
            "user_id string NOT NULL, n_events int NOT NULL, n_items int, "
            "first_event_time timestamp, last_event_time timestamp, active_days int, "
            "n_sessions int, mean_gap_hours double, share_* double, diversity double, "
            "events_per_session double, category_counts map<string,bigint>, "
            "top_categories array<string>",
            "per-user activity features; share_<type>: one per validate.allowed_event_types",
        ),
        _contract(
            "item_stats",
            "item_stats",
            "item_id string NOT NULL, item_idx int NOT NULL, events bigint NOT NULL, "
            "users bigint NOT NULL, share_* double, first_seen timestamp, last_seen timestamp, "
            "silver_version bigint NOT NULL, computed_at timestamp NOT NULL",
            "per-item popularity for BI: events, distinct users, share_<type> (one per "
            "validate.allowed_event_types), first and last event; overwritten each run",
        ),
        _contract(
            "segments",
            "segment",
            "user_id string NOT NULL, segment_id int NOT NULL, is_cold_start boolean, "
            "distance double, model_version int NOT NULL, assigned_at timestamp NOT NULL",
            "each user's segment (0: cold start) under segment model model_version",
        ),
        _contract(
            "segment_models",
            "segment",
            "model_version int NOT NULL, segment_id int NOT NULL, centroid array<double>, "
            "feature_names array<string>, n_users bigint, created_at timestamp",
            "the KMeans centroids of every segment model version",
        ),
        _contract(
            "segment_patterns",
            "mine",
            "segment_id int NOT NULL, kind string NOT NULL, antecedent array<string>, "
            "consequent string, antecedent_idx array<int>, consequent_idx int, support double, "
            "support_count bigint, confidence double, lift double, n_sessions bigint, "
            "segment_model_version int, mined_at timestamp",
            "sequential (PrefixSpan) and co-occurrence (FPGrowth) rules per segment",
        ),
        _contract(
            "user_patterns",
            "score",
            "user_id string NOT NULL, segment_id int NOT NULL, rank int NOT NULL, "
            "item_id string NOT NULL, item_idx int NOT NULL, score double, fallback boolean, "
            "pattern struct<kind:string,antecedent:array<string>,consequent:string,"
            "support:double,confidence:double,lift:double>, "
            "explanation array<struct<item_id:string,item_idx:int,events_ago:int,weight:double>>, "
            "model_name string, model_version string, data_version bigint, "
            "run_id string NOT NULL, scored_at timestamp NOT NULL",
            "each user's top score.top_k items, the rule behind each and the events that "
            "explain it; one partition per run_id (segment_id -1: no segment)",
        ),
        _contract(
            "drift",
            "monitor",
            "monitor_id string NOT NULL, checked_at timestamp NOT NULL, basis string, "
            "check string NOT NULL, statistic string, value double, threshold double, "
            "noise_floor double, p_value double, n_ref bigint, n_cur bigint, "
            "status string NOT NULL, action string",
            "one row per drift check of a monitor run",
        ),
        _contract(
            "forget_log",
            "forget-user",
            "forget_id string NOT NULL, user_hash string NOT NULL, "
            "requested_at timestamp NOT NULL, rows_removed map<string,bigint>, "
            "files_rewritten bigint, models_marked array<string>",
            "one row per forgotten id: its salted hash only, rows removed per table",
        ),
        _contract(
            "teacher_tuning",
            "tune_teacher",
            "study string NOT NULL, study_started timestamp, data_version bigint, "
            "item_index_version bigint, trial int NOT NULL, state string NOT NULL, worker int, "
            "valid_ndcg_at_10 double, params bigint, d_model int, n_heads int, n_layers int, "
            "dropout double, max_len int, lr double, batch_size int, epochs_run int, "
            "best_epoch int, pruned_at_epoch int, valid_ndcg_by_epoch array<double>, "
            "started timestamp, finished timestamp, pareto boolean, chosen boolean, "
            "max_params bigint",
            "one row per trial of a `tune teacher` study",
        ),
        _contract(
            "model_decisions",
            ("distill", "compress", "heads"),
            "decided_at timestamp NOT NULL, stage string NOT NULL, segment_id int NOT NULL, "
            "model string, variant string, registered_version string, params bigint, "
            "bytes bigint, valid_users bigint, reference string, reference_ndcg_at_10 double, "
            "model_ndcg_at_10 double, ratio double, threshold double, "
            "promoted boolean NOT NULL, champion string NOT NULL, reason string, details string, "
            "ratio_lower_90 double, ratio_upper_90 double",
            "every promotion decision of the students' and compression gates, with its numbers",
        ),
        _contract(
            "model_report",
            "models",
            "reported_at timestamp NOT NULL, segment_id int NOT NULL, valid_users bigint, "
            "teacher_params bigint, student_params bigint, fp32_bytes bigint, int8_bytes bigint, "
            "sparsity double, teacher_ndcg_at_10 double, student_ndcg_at_10 double, "
            "int8_ndcg_at_10 double, student_retention_pct double, int8_retention_pct double, "
            "teacher_ms_per_1000 double, student_ms_per_1000 double, int8_ms_per_1000 double, "
            "champion string NOT NULL, student_ratio_lower_90 double, "
            "student_ratio_upper_90 double, head_bytes bigint, head_ratio double, "
            "head_ratio_lower_90 double",
            "`patternlake models`: one row per segment and report",
        ),
        _contract(
            "runs",
            "run",
            "run_id string NOT NULL, pipeline string NOT NULL, position int NOT NULL, "
            "step string NOT NULL, status string NOT NULL, started_at timestamp, "
            "finished_at timestamp, seconds double, error string, resumed_from string",
            "every pipeline run and step (`run --resume` starts from these)",
        ),
    ]
)


def contract(table: str) -> Contract:
    """The contract of ``table``; a name the catalog lacks is a ConfigError."""
    try:
        return CONTRACTS[table]
    except KeyError:
        known = ", ".join(sorted(CONTRACTS))
        raise ConfigError(
            f"table {table!r} has no contract in {CATALOG} (known: {known})"
        ) from None
