"""How a stage is declared: a ``Stage`` (and its CLI ``Option``\\s), written once in the
stage's own package as ``<package>/stage.py``, a tuple ``STAGES`` (``segments/stage.py`` is
the shortest example; ``docs/architecture.md`` walks through one).

The runner (``patternlake.pipeline``) collects every package's ``STAGES``; from a declaration
come the CLI subcommand, the pipeline step, the input check before the stage runs, the
"run X first" errors, the exports and the run records. A stage's body trusts its inputs:
the runner checked them, and it hands the stage a lake that refuses any table the
declaration does not name (``Lake.scoped``). Library module: no stage imports here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patternlake.config import Config
    from patternlake.lake import Lake


@dataclass(frozen=True)
class Option:
    """One CLI option of a stage, in argparse's terms. Its ``key`` names it in the stage's
    ``options`` (and ``args``): the same key ``run`` fills (``run --input``: ingest's path)."""

    flag: str  # "--backend"; without dashes a positional, shown by that name
    help: str | None = None
    dest: str | None = None  # default: from the flag
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None  # "store_true"
    default: Any = None
    metavar: str | None = None
    parse: str | None = None  # "module:function" turning the CLI's text into the value

    @property
    def key(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")

    @property
    def fallback(self) -> Any:
        """The value when not given (a ``run`` step without the flag)."""
        return False if self.action == "store_true" else self.default

    def add_to(self, parser: Any) -> None:
        kwargs = {
            "help": self.help,
            "type": self.type,
            "choices": self.choices,
            "action": self.action,
            "default": self.default,
            "metavar": self.metavar,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.flag.startswith("-"):
            parser.add_argument(self.flag, dest=self.key, **kwargs)
        else:
            parser.add_argument(self.key, **({"metavar": self.flag} | kwargs))

    def value(self, given: Any) -> Any:
        """What the CLI passes on for ``given`` (the parsed text)."""
        return resolve(self.parse)(given) if self.parse else given


@dataclass(frozen=True)
class Stage:
    """One declaration per stage. Its ``name`` is its only name: the step in pipelines and
    ``ops/runs``, ``jobs/<name>.py``, and (split at ``_``) its CLI words.

    ``call`` is ``module:function`` in the stage's package, imported only when the stage
    runs (so the CLI starts without torch or MLflow), called with ``args`` in order: each
    ``spark``, ``lake``, ``config`` or the key of one of its ``options``.

    ``inputs`` are the tables it reads (``model:x``: a registered model, checked by the
    stage's ``skip_when`` or the registry), ``optional`` those of them it reads only when
    they exist (not checked before it runs), ``outputs`` what it writes. The lake it is given refuses every other table."""

    name: str
    call: str
    args: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    section: str  # its section of conf
    help: str
    options: tuple[Option, ...] = ()
    optional: tuple[str, ...] = ()  # inputs it reads only when they exist: not checked
    skip_when: Callable[[Config, dict[str, Any]], str | None] | None = None  # in a pipeline
    show: str = "json"  # how the CLI prints the result (``patternlake.cli.SHOW``)

    @property
    def command(self) -> tuple[str, ...]:
        return tuple(self.name.split("_"))

    @property
    def job(self) -> str:
        return self.name

    @property
    def usage(self) -> str:
        """``patternlake <words> <POSITIONALS>``, as the "run X first" errors name it."""
        positionals = [o.flag.upper() for o in self.options if not o.flag.startswith("-")]
        return " ".join(("patternlake", *self.command, *positionals))

    @property
    def tables(self) -> frozenset[str]:
        """Every lake table the stage may touch: what it reads and what it writes."""
        both = (*self.inputs, *self.outputs)
        return frozenset(t for t in both if not t.startswith("model:"))

    def run(self, lake: Lake, config: Config, options: dict[str, Any]) -> Any:
        scoped = lake.scoped(self.name, self.tables)
        values = {o.key: o.fallback for o in self.options} | options
        values |= {"spark": lake.spark, "lake": scoped, "config": config}
        return resolve(self.call)(*(values[a] for a in self.args))


def resolve(target: str) -> Callable[..., Any]:
    """``module:function`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


SPARK_LAKE_CONFIG = ("spark", "lake", "config")
JSON = Option("--json", action="store_true", help="print one JSON object")
