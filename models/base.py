"""The one small interface between the engine and a model.

A model is fed finished calls (`observe`) and told when event time moves on
(`advance`); either may return findings. Its state (River objects and plain
numbers) pickles, which is how snapshots keep it across restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.detect.calls import Call
from models.scoring import AdaptiveThreshold
from models.spec import ModelSpec

# The pipeline's way to find the calls behind an entity (for an alert's evidence).
RecentCalls = Callable[[str, str], list[str]]
# Whether alerts of a source (a model's id) about an entity are suppressed at a time:
# asked before a finding is made, so a suppressed incident costs no evidence or text.
Quiet = Callable[[str, str, float], bool]


def never_quiet(source: str, entity: str, ts: float) -> bool:
    return False


@dataclass(frozen=True)
class ModelFinding:
    """A model judged an entity unusual at a moment of event time."""

    spec: ModelSpec
    version: str
    entity_type: str
    entity: str
    raised_at: float
    window_start: float
    window_end: float
    value: float
    threshold: float
    summary: str
    evidence: list[str]


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
