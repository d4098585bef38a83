"""One model, as the model set (models.registry) runs it.

A model is fed finished calls (`observe`) and told when event time moves on
(`advance`); either may return findings. Its state (River objects and plain
numbers) pickles, which is how snapshots keep it across restarts. What detection
asks of the set of models, and the findings' shape, engine.detect.detectors defines.
"""

from __future__ import annotations

from typing import Protocol

from engine.detect.calls import Call
from engine.detect.detectors import ModelFinding, Quiet, RecentCalls, never_quiet
from models.scoring import AdaptiveThreshold
from models.spec import ModelSpec

__all__ = ["Model", "ModelFinding", "Quiet", "RecentCalls", "finding", "never_quiet"]


class Model(Protocol):
    spec: ModelSpec
    version: str
    thresholds: AdaptiveThreshold

    def observe(
        self, call: Call, recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> ModelFinding | None: ...

    def advance(self, now: float) -> list[ModelFinding]: ...

    def wakes_at(self) -> float:
        """The event time from which `advance` may have work (it returns nothing
        before): -inf when it may at any time, inf when it never has."""
        ...

    def score(self, entity: str) -> float | None:
        """The latest score of `entity` (None before it has one)."""
        ...

    def quantile(self, q: float) -> float | None:
        """The running `q` quantile of this model's scores (None while unknown)."""
        ...

    def drop_idle(self, now: float) -> int: ...


def finding(
    spec: ModelSpec,
    version: str,
    entity_type: str,
    entity: str,
    *,
    raised_at: float,
    window_start: float,
    window_end: float,
    value: float,
    threshold: float,
    summary: str,
    evidence: list[str],
) -> ModelFinding:
    """A finding of the model `spec` describes, in its `version`: its id, severity,
    mode and suppression come along for the alert manager."""
    return ModelFinding(
        model_id=spec.id,
        version=version,
        severity=spec.severity,
        mode=spec.mode,
        suppression=spec.suppression,
        entity_type=entity_type,
        entity=entity,
        raised_at=raised_at,
        window_start=window_start,
        window_end=window_end,
        value=value,
        threshold=threshold,
        summary=summary,
        evidence=evidence,
    )
