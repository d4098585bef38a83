"""The detection pipeline: reports in event-time order -> calls -> rules -> alerts.

Deterministic: its only clock is the event time of what it is fed, so live
(the lake writer feeding it journal segments) and replay give the same alerts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from engine.core.events import CallEvent, Reject
from engine.detect.alerts import Alert, AlertManager
from engine.detect.calls import Call, CallTracker
from engine.detect.conduct import CONDUCT_KEPT, ConductLedger
from engine.detect.detectors import ModelFinding
from engine.detect.evaluate import Quiet, RuleGroup
from engine.detect.feed import FeedSilence
from engine.detect.rules import RuleSet
from engine.detect.windows import Timestamp

log = logging.getLogger(__name__)

# A C static when compiled, not a lookup in the module's namespace per report.
_CALL_EVENT: Final = CallEvent
# Idle windows and entities, and old suppressions, are let go this often (event time).
_HOUSEKEEPING_S: Final = 300.0


@dataclass
class Output:
    calls: list[Call] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.calls.extend(other.calls)
        self.alerts.extend(other.alerts)


class Pipeline:
    def __init__(
        self,
        rules: RuleSet,
        tracker: CallTracker | None = None,
        feed: FeedSilence | None = None,
    ) -> None:
        self.rules = rules
        self.tracker = tracker or CallTracker()
        self.alerts = AlertManager()
        # Its bound method, made once rather than for every call evaluated (the rules
        # ask it with a finding's level, the models without: theirs are critical).
        self._quiet: Quiet = self.alerts.quiet
        self._model_quiet: Callable[[str, str, float], bool] = self.alerts.quiet
        self.now = 0.0
        self._split_rules()
        self._last_housekeeping = 0.0
        # Whether any model runs: asked at each entry (`feed`, `advance`), so the
        # model set is looked at once per batch rather than for every report.
        self._has_models = False
        # The feed-silence check (engine.detect.feed): the event time of the latest
        # report (0: none yet), the report whose silence was alerted, and the deadline
        # worked out for the latest report (`inf` until asked). A report costs one
        # subtraction and comparison here; the deadline is worked out only once a gap
        # as long as `quiet_s` is seen.
        self.feed_silence = feed
        self._feed_quiet_s = feed.quiet_s if feed is not None else float("inf")
        self._feed_last = 0.0
        self._feed_alerted = 0.0
        self._feed_due_for = 0.0
        self._feed_due = float("inf")

    def _split_rules(self) -> None:
        self._on_call = RuleGroup([r for r in self.rules.rules if r.spec.on == "call"])
        self._on_start = RuleGroup([r for r in self.rules.rules if r.spec.on == "call_start"])
        if self.rules.conduct is not None:
            # `behaviour:` counts a caller's answered calls in progress (this tracker's).
            self.rules.conduct.tracker = self.tracker
        for rule in self.rules.rules:
            rule.watch_calls_in_progress(self.tracker)

    def swap_rules(self, rules: RuleSet) -> list[str]:
        """Put a new rule set in place whole; rules whose logic is unchanged keep their state."""
        kept = rules.adopt_state_from(self.rules)
        self.rules = rules
        self._split_rules()
        return kept

    def state(self) -> dict[str, Any]:
        """Everything detection has learned, for a snapshot (see engine.detect.snapshot)."""
        # What a rule learned across its entities (`unusual_share`'s peers), with its
        # logic; snapshots from before have no such key, and that starts cold.
        learned: dict[str, tuple[str, tuple[float, ...]]] = {}
        for rule in self.rules.rules:
            across = rule.aggregate.learned()
            if across is not None:
                learned[rule.id] = (rule.logic, across)
        return {
            "now": self.now,
            "last_housekeeping": self._last_housekeeping,
            "tracker": self.tracker,
            "alerts": self.alerts,
            "rules": {r.id: (r.logic, r.state, r.started_at) for r in self.rules.rules},
            "learned": learned,
            "models": self.rules.models.state(),
            # Callers' conduct (None: no rule has `behaviour:`); snapshots from before
            # it have no such key, and the conduct starts cold.
            "conduct": self.rules.conduct,
            "feed_last": self._feed_last,
            "feed_alerted": self._feed_alerted,
        }

    def restore(self, state: dict[str, Any]) -> list[str]:
        """Take up a snapshot's state; rules and models whose logic changed since start
        cold. Returns what was restored, for the log."""
        fresh = self.tracker
        tracker: CallTracker = state["tracker"]
        # The settings of this run apply to the restored calls.
        tracker.settle_s, tracker.ring_timeout_s = fresh.settle_s, fresh.ring_timeout_s
        tracker.max_call_s, tracker.abandon_s = fresh.max_call_s, fresh.abandon_s
        tracker.max_open_calls = fresh.max_open_calls
        self.tracker = tracker
        self.alerts = state["alerts"]
        self._quiet = self.alerts.quiet
        self._model_quiet = self.alerts.quiet
        self.now = state["now"]
        self._last_housekeeping = state["last_housekeeping"]
        # Snapshots from before the feed-silence check have no such keys.
        self._feed_last = float(state.get("feed_last", 0.0))
        self._feed_alerted = float(state.get("feed_alerted", 0.0))
        restored = []
        saved_rules = state["rules"]
        for rule in self.rules.rules:
            saved = saved_rules.get(rule.id)
            if saved is not None and saved[0] == rule.logic:
                _, kept, rule.started_at = saved
                kept.max_keys = rule.state.max_keys  # this run's setting applies
                rule.state = kept
                restored.append(rule.id)
        saved_learned = state.get("learned", {})
        for rule in self.rules.rules:
            learned = saved_learned.get(rule.id)
            if learned is not None and learned[0] == rule.logic:
                rule.aggregate.take_learned(learned[1])
        restored.extend(self.rules.models.restore(state["models"]))
        conduct, saved_conduct = self.rules.conduct, state.get("conduct")
        if conduct is not None and isinstance(saved_conduct, ConductLedger):
            conduct.take_over(saved_conduct)
            restored.append(CONDUCT_KEPT)
        self._split_rules()  # which rules have started changed
        return restored

    def feed(self, items: Iterable[CallEvent | Reject]) -> Output:
        output = Output()
        tracker = self.tracker
        models = self.rules.models
        has_models = self._has_models = len(models) > 0
        conduct = self.rules.conduct
        for item in items:
            if type(item) is not _CALL_EVENT:
                continue
            event: CallEvent = item
            ts = event.ts
            if ts - self._feed_last >= self._feed_quiet_s:
                self._feed_gap(ts, output)
            if ts > self._feed_last:
                self._feed_last = ts
            # `advance` only when something is due by the report's time: a call's
            # deadline (a late report can set one that has passed already), calls
            # evicted, a model's step, or housekeeping. Otherwise only the time moves
            # (the tracker's with the report): most reports move event time on with
            # nothing due, and `advance` does more work than the report itself.
            if ts > self.now:
                if (
                    tracker.next_due <= ts
                    or tracker.evicted
                    or (has_models and ts >= models.due)
                    or ts - self._last_housekeeping > _HOUSEKEEPING_S
                ):
                    self._advance(ts, output)
                else:
                    self.now = ts
            elif tracker.next_due <= self.now or tracker.evicted:
                self._advance(ts, output)
            # Called on the tracker, not through a bound method kept in a local:
            # compiled, that is a direct call rather than a Python one.
            started = tracker.observe(event)
            if started is not None:
                if conduct is not None:
                    # Before the rules, as for finished calls.
                    conduct.started(started)
                if self._on_start.rules:
                    self._evaluate(self._on_start, started, ts, output)
        return output

    def advance(self, now: float) -> Output:
        """Event time moves to `now`: finish calls whose time is up and evaluate them."""
        output = Output()
        self._has_models = len(self.rules.models) > 0
        self._advance(now, output)
        return output

    def _advance(self, now: float, output: Output) -> None:
        if now > self.now:
            self.now = now
        if self.now - self._feed_last >= self._feed_quiet_s:
            self._feed_gap(self.now, output)
        finished = self.tracker.advance(self.now)
        has_models = self._has_models
        models = self.rules.models if has_models else None
        conduct = self.rules.conduct
        for call in finished:
            output.calls.append(call)
            if conduct is not None:
                # Before the rules: a rule's `behaviour:` judges the caller's calls
                # with this one among them.
                conduct.observe(call)
            self._evaluate(self._on_call, call, call.deadline, output)
            if models is not None:
                # After the rules: a rule's window holds this call when the model asks
                # for the calls behind its finding.
                for model_finding in models.observe((call,), self.recent_calls, self._model_quiet):
                    self._raise_model(model_finding, output)
        if models is not None and self.now >= models.due:
            for model_finding in models.advance(self.now):
                self._raise_model(model_finding, output)
        if self.now - self._last_housekeeping > _HOUSEKEEPING_S:
            self._last_housekeeping = self.now
            for rule in self.rules.rules:
                rule.drop_idle(self.now)
            self.rules.models.drop_idle(self.now)
            if conduct is not None:
                conduct.drop_idle(self.now)
            self.alerts.forget_before(self.now)

    def _feed_gap(self, now: float, output: Output) -> None:
        """At least `quiet_s` of event time since the latest report: an alert if that
        silence reached its deadline within the expected hours by `now`."""
        feed = self.feed_silence
        last = self._feed_last
        if feed is None or last <= 0.0 or self._feed_alerted == last:
            return
        if self._feed_due_for != last:
            self._feed_due_for = last
            self._feed_due = feed.deadline(last)
        if self._feed_due > now:
            return
        self._feed_alerted = last
        output.alerts.append(feed.alert(last, self._feed_due))

    def _raise_model(self, finding: ModelFinding, output: Output) -> None:
        if self.rules.model_excepted(finding.model_id, finding.entity, finding.raised_at):
            return
        alert = self.alerts.offer_model(finding)
        if alert is not None:
            output.alerts.append(alert)

    def recent_calls(self, entity_type: str, entity: str, last: int = 200) -> list[str]:
        """The call ids the rules' windows hold for an entity, oldest first (evidence
        for a model's finding; the models themselves keep no call ids per caller)."""
        seen: dict[str, float] = {}
        for rule in self.rules.rules:
            if rule.spec.aggregate.entity_type != entity_type:
                continue
            window = rule.state.states.get(entity)
            if window is None:
                continue
            # Only each window's newest `last` entries: a window in a flood holds
            # tens of thousands, and a model may ask for every call it judges.
            entries = window.entries
            live = entries[max(window.head, len(entries) - 2 * last) :]
            for ts, call_id in zip(live[::2], live[1::2], strict=True):
                seen[call_id] = ts
        return sorted(seen, key=seen.__getitem__)[-last:]

    def _evaluate(self, group: RuleGroup, call: Call, ts: Timestamp, output: Output) -> None:
        if group.unstarted:
            group.start(ts)
        tracker, quiet = self.tracker, self._quiet
        for rule in group.selected(call):
            finding = rule.evaluate(call, ts, tracker, quiet)
            if finding is None:
                continue
            alert = self.alerts.offer(finding)
            if alert is not None:
                output.alerts.append(alert)
