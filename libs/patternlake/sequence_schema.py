"""The vocabulary of ``user_sequences``, shared by the stages that write and read it
(featurize writes it; training, evaluation, students and scoring read it): defined here
once, never copied into a stage, and recorded with the table.

* ``gap_seq`` holds time-gap buckets: 0 for a user's first event, then 1 + the number of
  ``GAP_EDGES`` (seconds since the user's previous event) at or below the gap, so
  ``GAP_BUCKETS`` ids in all (0 .. len(GAP_EDGES) + 1).
* ``type_seq`` holds event-type ids: ``k`` is the k-th of the event types featurize was given
  (``validate.allowed_event_types``), 0 padding.
* Every array holds a user's last ``max_len`` events (``features.max_history``).
* The evaluation protocol (docs/design.md): a user with at least ``MIN_EVALUATED_EVENTS`` events
  is evaluated; the last event is the test target and the one before it the validation
  target (``valid_item`` / ``test_item``), the rest is training data.

**Recorded with the table.** Featurize writes a ``SequenceVocabulary`` into the metadata of
the columns it describes (``item_seq``: ``max_len``, ``type_seq``: ``event_types``,
``gap_seq``: ``gap_edges``, each under the key ``VOCABULARY_KEY``). Column metadata is
part of the Delta table's schema, so every version carries the vocabulary it was built
with (time travel included, and through checkpoints and expired history, unlike commit
information); a reader asks ``read_vocabulary(lake, version)`` (or ``sequence_vocabulary``,
which falls back to conf for a table written before the vocabulary was recorded) instead of
reading conf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructType

    from patternlake.config import Config
    from patternlake.lake import Lake

log = logging.getLogger(__name__)

GAP_EDGES = (60, 300, 1800, 7200, 86400, 604800)  # 1 min, 5 min, 30 min, 2 h, 1 day, 1 week
GAP_BUCKETS = len(GAP_EDGES) + 2  # 0 (first) .. 7 (>= a week)
MIN_EVALUATED_EVENTS = 3  # a training event, the validation target and the test target

TABLE = "user_sequences"
VOCABULARY_KEY = "patternlake.vocabulary"  # in the metadata of item_seq, type_seq, gap_seq


@dataclass(frozen=True)
class SequenceVocabulary:
    """What the ids of one ``user_sequences`` version mean."""

    event_types: tuple[str, ...]  # type id k is event_types[k - 1]; 0 is padding
    max_len: int  # events kept per user
    gap_edges: tuple[int, ...] = GAP_EDGES

    @classmethod
    def from_config(cls, config: Config) -> SequenceVocabulary:
        """The vocabulary featurize builds with under ``config``: its event types
        (``validate.allowed_event_types``), ``features.max_history`` and ``GAP_EDGES``."""
        return cls(tuple(config.validate_.allowed_event_types), config.features.max_history)

    @property
    def n_types(self) -> int:
        """Type ids, padding included (a model's type embedding size)."""
        return len(self.event_types) + 1

    @property
    def gap_buckets(self) -> int:
        """Gap ids: 0 (a user's first event) .. len(gap_edges) + 1."""
        return len(self.gap_edges) + 2

    def column_metadata(self) -> dict[str, dict[str, Any]]:
        """Column -> the metadata featurize writes on it."""
        return {
            "item_seq": {VOCABULARY_KEY: {"max_len": self.max_len}},
            "type_seq": {VOCABULARY_KEY: {"event_types": list(self.event_types)}},
            "gap_seq": {VOCABULARY_KEY: {"gap_edges": list(self.gap_edges)}},
        }

    def attach(self, df: DataFrame) -> DataFrame:
        """``df`` (featurize's ``user_sequences``) with this vocabulary on its columns."""
        for column, metadata in self.column_metadata().items():
            current = next(f.metadata for f in df.schema.fields if f.name == column)
            df = df.withMetadata(column, {**current, **metadata})
        return df

    @classmethod
    def from_schema(cls, schema: StructType) -> SequenceVocabulary | None:
        """The vocabulary recorded on a ``user_sequences`` schema; None when it has none (a
        table written before featurize recorded it, or not by featurize)."""
        found: dict[str, Any] = {}
        for f in schema.fields:
            if f.name in ("item_seq", "type_seq", "gap_seq"):
                found.update((f.metadata or {}).get(VOCABULARY_KEY) or {})
        if not {"event_types", "max_len", "gap_edges"} <= found.keys():
            return None
        return cls(
            event_types=tuple(str(t) for t in found["event_types"]),
            max_len=int(found["max_len"]),
            gap_edges=tuple(int(e) for e in found["gap_edges"]),
        )


def pinned_sequence_files(lake: Lake, version: int, stage: str) -> list[str]:
    """The Parquet files of ``user_sequences@version``, the version a registered model was
    trained on; when it no longer exists (``forget-user`` removes old versions), one line that
    says so and names the way out: train again on the current data."""
    from patternlake.errors import PatternlakeError, VersionNotFoundError

    try:
        return lake.files("user_sequences", version)
    except VersionNotFoundError:
        raise PatternlakeError(
            f"{stage}: the registered teacher was trained on user_sequences version {version}, "
            "which no longer exists (forget-user removes older versions): run "
            "`patternlake run train` to train on the current data"
        ) from None


def read_vocabulary(lake: Lake, version: int | None = None) -> SequenceVocabulary | None:
    """The vocabulary ``user_sequences`` (``version``, or the latest) was built with; None
    when that version records none. The latest version's comes from the log alone."""
    if version is None or version == lake.version(TABLE):
        schema = lake.schema(TABLE)
    else:  # an older version's schema: the engine's time travel
        schema = lake.read(TABLE, version=version).schema
    return SequenceVocabulary.from_schema(schema)


def sequence_vocabulary(
    lake: Lake, config: Config, version: int | None = None
) -> SequenceVocabulary:
    """``read_vocabulary``; for a version that records none (written before featurize
    recorded it), what conf gives, with a warning (``featurize --full`` records it)."""
    recorded = read_vocabulary(lake, version)
    if recorded is not None:
        return recorded
    fallback = SequenceVocabulary.from_config(config)
    log.warning(
        "%s%s records no vocabulary (written before featurize recorded it); using conf's "
        "(%s); `patternlake featurize --full` records it",
        TABLE,
        "" if version is None else f" v{version}",
        fallback,
    )
    return fallback
