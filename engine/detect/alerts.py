"""From findings to alerts: one per incident (suppression per rule and entity), with
evidence and a sentence a person understands.

Levels. A rule whose condition has a `warning` bar raises its alert at level `warning`
when only that bar is crossed, at `critical` when the threshold is; every other alert
(a rule without a warning, a model, the feed-silence check) is `critical`. While an
alert at `warning` holds its suppression, the same rule crossing its critical
threshold for the same entity escalates it: an `Alert` of kind `escalation` with the
same `alert_id` (and the alert's `raised_at`), `escalated_at` the event time of the
crossing, its value, the critical threshold and the evidence then. An alert escalates
at most once; its suppression is not lengthened by it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

# Alert and AlertSink are all that processes which do not detect take from here (the
# lake writer's parent in replay, the console, the outbox): what raises alerts is
# imported by detection only (summary_of where an alert is made).
if TYPE_CHECKING:
    from engine.detect.detectors import ModelFinding
    from engine.detect.evaluate import Finding

log = logging.getLogger(__name__)

# Alert ids are derived from what the alert is, so replay and live agree on them.
_ALERT_NAMESPACE = uuid.UUID("6f1c2a52-9d0e-4c55-8a57-2c1f4b0e9a11")


@dataclass(frozen=True)
class Alert:
    """A row of the `alerts` table (the contract columns) plus the rule's mode."""

    alert_id: str
    rule_id: str
    detector: str
    severity: str
    entity_type: str
    entity: str
    window_start: float
    window_end: float
    raised_at: float
    value: float
    threshold: float
    summary: str
    evidence: list[str]
    rule_version: str
    mode: str = "alert"
    # `warning` or `critical` (see the module's docstring).
    level: str = "critical"
    # `alert`, or `escalation`: the alert `alert_id` (raised before) reached `critical`
    # at `escalated_at`, with this `value`, `threshold`, `summary` and `evidence`.
    kind: str = "alert"
    escalated_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("window_start", "window_end", "raised_at", "escalated_at"):
            if data[key] is not None:
                data[key] = datetime.fromtimestamp(data[key], tz=UTC).isoformat()
        return data

    @property
    def escalation(self) -> bool:
        return self.kind == "escalation"

    @property
    def delivery_key(self) -> str:
        """What names this delivery in the outbox (one row per key): the alert's id,
        and for its escalation the id with `:escalation`, a delivery of its own."""
        return delivery_key(self.alert_id, self.kind)


def delivery_key(alert_id: str, kind: str) -> str:
    return f"{alert_id}:escalation" if kind == "escalation" else alert_id


def alert_id(source: str, entity: str, raised_at: float) -> str:
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"{source}|{entity}|{round(raised_at * 1_000_000)}"))


def _alert(
    finding: Finding | ModelFinding,
    *,
    source: str,
    detector: str,
    severity: str,
    entity_type: str,
    threshold: float,
    summary: str,
    version: str,
    mode: str,
    level: str = "critical",
) -> Alert:
    return Alert(
        alert_id=alert_id(source, finding.entity, finding.raised_at),
        rule_id=source,
        detector=detector,
        severity=severity,
        entity_type=entity_type,
        entity=finding.entity,
        window_start=finding.window_start,
        window_end=finding.window_end,
        raised_at=finding.raised_at,
        value=finding.value,
        threshold=threshold,
        summary=summary,
        evidence=list(finding.evidence),
        rule_version=version,
        mode=mode,
        level=level,
    )


class AlertManager:
    """Suppression per (rule, entity): after an alert, the same rule stays quiet for that
    entity for its suppression duration, so an incident is one alert, not one per event.
    With `suppression.new_incident_after`, a rule's finding whose window holds nothing
    from before the last finding for that entity, and that comes more than that long
    after it, is a new incident: it raises its own alert, suppression or not. A second
    burst twenty minutes after the first one ended is not hidden in the first one's
    alert; a rule reloaded with its window started anew judges an incident going on as
    the same one when it finds it again within that time."""

    def __init__(self) -> None:
        self._quiet_until: dict[tuple[str, str], float] = {}
        # The event time of the latest finding, raised or suppressed, by (rule, entity)
        # while its suppression holds.
        self._last_found: dict[tuple[str, str], float] = {}
        # The alerts raised at `warning` whose suppression holds, by (rule, entity):
        # (alert_id, raised_at), for their escalation.
        self._warned: dict[tuple[str, str], tuple[str, float]] = {}
        self.suppressed = 0

    def _open(self, source: str, entity: str, raised_at: float, quiet_for: float) -> bool:
        key = (source, entity)
        until = self._quiet_until.get(key)
        if until is not None and raised_at < until:
            self.suppressed += 1
            return False
        self._quiet_until[key] = raised_at + quiet_for
        return True

    def quiet(
        self,
        source: str,
        entity: str,
        ts: float,
        critical: bool = True,
        since: float = -math.inf,
    ) -> bool:
        """Whether `source` is quiet for `entity` at `ts` (a finding then is suppressed,
        and counted as such): asked before a finding is made, so an incident that
        goes on for hours costs no evidence lists while it is suppressed. Not quiet
        for a `critical` finding while the alert holding the suppression is at
        `warning`: that finding escalates it; nor for a new incident, one that the last
        finding came before `since` (`CompiledRule.incident_since`)."""
        key = (source, entity)
        until = self._quiet_until.get(key)
        if until is not None and ts < until:
            if self._new_incident(key, since):
                return False
            if critical and key in self._warned:
                return False
            self._last_found[key] = ts
            self.suppressed += 1
            return True
        return False

    def _new_incident(self, key: tuple[str, str], since: float) -> bool:
        last = self._last_found.get(key)
        return last is not None and since > last

    def offer(self, finding: Finding) -> Alert | None:
        """The alert a rule's finding raises, the escalation of the rule's alert at
        warning for the entity, or None (suppressed)."""
        rule = finding.rule
        spec = rule.spec
        key = (rule.id, finding.entity)
        until = self._quiet_until.get(key)
        since = rule.incident_since(finding.window_start, finding.raised_at)
        if until is not None and finding.raised_at < until and self._new_incident(key, since):
            # A new incident within the suppression of the last one: its own alert.
            del self._quiet_until[key]
            self._warned.pop(key, None)
        self._last_found[key] = finding.raised_at
        warned = self._warned.get(key)
        if warned is not None and finding.critical:
            until = self._quiet_until.get(key)
            if until is not None and finding.raised_at < until:
                del self._warned[key]
                return self._escalation(finding, *warned)
        if not self._open(rule.id, finding.entity, finding.raised_at, spec.suppression.duration):
            return None
        condition = spec.condition
        from engine.detect.rules import summary_of

        alert = _alert(
            finding,
            source=rule.id,
            detector="rule",
            severity=spec.severity,
            entity_type=spec.aggregate.entity_type,
            threshold=condition.threshold if finding.critical else condition.entry,
            summary=summary_of(finding),
            version=rule.version,
            mode=spec.mode,
            level=finding.level,
        )
        if finding.critical:
            self._warned.pop(key, None)
        else:
            self._warned[key] = (alert.alert_id, alert.raised_at)
        return alert

    def _escalation(self, finding: Finding, alert_id: str, raised_at: float) -> Alert:
        from engine.detect.rules import summary_of

        rule = finding.rule
        spec = rule.spec
        return Alert(
            alert_id=alert_id,
            rule_id=rule.id,
            detector="rule",
            severity=spec.severity,
            entity_type=spec.aggregate.entity_type,
            entity=finding.entity,
            window_start=finding.window_start,
            window_end=finding.window_end,
            raised_at=raised_at,
            value=finding.value,
            threshold=spec.condition.threshold,
            summary=summary_of(finding),
            evidence=list(finding.evidence),
            rule_version=rule.version,
            mode=spec.mode,
            level="critical",
            kind="escalation",
            escalated_at=finding.raised_at,
        )

    def offer_model(self, finding: ModelFinding) -> Alert | None:
        source = finding.model_id
        if not self._open(source, finding.entity, finding.raised_at, finding.suppression):
            return None
        return _alert(
            finding,
            source=source,
            detector="model",
            severity=finding.severity,
            entity_type=finding.entity_type,
            threshold=finding.threshold,
            summary=finding.summary,
            version=finding.version,
            mode=finding.mode,
        )

    def forget_before(self, now: float) -> None:
        expired = [key for key, until in self._quiet_until.items() if until <= now]
        for key in expired:
            del self._quiet_until[key]
            self._warned.pop(key, None)
            self._last_found.pop(key, None)


class AlertSink(Protocol):
    """Where raised alerts are delivered (engine.alerts has the sinks)."""

    def deliver(self, alerts: Sequence[Alert]) -> None: ...

    def close(self) -> None: ...
