"""What distill and compress do with each segment's new model once its Spark task is back:
log it to MLflow and register it (``Candidate.register``), let the gate judge it, move the
segment's champion, and record the verdict (``Verdict``, one ``model_decisions`` row)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patternlake import registry
from patternlake.config import Config
from patternlake.lake import Lake
from patternlake.lake.catalog import contract


@dataclass(frozen=True)
class Candidate:
    """A segment's newly trained model, as MLflow and the registry keep it."""

    segment: int
    variant: str  # "fp32" (distill) or "int8" (compress)
    model: bytes  # its .safetensors file
    run_tags: dict[str, Any]  # MLflow run tags beside role, segment and variant
    run_params: dict[str, Any]
    run_metrics: dict[str, float]
    version_tags: dict[str, Any]  # registry tags beside segment and variant
    history: tuple[dict[str, Any], ...] = ()  # per epoch: epoch, loss, valid_ndcg@10
    texts: dict[str, str] = field(default_factory=dict)  # text artifacts: name -> content

    @property
    def run_name(self) -> str:
        scope = "shared" if self.segment < 0 else str(self.segment)
        return f"student-{scope}" if self.variant == "fp32" else f"student-{self.variant}-{scope}"

    def register(self, config: Config) -> str:
        """One MLflow run (tags, parameters, per-epoch and final metrics, the model file)
        and the registered student version made from it; returns the version."""
        import mlflow

        keys = {"segment": self.segment, "variant": self.variant}
        with mlflow.start_run(run_name=self.run_name) as run:
            mlflow.set_tags({"patternlake.role": "student", **keys, **self.run_tags})
            mlflow.log_params(self.run_params)
            for h in self.history:
                mlflow.log_metrics(
                    {"train_loss": h["loss"], "valid_ndcg_at_10": h["valid_ndcg@10"]},
                    step=h["epoch"],
                )
            mlflow.log_metrics(self.run_metrics)
            for name, text in self.texts.items():
                mlflow.log_text(text, name)
            name = (
                "student.safetensors"
                if self.variant == "fp32"
                else (f"student-{self.variant}.safetensors")
            )
            with tempfile.TemporaryDirectory(prefix="pl-student-") as tmp:
                path = Path(tmp) / name
                path.write_bytes(self.model)
                mlflow.log_artifact(str(path), artifact_path="model")
            return registry.register(config, run.info.run_id, "model", keys | self.version_tags)


@dataclass(frozen=True)
class Verdict:
    """The gate's verdict on one segment's model and who serves the segment now."""

    stage: str  # distill | compress
    segment: int
    variant: str
    valid_users: int
    reference: str  # "teacher", "student v3"
    reference_ndcg: float
    threshold: float
    promoted: bool
    champion: str  # "teacher", "student v4", "student-int8 v5"
    reason: str
    details: dict[str, Any]  # what the task measured (no model bytes)
    registered_version: str | None = None
    params: int | None = None
    bytes: int | None = None
    model_ndcg: float | None = None
    ratio: float | None = None
    lower: float | None = None  # the ratio's one-sided 90% bounds (students.gates)
    upper: float | None = None

    @classmethod
    def of_interval(
        cls,
        stage: str,
        segment: int,
        variant: str,
        interval: Any,
        *,
        reference: str,
        threshold: float,
        promoted: bool,
        champion: str,
        reason: str,
        details: dict[str, Any],
        version: str,
        params: int,
        nbytes: int,
    ) -> Verdict:
        """A row whose numbers are a ``gates.Interval`` of the model against ``reference``."""
        return cls(
            stage=stage,
            segment=segment,
            variant=variant,
            valid_users=interval.users,
            reference=reference,
            reference_ndcg=interval.reference,
            threshold=threshold,
            promoted=promoted,
            champion=champion,
            reason=reason,
            details=details,
            registered_version=version,
            params=params,
            bytes=nbytes,
            model_ndcg=interval.candidate,
            ratio=interval.ratio,
            lower=interval.lower,
            upper=interval.upper,
        )

    @classmethod
    def of_guard(
        cls,
        stage: str,
        segment: int,
        variant: str,
        guard: Any,
        serve: bool,
        champion: str,
        reference: str,
        floor: float,
        pooled_passed: bool,
        version: str,
        params: int,
        nbytes: int,
    ) -> Verdict:
        """A segment's row: the harm guard (``gates.harm``) of a model the pooled gate
        judged, and who serves the segment now."""
        reason = guard.reason if pooled_passed else "the pooled gate did not pass; " + guard.reason
        return cls.of_interval(
            stage,
            segment,
            variant,
            guard.interval,
            reference=reference,
            threshold=floor,
            promoted=serve,
            champion=champion,
            reason=reason,
            details={"harm_guard": guard.interval.as_dict()},
            version=version,
            params=params,
            nbytes=nbytes,
        )

    def row(self, decided_at: datetime) -> dict[str, Any]:
        """Its ``model_decisions`` row."""
        return {
            "decided_at": decided_at,
            "stage": self.stage,
            "segment_id": self.segment,
            "model": "student",
            "variant": self.variant,
            "registered_version": self.registered_version,
            "params": self.params,
            "bytes": self.bytes,
            "valid_users": self.valid_users,
            "reference": self.reference,
            "reference_ndcg_at_10": self.reference_ndcg,
            "model_ndcg_at_10": self.model_ndcg,
            "ratio": self.ratio,
            "threshold": self.threshold,
            "promoted": self.promoted,
            "champion": self.champion,
            "reason": self.reason,
            "details": json.dumps(self.details),
            "ratio_lower_90": self.lower,
            "ratio_upper_90": self.upper,
        }

    def summary(self) -> dict[str, Any]:
        """The segment's entry in the stage's result (printed by the CLI, kept in ops/runs)."""
        out = {**self.details}
        if self.registered_version is not None:
            out |= {"registered_version": self.registered_version, "promoted": self.promoted}
        return out | {"champion": self.champion}


def write_decisions(lake: Lake, verdicts: list[Verdict], decided_at: datetime) -> None:
    table = contract("model_decisions")
    rows = [v.row(decided_at) for v in verdicts]
    df = lake.spark.createDataFrame(
        [tuple(r.get(c) for c in table.names) for r in rows], table.ddl()
    )
    # merge_schema: a lake whose model_decisions predates the interval columns gains them
    lake.write(df, "model_decisions", "append", merge_schema=True)


def record(
    lake: Lake, verdicts: list[Verdict], teacher_version: str, started: float
) -> dict[str, Any]:
    """Appends the verdicts (the pooled one first, then one per segment) to
    ``model_decisions``; the stage's result (printed by the CLI, kept in ops/runs)."""
    write_decisions(lake, verdicts, datetime.now(UTC))
    pooled = verdicts[0]
    return {
        "shared": pooled.summary()
        | {"ratio": pooled.ratio, "lower": pooled.lower, "upper": pooled.upper},
        "segments": {v.segment: v.summary() for v in verdicts[1:]},
        "teacher_version": teacher_version,
        "registered_version": pooled.registered_version,
        "seconds": round(time.monotonic() - started, 1),
    }
