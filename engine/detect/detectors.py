"""What detection needs from the models beside its rules, defined here, on this side.

The pipeline drives a set of models (`Models`): it feeds them finished calls
(`observe`), tells them when event time moves on (`advance`), lets idle state go
(`drop_idle`), and keeps what they learned across snapshots and reloads (`state`,
`restore`). A rule may ask for a model's agreement (`gate`), and a rule's inline
test runs with a fresh copy of that model (`unlearned`). Findings come back as
`ModelFinding`, plain fields the alert manager turns into alerts.

`models/` implements this interface (models.registry.ModelSet) and imports this
module; detection never imports `models/`. Where the parts are wired (engine.apps)
the model files are loaded and handed in: to `load_rules` as a `ModelCatalogue`
(so a rule naming an unknown or disabled model, or a quantile the model does not
track, is reported with file:line like any other problem), and to the rule set as
its `Models`. Without models (`NoModels`, the default) detection runs on rules alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.detect.calls import Call

# The pipeline's way to find the calls behind an entity (for an alert's evidence).
RecentCalls = Callable[[str, str], list[str]]
# Whether alerts of a source (a model's id) about an entity are suppressed at a time:
# asked before a finding is made, so a suppressed incident costs no evidence or text.
Quiet = Callable[[str, str, float], bool]
# A rule's condition on a model: whether the model agrees about the call's entity.
Gate = Callable[[Call], bool]


def never_quiet(source: str, entity: str, ts: float) -> bool:
    return False


def never_open(call: Call) -> bool:
    """The gate of a rule whose model does not run: the rule never fires."""
    return False


@dataclass(frozen=True)
class ModelFinding:
    """A model judged an entity unusual at a moment of event time; what the alert
    manager needs of the model (its id, severity, mode, suppression) comes along."""

    model_id: str
    version: str
    severity: str
    mode: str
    suppression: float
    entity_type: str
    entity: str
    raised_at: float
    window_start: float
    window_end: float
    value: float
    threshold: float
    summary: str
    evidence: list[str]


@dataclass(frozen=True)
class ModelCatalogue:
    """The model files as rules see them: the enabled models with the quantiles each
    tracks (a rule's `model:` gate may name only these), the disabled ones, and the
    problems found reading the files, reported with the rules' own."""

    tracked: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()
    problems: tuple[str, ...] = ()
    # What each model (enabled or not) alerts about: its alerts' entity_type.
    kinds: Mapping[str, str] = field(default_factory=dict)


class Models(Protocol):
    """The set of models the pipeline drives (models.registry.ModelSet)."""

    @property
    def due(self) -> float:
        """No model has work in `advance` before this event time (inf: none ever)."""
        ...

    def __len__(self) -> int:
        """How many models run (0: the pipeline never asks them anything)."""
        ...

    def observe(
        self, calls: Iterable[Call], recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> list[ModelFinding]: ...

    def advance(self, now: float) -> list[ModelFinding]: ...

    def drop_idle(self, now: float) -> int: ...

    def gate(self, model_id: str, q: float) -> Gate:
        """Whether the model's latest score for the call's entity is at or above its
        running `q` quantile (never, when the model does not run)."""
        ...

    def state(self) -> dict[str, Any]:
        """What the models learned, by model id, for a snapshot (it pickles)."""
        ...

    def restore(self, saved: dict[str, Any]) -> list[str]:
        """Take up `state()` of an earlier run or load where a model's logic is
        unchanged; returns the ids of the models that kept what they learned."""
        ...

    def unlearned(self, model_id: str, max_keys: int) -> Models:
        """A new set of only `model_id` (empty if it does not run), as if just loaded."""
        ...


class NoModels:
    """Detection on rules alone: nothing to feed, nothing due, no gate opens."""

    due = math.inf

    def __len__(self) -> int:
        return 0

    def observe(
        self, calls: Iterable[Call], recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> list[ModelFinding]:
        return []

    def advance(self, now: float) -> list[ModelFinding]:
        return []

    def drop_idle(self, now: float) -> int:
        return 0

    def gate(self, model_id: str, q: float) -> Gate:
        return never_open

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, saved: dict[str, Any]) -> list[str]:
        return []

    def unlearned(self, model_id: str, max_keys: int) -> Models:
        return NoModels()
