"""`patternlake forget-user ID [ID ...]`: a user's rows out of every lake table, for good.

Reads and writes every table of ``lake.tables`` (except ``forget_log``) that has one of
``forget.user_columns``, ``forget.raw_columns`` or ``forget.json_columns``; appends one
row per id to ``forget_log`` (``forget_id``, the id's salted hash, rows removed per table,
the models marked). Steps, per table:

1. a Delta DELETE of the users' rows (``privacy.transforms.user_rows``), and an UPDATE of the
   recorded samples in JSON columns (Great Expectations results) that mention an id;
2. ``REORG TABLE ... APPLY (PURGE)``: files with deletion vectors (a table whose owner turned
   them on) are rewritten without the rows the vectors hide;
3. a lite vacuum with zero retention: every file the log removed is deleted (old versions
   held the rows too, e.g. earlier ``user_sequences`` overwrites), never the files of a
   writer still running;
4. a checkpoint of the current version, then the older log entries are deleted: the DELETE's
   predicate names the ids, and older per-file min/max statistics may; time travel to
   before the forget ends.

Text files under the lake root outside the tables (validation HTML reports) have any
mention of an id replaced by ``[forgotten]``. Registered models trained before stay as they
are (weights hold no ids but learned from the user's events): every version of ``teacher``
and ``student`` gets the tag ``retrain_required`` = the forget id; the next ``run train``
makes models without the user.

Invariant: afterwards the bytes of an id appear in no file under the lake root, and every
other user's rows are unchanged (tests/privacy/test_forget.py).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from patternlake.config import Config
from patternlake.errors import PatternlakeError
from patternlake.lake import Lake
from patternlake.lake.catalog import contract
from patternlake.privacy import transforms

log = logging.getLogger(__name__)

LOG_TABLE = "forget_log"
TEXT_SUFFIXES = (".html", ".htm", ".json", ".txt", ".csv", ".log", ".md")


def forget_users(spark: SparkSession, lake: Lake, config: Config, ids: list[str]) -> dict[str, Any]:
    try:
        ids = transforms.clean_ids(ids)
    except ValueError as exc:
        raise PatternlakeError(str(exc)) from None
    started = time.monotonic()
    cfg = config.forget
    forget_id = uuid.uuid4().hex
    salt = _salt(config)
    commit = {"patternlake.forget_id": forget_id}
    removed: dict[str, int] = {}
    files = 0
    scrubbed = 0
    for name in sorted(config.lake.tables):
        if name == LOG_TABLE or not lake.exists(name):
            continue
        schema = lake.schema(name)
        cond = transforms.user_rows(schema, ids, cfg.user_columns, cfg.raw_columns)
        json_cols = [
            f.name
            for f in schema.fields
            if f.name.lower() in {c.lower() for c in cfg.json_columns}
            and isinstance(f.dataType, StringType)
        ]
        if cond is None and not json_cols:
            continue
        if cond is not None:
            removed[name] = lake.delete(name, cond, commit)
        if json_cols:
            scrubbed += _scrub_json(
                lake, name, json_cols, ids, cfg.user_columns + cfg.raw_columns, commit
            )
        lake.purge(name)
        # old versions hold the rows too: no file the log removed survives
        files += len(lake.vacuum(name, retention_hours=0, lite=True))
        lake.expire_history(name)
    redacted = _redact_files(lake, config, ids)
    marked = _mark_models(config, forget_id)
    now = datetime.now(UTC)
    rows = [(forget_id, transforms.salted_hash(u, salt), now, removed, files, marked) for u in ids]
    lake.write(spark.createDataFrame(rows, contract(LOG_TABLE).ddl()), LOG_TABLE, mode="append")
    result = {
        "forget_id": forget_id,
        "users": len(ids),
        "rows_removed": removed,
        "files_rewritten": files,  # old files holding the rows, deleted from disk
        "tables_scrubbed": scrubbed,
        "text_files_redacted": redacted,
        "models_marked": marked,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info(
        "forget-user %s: %d users, %d rows in %d tables, %d old files deleted, %d models marked (%.1fs)",
        forget_id,
        len(ids),
        sum(removed.values()),
        sum(1 for n in removed.values() if n),
        files,
        len(marked),
        result["seconds"],
    )
    return result


def _scrub_json(
    lake: Lake,
    name: str,
    columns: list[str],
    ids: list[str],
    sample_columns: list[str],
    commit: dict[str, str],
) -> int:
    """Scrub the ids out of the JSON columns of the rows that mention one; returns 1 when a
    row was updated, else 0."""
    pattern = transforms.token_regex(ids)
    scrub = F.udf(lambda text: transforms.scrub_json_text(text, ids, sample_columns), StringType())
    touched = F.lit(False)
    for c in columns:
        touched = touched | F.coalesce(F.col(f"`{c}`").rlike(pattern), F.lit(False))
    values = {f"`{c}`": scrub(F.col(f"`{c}`")) for c in columns}
    return 0 if lake.update(name, touched, values, commit) is None else 1


def _redact_files(lake: Lake, config: Config, ids: list[str]) -> list[str]:
    """Text files under a local lake root, outside the tables, lose every mention of an id."""
    root = lake.local_path()
    if root is None or not root.is_dir():
        return []
    tables = [lake.local_path(n) for n in config.lake.tables]
    pattern = re.compile(transforms.token_regex(ids).encode("utf-8"))
    redacted = []
    for path in root.rglob("*"):
        if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        if any(path.is_relative_to(t) for t in tables):
            continue
        data = path.read_bytes()
        if pattern.search(data):
            path.write_bytes(pattern.sub(b"[forgotten]", data))
            redacted.append(str(path.relative_to(root)))
    return redacted


def _salt(config: Config) -> bytes:
    """The secret salt of the hashes in forget_log: ``$<forget.salt_env>`` when set, else a
    random one kept in the model store (``forget.salt``, created on first use, mode 600)."""
    env = os.environ.get(config.forget.salt_env, "")
    if env:
        return env.encode("utf-8")
    path = Path(config.models.root) / "forget.salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def _mark_models(config: Config, forget_id: str) -> list[str]:
    """Tag every registered teacher and student version ``retrain_required=<forget_id>``."""
    from patternlake.registry import STUDENT, TEACHER, client, registry_exists

    if not registry_exists(config):
        return []  # no registry yet: no model learned from the user

    c = client(config)
    marked = []
    for name in (TEACHER, STUDENT):
        for mv in c.search_model_versions(f"name = '{name}'"):
            c.set_model_version_tag(name, mv.version, "retrain_required", forget_id)
            marked.append(f"{name}/{mv.version}")
    return marked
