"""The model registry (MLflow) for the teacher and the students, without pickle: shared by
every stage that registers, loads or names a model (train, tune, distill, compress,
evaluate, score, monitor, forget, report).

* The teacher is registered as ``teacher`` (``TEACHER``); every new one carries the alias
  ``candidate`` (``TEACHER_ALIAS``); ``use_experiment`` points MLflow at conf's experiment.
* Every student file is logged as an artifact of its MLflow run and registered as a version
  of the registered model ``student`` with tags ``segment``, ``variant`` (fp32 | int8),
  ``params``, ``bytes`` and its validation NDCG@10.
* The promoted model of segment g carries the alias ``champion-<g>``; a segment without it
  is served by the teacher (``teacher@candidate``).
* Loading reads the file through ``store`` (JSON header + raw tensors): nothing from the
  store is unpickled. The teacher's run holds ``weights/teacher.safetensors`` for the same
  reason (written by ``train``).
* Absent is not broken: only MLflow's "does not exist" answers None ("no teacher yet");
  any other failure (a locked database, a network error) raises ``RegistryError`` naming
  the operation and the tracking URI. Only ``train`` (``use_experiment``) creates a
  tracking store; the stages that read the registry refuse one that does not exist
  (``require_store``) instead of letting MLflow create an empty one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from patternlake.config import Config
from patternlake.errors import PatternlakeError, RegistryError
from patternlake.models.store import metadata
from patternlake.models.student import from_bytes
from patternlake.models.teacher import SequentialTeacher, teacher_from_bytes

log = logging.getLogger(__name__)
STUDENT = "student"
TEACHER = "teacher"
TEACHER_ALIAS = "candidate"  # set on every new teacher
TEACHER_FILE = "weights/teacher.safetensors"


def champion_alias(segment: int) -> str:
    return f"champion-{segment}"


def store_path(uri: str) -> Path | None:
    """The local file or folder of a tracking URI (``sqlite:///``, ``file://``, a plain path);
    None for a server (``http://``, ``databricks``, a database server)."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if uri == "databricks" or uri.startswith("databricks") or "://" in uri:
        return None
    return Path(uri)


def registry_exists(config: Config) -> bool:
    """False when the tracking store is a local file or folder that does not exist yet
    (nothing was ever registered there); asking MLflow would create it. A server counts as
    existing (asking it tells)."""
    path = store_path(config.mlflow.tracking_uri)
    return path is None or path.exists()


def require_store(config: Config, operation: str) -> None:
    """For stages that only read the registry: a missing store is a wrong URI or a lake
    that was never trained, never an empty registry to create."""
    if not registry_exists(config):
        raise RegistryError(
            f"{operation}: no MLflow tracking store at {config.mlflow.tracking_uri} "
            "(mlflow.tracking_uri): check the URI, or run `patternlake train` first to create it"
        )


def absent(exc: BaseException) -> bool:
    """MLflow's "does not exist": a registered model, version or alias not there (an alias
    not found reads as INVALID_PARAMETER_VALUE in MLflow's SQL store)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    text = str(exc.message if hasattr(exc, "message") else exc)
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text


def broken(config: Config, operation: str, exc: BaseException) -> RegistryError:
    """The one line for a registry that could not answer."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return RegistryError(
        f"registry: {operation} failed at tracking URI {config.mlflow.tracking_uri}: "
        f"{type(exc).__name__}: {lines[0][:300]}"
    )


@contextmanager
def answering(config: Config, operation: str) -> Iterator[None]:
    """Any failure inside but our own errors -> ``broken`` (callers catch ``absent`` first).
    MLflow's own ERROR log of a failed SQL query (a traceback on stderr) is left to ``-v``:
    the error's one line says it."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        yield
    except PatternlakeError:
        raise
    except Exception as exc:
        raise broken(config, operation, exc) from exc


def _read(config: Config, operation: str, ask: Any, when_absent: Any = None) -> Any:
    """``ask()`` of a store that must exist (``require_store``): MLflow's "does not exist"
    answers ``when_absent``, any other failure is ``broken``."""
    require_store(config, operation)
    with answering(config, operation):
        try:
            return ask()
        except Exception as exc:
            if absent(exc):
                return when_absent
            raise


def client(config: Config):
    import os
    import sys

    if not sys.stderr.isatty():  # MLflow's download bars otherwise fill logs and CI output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    return mlflow.MlflowClient(tracking_uri=config.mlflow.tracking_uri)


def use_experiment(config: Config) -> None:
    """Point MLflow at conf's tracking URI and experiment (created with its artifact location)."""
    import mlflow

    mlflow.set_tracking_uri(config.mlflow.tracking_uri)
    if mlflow.get_experiment_by_name(config.mlflow.experiment) is None:
        location = config.mlflow.artifact_location
        if "://" not in location:
            location = Path(location).resolve().as_uri()
        mlflow.create_experiment(config.mlflow.experiment, artifact_location=location)
    mlflow.set_experiment(config.mlflow.experiment)


def register(config: Config, run_id: str, artifact_path: str, tags: dict[str, Any]) -> str:
    """A new version of ``student`` whose source is ``artifact_path`` of run ``run_id``."""
    c = client(config)
    with answering(config, f"registering a version of {STUDENT}"):
        try:
            c.get_registered_model(STUDENT)
        except Exception as exc:
            if not absent(exc):
                raise
            c.create_registered_model(
                STUDENT,
                description="one small model per user segment (patternlake distill/compress)",
            )
        source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = c.create_model_version(
            STUDENT, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        )
    return str(mv.version)


def set_champion(config: Config, segment: int, version: str | None) -> None:
    """``champion-<segment>`` on ``version``; None removes it (the teacher serves)."""
    c = client(config)
    alias = champion_alias(segment)
    with answering(config, f"setting {STUDENT}@{alias}"):
        if version is None:
            try:
                c.delete_registered_model_alias(STUDENT, alias)
            except Exception as exc:
                if not absent(exc):  # no alias (or no model) yet: nothing to remove
                    raise
            return
        c.set_registered_model_alias(STUDENT, alias, version)


def champion_version(config: Config, segment: int) -> Any | None:
    """The ModelVersion with ``champion-<segment>``, or None (the teacher serves)."""
    alias = champion_alias(segment)
    return _read(
        config,
        f"looking up {STUDENT}@{alias}",
        lambda: client(config).get_model_version_by_alias(STUDENT, alias),
    )


def version_file(config: Config, name: str, version: str) -> Path:
    import mlflow

    require_store(config, f"downloading {name} v{version}")
    c = client(config)
    with answering(config, f"downloading {name} v{version}"):
        uri = c.get_model_version_download_uri(name, version)
        folder = Path(mlflow.artifacts.download_artifacts(uri))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PatternlakeError(f"registry: {name} v{version} holds no .safetensors file")
    return files[0]


def load_student(config: Config, version: str, runtime: str = "dequant") -> torch.nn.Module:
    data, base = student_files(config, version)
    return from_bytes(data, runtime, base=base)


def student_files(config: Config, version: str) -> tuple[bytes, bytes | None]:
    """A student version's file, and for a segment head the file of the shared student it
    runs on (else None)."""
    data = version_file(config, STUDENT, version).read_bytes()
    base = metadata(data).get("base")
    return data, None if base is None else version_file(config, STUDENT, base).read_bytes()


def student_version(config: Config, version: str) -> Any | None:
    """The ModelVersion ``version`` of ``student``, or None where it is gone."""
    return _read(
        config,
        f"looking up {STUDENT} v{version}",
        lambda: client(config).get_model_version(STUDENT, version),
    )


def student_versions(config: Config, **tags: Any) -> list[Any]:
    """Versions of ``student`` whose tags match, newest first."""
    found = _read(
        config,
        f"searching the versions of {STUDENT}",
        lambda: client(config).search_model_versions(f"name='{STUDENT}'"),
        when_absent=[],
    )
    keep = [v for v in found if all(v.tags.get(k) == str(x) for k, x in tags.items())]
    return sorted(keep, key=lambda v: int(v.version), reverse=True)


def teacher_file(config: Config) -> tuple[bytes, dict[str, str]]:
    """The registered teacher's (``teacher@candidate``) weights file, as bytes (what the
    stages broadcast to their tasks), and its run's tags (data versions) plus ``version``."""
    import mlflow

    mv = _teacher(config)
    if mv is None:
        raise PatternlakeError(
            "no registered teacher yet; run `patternlake train` (or `patternlake run train`) first"
        )
    c = client(config)
    with answering(config, f"downloading {TEACHER} v{mv.version}"):
        try:
            path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=TEACHER_FILE)
        except Exception as exc:
            if not (absent(exc) or isinstance(exc, FileNotFoundError)):
                raise
            raise PatternlakeError(
                f"teacher v{mv.version} has no {TEACHER_FILE} (trained by an older "
                "patternlake); retrain it with `patternlake train --fresh`"
            ) from None
        tags = c.get_run(mv.run_id).data.tags
    return Path(path).read_bytes(), {**tags, "version": str(mv.version)}


def load_teacher(config: Config) -> tuple[SequentialTeacher, dict[str, str]]:
    """The registered teacher, built from its weights file, and ``teacher_file``'s tags."""
    data, tags = teacher_file(config)
    return teacher_from_bytes(data), tags


def teacher_version(config: Config) -> str | None:
    """The version of ``teacher@candidate``, or None where none is registered yet."""
    mv = _teacher(config)
    return None if mv is None else str(mv.version)


def _teacher(config: Config) -> Any | None:
    """The ModelVersion of ``teacher@candidate``, or None where none is registered yet."""
    return _read(
        config,
        f"looking up {TEACHER}@{TEACHER_ALIAS}",
        lambda: client(config).get_model_version_by_alias(TEACHER, TEACHER_ALIAS),
    )


def segment_students(
    config: Config, segments: list[int], runtime: str = "dequant"
) -> tuple[dict[str, dict[int, tuple[torch.nn.Module, int]]], dict[int, str]]:
    """For the current teacher: the newest shared fp32 and int8 student, as every segment's
    model ({"student": {g: (model, bytes)}, "student_int8": {...}}: one model object for all
    segments), the served fleet ({"fleet": {g: (champion, bytes)}}: segments the teacher
    serves are left out) and each segment's champion ("student v3", "student-int8 v5" or
    "teacher")."""
    version = teacher_version(config)
    found: dict[str, dict[int, tuple[torch.nn.Module, int]]] = {
        "student": {},
        "student_int8": {},
        "fleet": {},
    }
    champions: dict[int, str] = {}
    if version is None:
        return found, champions
    loaded: dict[str, tuple[torch.nn.Module, int]] = {}
    bases: dict[str, torch.nn.Module] = {}  # a head's shared student, built once for all heads

    def load(v: Any) -> tuple[torch.nn.Module, int]:
        """The version's model and its file's bytes; a head also records the shared file it
        runs on (``shared_file``: version, bytes), which a fleet counts once."""
        if v.version not in loaded:
            data, base = student_files(config, v.version)
            model_base = None
            if base is not None:
                base_version = str(metadata(data)["base"])
                if base_version not in bases:
                    bases[base_version] = from_bytes(base)
                model_base = bases[base_version]
            model = from_bytes(data, runtime, base=model_base)
            model.file_version = str(v.version)
            if base is not None:
                base_params = int(metadata(base)["params"])
                model.shared_file = (base_version, len(base), base_params)
            loaded[v.version] = (model, len(data))
        return loaded[v.version]

    for variant, key in (("fp32", "student"), ("int8", "student_int8")):
        newest = student_versions(config, variant=variant, shared="true", teacher_version=version)
        if newest:
            found[key] = {g: load(newest[0]) for g in segments}
    for g, mv in current_champions(config, segments, version).items():
        champions[g] = "teacher" if mv is None else f"{champion_name(mv)} v{mv.version}"
        if mv is not None:
            found["fleet"][g] = load(mv)
    return found, champions


def current_champions(
    config: Config, segments: list[int], teacher_version: str
) -> dict[int, Any | None]:
    """segment -> the ModelVersion of its champion student, or None where the teacher serves
    (no alias, or a champion distilled from another teacher version)."""
    out = {}
    for g in segments:
        mv = champion_version(config, g)
        out[g] = (
            mv if mv is not None and mv.tags.get("teacher_version") == teacher_version else None
        )
    return out


def champion_name(mv: Any) -> str:
    """``student``, ``student-int8`` or ``student-head``: the name a champion serves under."""
    variant = mv.tags.get("variant")
    return {"int8": "student-int8", "head": "student-head"}.get(variant, "student")
