"""Typed configuration: YAML per environment, validated at start.

The YAML files live in the repository's top-level ``conf/``, which the build copies into the
wheel as ``patternlake/conf/`` (see ``packaged_dir``); ``$PATTERNLAKE_CONF_DIR`` or a
``./conf`` with a ``base.yaml`` replaces that folder.
Resolution order (later wins):

1. ``conf/base.yaml``                     shared by every environment
2. ``conf/<env>.yaml``                    ``local`` unless ``--conf`` names another env or a file
3. ``PATTERNLAKE__A__B=value``            environment variables (``__`` separates levels)
4. ``--set a.b=value``                    command-line overrides, repeatable

Values from 3 and 4 are parsed as YAML scalars (``4`` is an int, ``true`` a bool,
``[a, b]`` a list). Any unknown key or bad value fails at once with the key's path.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from patternlake.errors import ConfigError

ENV_PREFIX = "PATTERNLAKE__"
CONF_DIR_ENV = "PATTERNLAKE_CONF_DIR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TableSpec(_Strict):
    """Where a named table lives under the lake root, and how it is laid out."""

    path: str
    partition_by: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if not v or v.startswith("/") or ".." in Path(v).parts:
            raise ValueError("must be a relative path under lake.root, without '..'")
        return v.strip("/")


class LakeConfig(_Strict):
    root: str
    engine: Literal["auto", "delta-spark"]  # auto: delta-spark, the one engine
    vacuum_retention_hours: int = Field(ge=0)
    compact_target_mb: int = Field(gt=0)
    tables: dict[str, TableSpec]

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: object) -> object:
        if v == "spark-delta":  # the earlier spelling of the same engine
            return "delta-spark"
        if v == "delta-rs":
            raise ValueError(
                "the delta-rs writer was retired: the lake runs on delta-spark (use auto); "
                "delta-rs (deltalake) still reads the tables without Spark"
            )
        return v


class SparkConfig(_Strict):
    master: str | None  # None: leave it to spark-submit / the cluster
    app_name: str
    shuffle_partitions: int = Field(gt=0)
    ui: bool
    driver_memory: str | None
    conf: dict[str, str]


class GenerateConfig(_Strict):
    users: int = Field(gt=0)
    items: int = Field(gt=1)
    events: int = Field(gt=0)
    segments: int = Field(gt=0)
    rules_per_segment: int = Field(ge=0)
    rule_length: int = Field(ge=2, le=6)
    rule_strength: float = Field(ge=0, le=1)
    rule_noise: float = Field(ge=0, le=1)
    chain_rate: float = Field(ge=0, le=1)
    zipf_exponent: float = Field(gt=0)
    categories: int = Field(gt=0)
    start: str
    days: int = Field(gt=0)
    seed: int
    format: Literal["csv", "jsonl", "parquet"]
    files: int = Field(gt=0)


class IngestConfig(_Strict):
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"]
    header: Literal["auto", "true", "false"]
    sep: str | None  # None: "," for csv, tab for tsv
    mapping: dict[Literal["user_id", "item_id", "event_time", "event_type", "event_id"], str]
    default_event_type: str

    @field_validator("header", mode="before")
    @classmethod
    def _bool_text(cls, v: object) -> object:
        return str(v).lower() if isinstance(v, bool) else v


class ValidateConfig(_Strict):
    suite: str  # path relative to the conf dir
    allowed_event_types: list[str] = Field(min_length=1)
    min_event_time: str
    future_tolerance_minutes: int = Field(ge=0)
    max_id_length: int = Field(gt=0)
    id_pattern: str
    max_invalid_share: float = Field(ge=0, le=1)
    report_dir: str  # under lake.root
    gx: Literal["record", "run"]


class FeaturesConfig(_Strict):
    max_history: int = Field(ge=3)
    session_gap_minutes: int = Field(gt=0)
    category_property: str
    top_categories: int = Field(ge=0)


class SegmentConfig(_Strict):
    k: int = Field(ge=1)
    seed: int
    restarts: int = Field(ge=1)
    init_steps: int = Field(ge=1)
    min_events: int = Field(ge=1)
    max_iter: int = Field(gt=0)
    top_categories: int = Field(ge=0)


class MineConfig(_Strict):
    min_support: float = Field(gt=0, le=1)
    min_support_count: int = Field(ge=1)
    max_pattern_length: int = Field(ge=2)
    min_confidence: float = Field(ge=0, le=1)
    min_lift: float = Field(ge=0)
    min_extension_share: float = Field(ge=0, le=1)
    max_rules_per_segment: int = Field(gt=0)
    recent_events: int = Field(ge=2)
    cooccurrence: bool


class ModelsConfig(_Strict):
    root: str  # model store: checkpoints and saved models (local path or shared mount)


class MlflowConfig(_Strict):
    tracking_uri: str
    experiment: str
    artifact_location: str  # where a new experiment keeps its artifacts


class TeacherModelConfig(_Strict):
    max_len: int = Field(ge=2)
    d_model: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    softmax: Literal["auto", "full", "sampled"]
    sampled_softmax: int = Field(ge=0)  # negatives when sampled; 0: always full softmax
    seen_bias: bool  # learned score shift for items already in the window


class TrainConfig(_Strict):
    backend: Literal["horovod", "horovodrun", "ddp", "single"]
    num_proc: int = Field(gt=0)
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    lr_scaling: Literal["none", "sqrt", "linear"]
    schedule: Literal["cosine", "constant"]
    min_lr_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    patience: int = Field(gt=0)
    seed: int
    valid_users: int = Field(ge=0)
    softmax_memory_mb: int = Field(gt=0)  # teacher.softmax auto: full softmax up to this
    threads_per_proc: int = Field(gt=0)
    window_stride: int = Field(ge=0)  # 0: max_len
    ema_decay: float = Field(ge=0, lt=1)
    members: int = Field(ge=1)  # > 1: an ensemble of that many seeds
    use_tuned: bool  # true: model + lr + batch size from the latest `tune teacher`


class TuneSpaceConfig(_Strict):
    """The search space of `tune teacher`: lists are choices, pairs are [low, high] ranges."""

    d_model: list[int] = Field(min_length=1)
    n_heads: list[int] = Field(min_length=1)
    n_layers: tuple[int, int]
    dropout: tuple[float, float]
    max_len: list[int] = Field(min_length=1)
    lr: tuple[float, float]  # sampled log-uniformly
    batch_size: list[int] = Field(min_length=1)

    @field_validator("d_model", "n_heads", "max_len", "batch_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if min(v) < 1 or len(set(v)) != len(v):
            raise ValueError("choices must be distinct positive integers")
        return v

    @field_validator("n_layers", "dropout", "lr")
    @classmethod
    def _range(cls, v: tuple) -> tuple:
        if not 0 <= v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 <= low <= high")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TuneSpaceConfig:
        bad = [(d, h) for d in self.d_model for h in self.n_heads if d % h]
        if bad:
            raise ValueError(
                f"every n_heads choice must divide every d_model choice ({bad[0][1]} does not "
                f"divide {bad[0][0]})"
            )
        if self.n_layers[0] < 1 or self.lr[0] <= 0 or self.dropout[1] >= 1:
            raise ValueError("n_layers needs low >= 1, lr low > 0, dropout high < 1")
        return self


class TuneConfig(_Strict):
    n_trials: int = Field(gt=0)  # in all, shared by the parallel processes
    parallel: int = Field(gt=0)  # processes running trials against one Optuna storage
    epochs_per_trial: int = Field(gt=0)
    patience: int = Field(gt=0)
    prune_after: int = Field(gt=0)  # epochs before a trial may be pruned
    prune_startup_trials: int = Field(ge=1)  # finished trials needed before pruning starts
    seed: int
    max_params: int | None = Field(gt=0)  # the chosen trial's parameter budget
    space: TuneSpaceConfig


class StudentSearchConfig(_Strict):
    """`students.search`: Optuna over depth, item-table scheme, learning rate and alpha; the
    width follows from the byte budget; judged on the "tune" half only."""

    trials: int = Field(ge=0)  # 0: no search
    epochs: int = Field(gt=0)
    patience: int = Field(gt=0)
    n_layers: list[int] = Field(min_length=1)
    item_share: list[float] = Field(min_length=1)
    lr: tuple[float, float]
    alpha: tuple[float, float]

    @field_validator("item_share")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if not all(0 <= x < 1 for x in v):
            raise ValueError("each item_share must be in [0, 1)")
        return v


class StudentsConfig(_Strict):
    """`distill`: one shared student for every user, distilled from the teacher's stored
    top-K by the teacher's training function, gated on users its training never chose on."""

    max_bytes_ratio: float = Field(gt=0, le=1)  # served (int8) file <= this x the fp32 teacher's
    top_k: int = Field(gt=0)  # teacher items (and logits) stored per training target
    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, le=1)  # weight of the teacher's soft targets
    d_model: list[int] = Field(min_length=1)  # widths tried, the widest within the budget wins
    n_layers: int = Field(gt=0)
    item_share: float = Field(ge=0, lt=1)  # low-rank item table: rank = share x width (0: full)
    search: StudentSearchConfig
    n_heads: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    epochs: int = Field(gt=0)
    patience: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # per process, as train.batch_size
    lr: float = Field(gt=0)  # of one process, as train.lr
    seed: int
    gate: float = Field(gt=0, le=1)  # promoted if the ratio's 90% lower bound >= gate
    harm_floor: float = Field(gt=0, le=1)  # a segment falls back if its 90% upper bound < this
    resamples: int = Field(ge=100)  # paired bootstrap resamples of the gate users
    min_users: int = Field(ge=0)  # fewer gate users: not promoted


class HeadsConfig(_Strict):
    """`heads`: per segment, a head on the shared student, kept where it beats it."""

    item_bias: bool  # a learned score per item
    adapter_rank: int = Field(ge=0)  # low-rank residual adapter after the final norm (0: none)
    epochs: int = Field(gt=0)
    patience: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)  # windows per step
    valid_users: int = Field(gt=0)  # the segment's "tune" users early stopping reads, at most
    max_users: int = Field(gt=0)  # a segment's users a head trains on, at most (hash-drawn)
    gate: float = Field(gt=0)  # kept if the 90% lower bound of head / shared NDCG@10 >= this


class CompressConfig(_Strict):
    """`compress`: magnitude pruning, then int8, of the shared student."""

    sparsity: list[float] = Field(min_length=1)  # tried highest first; the first that passes
    min_overlap: float = Field(gt=0, le=1)  # int8: mean top-10 overlap with its fp32 model
    gate: float = Field(gt=0, le=1)  # int8: the ratio's 90% lower bound vs fp32 >= gate
    runtime: Literal["dequant", "dynamic"]  # how an int8 file runs (see students/model.py)

    @field_validator("sparsity")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if not all(0 <= x < 1 for x in v):
            raise ValueError("each sparsity must be in [0, 1)")
        return v


class ScoreConfig(_Strict):
    """`score`: user_patterns from each segment's champion."""

    top_k: int = Field(gt=0)
    exclude_seen: bool
    batch_size: int = Field(gt=0)  # users per Arrow batch
    min_history: int = Field(ge=1)  # fewer known events: segment popularity (fallback)
    explain_events: int = Field(ge=0)  # most recent events occlusion looks at (0: none)
    explain_top: int = Field(gt=0)  # events kept per recommended item
    pattern_window: int = Field(gt=0)  # recent events a rule's antecedent must occur in
    index: Literal["exact", "faiss"]  # faiss: approximate top-K (the ann extra)
    faiss_nlist: int = Field(ge=0)  # IVF lists (0: 4 sqrt(items))
    faiss_nprobe: int = Field(gt=0)  # lists searched per user


class EvaluateConfig(_Strict):
    mask_history: bool
    batch_size: int = Field(gt=0)
    engine: Literal["spark", "local"]
    sample_users: int = Field(ge=0)  # 0: every evaluable user
    markov_successors: int = Field(gt=0)


class MonitorConfig(_Strict):
    """`monitor`: drift of recent batches from the champions' training data."""

    recent_batches: int = Field(ge=1)  # without a teacher: the last N batches vs the rest
    bins: int = Field(ge=2)  # user features: bins at the reference's quantiles
    top_items: int = Field(ge=1)
    psi_warn: float = Field(gt=0)
    psi_alarm: float = Field(gt=0)
    js_warn: float = Field(gt=0)
    js_alarm: float = Field(gt=0)
    alpha: float = Field(gt=0, lt=1)
    min_rows: int = Field(ge=1)
    min_users: int = Field(ge=1)
    decay_tolerance: float = Field(ge=0, lt=1)


class ForgetConfig(_Strict):
    """`forget-user`: which columns name a user, hold raw input, or hold recorded samples."""

    user_columns: list[str] = Field(min_length=1)
    raw_columns: list[str]
    json_columns: list[str]
    salt_env: str = Field(min_length=1)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Config(_Strict):
    env: str
    lake: LakeConfig
    spark: SparkConfig
    generate: GenerateConfig
    ingest: IngestConfig
    validate_: ValidateConfig = Field(alias="validate")
    features: FeaturesConfig
    segment: SegmentConfig
    mine: MineConfig
    models: ModelsConfig
    mlflow: MlflowConfig
    teacher: TeacherModelConfig
    train: TrainConfig
    tune: TuneConfig
    students: StudentsConfig
    compress: CompressConfig
    heads: HeadsConfig
    score: ScoreConfig
    evaluate: EvaluateConfig
    monitor: MonitorConfig
    forget: ForgetConfig
    logging: LoggingConfig

    def table(self, name: str) -> TableSpec:
        try:
            return self.lake.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.lake.tables))
            raise ConfigError(
                f"lake.tables.{name}: no such table in conf (known: {known})"
            ) from None


def packaged_dir(name: str) -> Path:
    """The folder ``name`` (``conf``, ``pipelines``) that comes with the code.

    * Installed from the wheel: ``patternlake/<name>/`` inside the installed package (the
      build copies the repository's top-level folder there; see pyproject.toml).
    * Imported from a zip (``spark-submit --py-files patternlake.zip``, e.g. the wheel
      renamed): that folder, copied out once per process.
    * A checkout, editable install (``pip install -e .``) included: the package folder
      ``libs/patternlake/`` has no ``<name>/``, so the repository's top-level ``<name>/``,
      two levels above it. An editable install does not make ``patternlake.conf``
      importable, so the folder is found by path, not by ``importlib.resources``.
    """
    package = resources.files("patternlake")
    if not isinstance(package, Path):
        return _extracted_package_data() / name
    if (package / name).is_dir():
        return package / name
    return package.parent.parent / name


@functools.cache
def _extracted_package_data() -> Path:
    root = Path(tempfile.mkdtemp(prefix="patternlake-data-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = resources.files("patternlake")
    for name in ("conf", "pipelines"):
        _copy_tree(package / name, root / name)
    return root


def _copy_tree(source: Traversable, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, dest / entry.name)
        elif entry.name.endswith((".yaml", ".yml", ".json")):
            (dest / entry.name).write_bytes(entry.read_bytes())


def default_conf_dir() -> Path:
    """``$PATTERNLAKE_CONF_DIR``, else ``./conf`` if it has a ``base.yaml``, else the
    ``conf/`` that comes with the code (``packaged_dir``: the wheel's copy when installed,
    the repository's top-level ``conf/`` in a checkout or editable install)."""
    if os.environ.get(CONF_DIR_ENV):
        return Path(os.environ[CONF_DIR_ENV])
    cwd = Path.cwd() / "conf"
    if (cwd / "base.yaml").is_file():
        return cwd
    return packaged_dir("conf")


def load_config(
    conf: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    conf_dir: str | Path | None = None,
) -> Config:
    """Load and validate the configuration.

    ``conf`` is an environment name (``local``, ``cluster``, ``databricks``) looked up in the
    conf dir, or a path to a YAML file; ``overrides`` are ``a.b=value`` strings.
    """
    directory = Path(conf_dir) if conf_dir else default_conf_dir()
    base_file = directory / "base.yaml"
    if not base_file.is_file():
        raise ConfigError(
            f"no base.yaml in conf dir {directory}; set {CONF_DIR_ENV} to a folder that has one"
        )
    data = _read_yaml(base_file)
    env_name = conf or "local"
    env_file = (
        Path(env_name) if env_name.endswith((".yaml", ".yml")) else directory / f"{env_name}.yaml"
    )
    if not env_file.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "base")
        raise ConfigError(
            f"--conf {env_name}: no such environment or file (known: {', '.join(known)})"
        )
    data = _deep_merge(data, _read_yaml(env_file))
    data.setdefault("env", env_file.stem)

    environ = os.environ if environ is None else environ
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
            _set_path(data, path, _parse_scalar(value), source=key)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item}: expected KEY=VALUE, e.g. --set spark.shuffle_partitions=8"
            )
        key, value = item.split("=", 1)
        _set_path(data, key.strip().split("."), _parse_scalar(value), source=f"--set {key}")
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"]) or "<root>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
            problems.append(f"{path}: {msg}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(data: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    if not path or any(not p for p in path):
        raise ConfigError(f"{source}: empty key")
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value
