"""Rules compiled for evaluation: selections tested field by field, aggregates over
each entity's sliding window, and the findings they make.

This module, the windows and the call tracker are the detection's hot path: setup.py
compiles them with mypyc where it can (see engine/detect/__init__.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, cast

from engine.detect.aggregates import (
    COMPARISONS,
    Aggregate,
    Comparison,
    Concurrent,
    Numerator,
    UnusualShare,
    aggregate,
)
from engine.detect.aggregates import comparison as comparison_of
from engine.detect.calls import Call, CallTracker, reported_until
from engine.detect.fields import (
    CLOCK_FIELDS,
    DESTINATION_SUFFIXES,
    FIELDS,
    CallField,
    SiteClock,
    entity_field,
    field_of,
)
from engine.detect.schema import Matcher, RuleSpec
from engine.detect.windows import EntityState, KeyedState, Timestamp


@dataclass(frozen=True)
class Finding:
    """A rule's condition held for an entity at a moment of event time."""

    rule: CompiledRule
    entity: str
    raised_at: float
    window_start: float
    window_end: float
    value: float
    evidence: list[str]
    # Whether the value crossed the rule's critical threshold (its only one, for a rule
    # without a warning); False: only the warning's.
    critical: bool = True

    @property
    def level(self) -> str:
        return "critical" if self.critical else "warning"


# What a condition tests, by number (see `Condition.holds`): Final, so compiled
# these are constants in the C.
IN: Final = 0
NOT_IN: Final = 1
PREFIX: Final = 2
PREFIX_NOT_EMPTY: Final = 3
NOT_PREFIX: Final = 4
LT: Final = 5
LE: Final = 6
GT: Final = 7
GE: Final = 8
EQ: Final = 9
NE: Final = 10
EMPTY: Final = 11
BETWEEN: Final = 12


def _conditions(matcher: Matcher, lists: Mapping[str, frozenset[str]]) -> list[tuple[int, Any]]:
    """(what is tested, constant), in the order tested."""
    found: list[tuple[int, Any]] = []
    if matcher.in_ is not None:
        found.append((IN, frozenset(matcher.in_)))
    if matcher.not_in is not None:
        found.append((NOT_IN, frozenset(matcher.not_in)))
    if matcher.in_list is not None:
        found.append((IN, lists[matcher.in_list]))
    if matcher.not_in_list is not None:
        found.append((NOT_IN, lists[matcher.not_in_list]))
    if matcher.prefix is not None:
        found.append((PREFIX, tuple(matcher.prefix)))
    if matcher.prefix_list is not None:
        found.append((PREFIX_NOT_EMPTY, tuple(sorted(lists[matcher.prefix_list]))))
    if matcher.not_prefix_list is not None:
        found.append((NOT_PREFIX, tuple(sorted(lists[matcher.not_prefix_list]))))
    for name, kind in (("lt", LT), ("le", LE), ("gt", GT), ("ge", GE)):
        bound = getattr(matcher, name)
        if bound is not None:
            found.append((kind, bound))
    if matcher.eq is not None:
        found.append((EQ, matcher.eq))
    if matcher.ne is not None:
        found.append((NE, matcher.ne))
    if matcher.empty is not None:
        found.append((EMPTY, matcher.empty))
    if matcher.between is not None:
        found.append((BETWEEN, (matcher.between[0], matcher.between[1])))
    return found


def _never_quiet(rule_id: str, entity: str, ts: float, critical: bool, since: float) -> bool:
    return False


# Asked before a finding is made: whether an alert of this rule for this entity would
# be suppressed at that time (engine.detect.alerts.AlertManager.quiet); `critical`:
# whether the value crossed the critical threshold (which escalates a warning alert);
# `since`: what the last finding must come before for this one to be a new incident
# (`CompiledRule.incident_since`).
Quiet = Callable[[str, str, float, bool, float], bool]
_NO_START: Final = -math.inf


# One condition of a selection: the call's field, what is tested, and the constant.
Test = tuple[str, int, Any]


def selection_tests(
    selection: Mapping[Any, Matcher], lists: Mapping[str, frozenset[str]]
) -> list[Test]:
    tests: list[Test] = []
    for name, matcher in selection.items():
        if name not in FIELDS:
            raise ValueError(f"selection on unknown field {name!r}")
        for kind, constant in _conditions(matcher, lists):
            tests.append((name, kind, constant))
    return tests


class Condition:
    """One test of one field's value. A missing number (an unanswered call's talk_s)
    never satisfies a comparison."""

    def __init__(self, field: CallField, slot: int, kind: int, constant: Any) -> None:
        self.field = field
        self.slot = slot  # where the field's value is in `Selector.values_of`
        self.kind = kind
        self.constant: Any = constant
        self.members: frozenset[object] = constant if kind in (IN, NOT_IN) else frozenset()
        prefixes: tuple[str, ...] = (
            constant if kind in (PREFIX, PREFIX_NOT_EMPTY, NOT_PREFIX) else ()
        )
        # Prefixes by length: a text's first n characters looked up once for each
        # length in use, where startswith tried every prefix in turn (a list of
        # IRSF ranges runs to thousands).
        self.prefixes = frozenset(prefixes)
        self.prefix_lengths = sorted({len(prefix) for prefix in prefixes})
        self.number: float = float(constant) if LT <= kind <= GE else 0.0
        # A text compared with a text as two strings, not two objects.
        self.text: str | None = constant if kind in (EQ, NE) and type(constant) is str else None
        self.empty = bool(constant) if kind == EMPTY else False
        # BETWEEN (hours): from `first` up to, not including, `last`; across midnight
        # when `first` is the later.
        self.first: int = int(constant[0]) if kind == BETWEEN else 0
        self.last: int = int(constant[1]) if kind == BETWEEN else 0

    def holds(self, v: Any) -> bool:
        # Exact type tests (`type(v) is str`), where isinstance walks the type's bases:
        # a call's texts are str, its numbers float or int, and a bool (`answered`) is
        # neither number nor text here, as before.
        kind = self.kind
        if kind == IN:
            return v in self.members
        if kind == NOT_IN:
            return v not in self.members
        if kind <= NOT_PREFIX:
            if type(v) is not str:
                return kind == NOT_PREFIX
            text: str = v
            if kind == PREFIX:
                return self._prefixed(text)
            if kind == PREFIX_NOT_EMPTY:
                return text != "" and self._prefixed(text)
            return not self._prefixed(text)
        if kind <= GE:
            # Two doubles compared, not two objects.
            number = type(v)
            value: float
            if number is float:
                value = v
            elif number is int:
                value = float(cast(int, v))
            else:
                return False
            if kind == LT:
                return value < self.number
            if kind == LE:
                return value <= self.number
            if kind == GT:
                return value > self.number
            return value >= self.number
        if kind <= NE:  # EQ or NE
            expected = self.text
            if expected is not None:
                equal = type(v) is str and v == expected
            else:
                equal = bool(v == self.constant)
            return equal if kind == EQ else not equal
        if kind == BETWEEN:
            if type(v) is not int:
                return False
            hour: int = v
            if self.first < self.last:
                return self.first <= hour < self.last
            return hour >= self.first or hour < self.last
        # EMPTY: whether the field is empty (no text, or none at all) is as asked.
        return (v is None or (type(v) is str and v == "")) == self.empty

    def _prefixed(self, text: str) -> bool:
        size = len(text)
        for length in self.prefix_lengths:
            if length > size:
                return False
            if text[:length] in self.prefixes:
                return True
        return False


# A field's value not read yet (see `Selector.select`).
_UNREAD: Final = object()


def _read_cost(name: str) -> int:
    """How dear a field is to read: 1 for a number's destination (a lookup in the
    numbering plans' cache, engine.detect.numbers), 0 for what the call holds."""
    return 1 if name.endswith(DESTINATION_SUFFIXES) else 0


class Selector(Numerator):
    """Which of several rules a call's fields select (each rule's tests all hold),
    tested in compiled code: each field a test reads is read at most once per call,
    and only when a test needs it; the rules whose tests hold are returned together."""

    def __init__(self, rules: list[tuple[Any, list[Test]]], clock: SiteClock | None = None) -> None:
        # Only the fields some test reads (in the order of FIELDS): the local-time fields
        # (`hour`, `weekday`, read in `clock`'s zone) too, and then only when a rule
        # tests them.
        used = {name for _, tests in rules for name, _, _ in tests}
        self.fields: list[str] = [name for name in FIELDS if name in used]
        self.readers: list[CallField] = [field_of(name, clock) for name in self.fields]
        slot = {name: index for index, name in enumerate(self.fields)}
        self.rules: list[Any] = [rule for rule, _ in rules]
        # Each rule's tests, those of the fields the call holds before a number's
        # destination (a stable sort: otherwise in the rule's order). Every test is
        # pure and a rule takes a call when all hold, so the order changes no choice;
        # a call the cheaper tests turn away never has its destinations read.
        self.conditions: list[list[Condition]] = [
            [
                Condition(self.readers[slot[name]], slot[name], kind, constant)
                for name, kind, constant in sorted(tests, key=lambda test: _read_cost(test[0]))
            ]
            for _, tests in rules
        ]
        self.unread: list[object] = [_UNREAD] * len(self.fields)

    def values_of(self, call: Call) -> list[object]:
        return [reader.read(call) for reader in self.readers]

    def select(self, values: list[object], call: Call | None = None) -> list[Any]:
        """The rules whose tests all hold for these values (as `values_of` gives them).
        With `call`, a value that is `_UNREAD` (`choose` starts with all of them so) is
        read from the call when a test first needs it."""
        found: list[Any] = []
        readers = self.readers
        for index, conditions in enumerate(self.conditions):
            for condition in conditions:
                slot = condition.slot
                value = values[slot]
                if value is _UNREAD and call is not None:
                    value = readers[slot].read(call)
                    values[slot] = value
                if not condition.holds(value):
                    break
            else:
                found.append(self.rules[index])
        return found

    def choose(self, call: Call) -> list[Any]:
        """The rules whose tests all hold for the call, each field read only when a test
        needs it: a field the rules that read it never reach is not read."""
        return self.select(self.unread.copy(), call)

    def takes(self, call: Call) -> bool:
        """For a selector of one rule: whether it selects the call. Each condition in
        turn, stopping at the first that fails, and no lists made: a ratio rule asks
        this of every call it counts."""
        for condition in self.conditions[0]:
            value = condition.field.read(call)
            if not condition.holds(value):
                return False
        return True


def compile_selection(
    selection: Mapping[Any, Matcher],
    lists: Mapping[str, frozenset[str]],
    clock: SiteClock | None = None,
) -> Selector:
    """A selector of one rule: `takes(call)` tests every condition in turn, stopping
    at the first that fails."""
    return Selector([(True, selection_tests(selection, lists))], clock)


# Each aggregate keeps only what it needs per entity (see engine.detect.aggregates):
# with a million tracked callers a few unused slots per state add up to a hundred
# megabytes.


class CompiledRule:
    """A rule ready to evaluate, with its per-entity state."""

    def __init__(
        self,
        spec: RuleSpec,
        lists: Mapping[str, frozenset[str]],
        *,
        source: str,
        version: str,
        max_keys: int,
        clock: SiteClock | None = None,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.source = source
        self.version = version
        # The site's time zone the local-time fields are read in (one for the rule set).
        self.clock = clock or SiteClock()
        self.logic = _logic_hash(spec, self.clock)
        self.tests = selection_tests(spec.selection, lists)
        self.entity_field = entity_field(spec.aggregate.entity_names)
        # The bar a finding is made at (the warning's, when there is one) ...
        self.condition: Comparison = comparison_of(spec.condition)
        # ... and, with a warning, the critical one a finding's level is judged by.
        self.critical: Comparison | None = (
            None
            if spec.condition.warning is None
            else COMPARISONS[spec.condition.op](spec.condition.threshold)
        )
        numerator = compile_selection(spec.aggregate.numerator or {}, lists, self.clock)
        self.aggregate: Aggregate = aggregate(spec.aggregate, self.condition, numerator)
        # The calls in progress are the call tracker's to know: a `concurrent` rule
        # keeps no window (see `_concurrent`).
        self.in_progress: Concurrent | None = (
            self.aggregate if isinstance(self.aggregate, Concurrent) else None
        )
        # The rule's selection, for the calls in progress an aggregate that `settles`
        # is told of (as if they ended now).
        self.selector: Selector | None = (
            compile_selection(spec.selection, lists, self.clock) if self.aggregate.settles else None
        )
        self.new_incident_after: float | None = spec.suppression.new_incident_after
        self.window_s = self.aggregate.window_s
        # How far behind an entity's place in the least-recently-used order may fall
        # before a call moves it to the end (see `evaluate`).
        self.touch_s = self.window_s / 8
        # Until when (event time, exclusive) each excepted entity raises nothing: the
        # rule's inline exceptions (an `expires` date holds through its day, UTC), and
        # those of the exception files (`except_entity`), the longest one per entity.
        self.excepted_until: dict[str, float] = {}
        for exception in spec.exceptions:
            until = _day_after(exception.expires)
            for value in exception.values:
                self.except_entity(value, until)
            for value in lists[exception.list_] if exception.list_ else ():
                self.except_entity(value, until)
        self.state: KeyedState[EntityState] = KeyedState(max_keys)
        # Set by the rule set when the rule has a `model:` or `behaviour:` condition.
        self.gate: Callable[[Call], bool] | None = None
        # A gate asked before the measure rather than after it (the rule set puts a
        # `behaviour:` here for a `distinct` count, whose measure makes a set of the
        # window's values, and for `concurrent`, which lists the calls in progress,
        # while the gate is a lookup): measuring changes nothing, so the order changes
        # no finding.
        self.pregate: Callable[[Call], bool] | None = None

    @property
    def started_at(self) -> float | None:
        """When the rule took its first call (None: not yet; `RuleGroup.start`)."""
        return self.aggregate.started_at

    @started_at.setter
    def started_at(self, ts: float | None) -> None:
        self.aggregate.started_at = ts

    def incident_since(self, start: float, ts: float) -> float:
        """What a finding at `ts` whose window begins at `start` must come after for
        it to be a new incident (`suppression.new_incident_after`; -inf: never)."""
        after = self.new_incident_after
        if after is None:
            return _NO_START
        return min(start, ts - after)

    def watch_calls_in_progress(self, tracker: CallTracker) -> None:
        """A share of a menu's answered calls counts its peers' answered calls still in
        progress as calls that are no hit: the tracker counts them per menu. After a
        start the calls that have ended are the short ones first (the long ones end
        minutes later): by them alone, the peers' share of short calls was several
        times what it settles at in the first minutes, and nearly twice ten minutes
        in (0.29 at one minute, 0.07 at ten, 0.04 at an hour on one site). A spread
        burst then hid in it."""
        aggregate = self.aggregate
        if (
            isinstance(aggregate, UnusualShare)
            and self.spec.aggregate.entity_names == ("menu",)
            and self.tests == [("outcome", EQ, "answered")]
        ):
            aggregate.in_progress = tracker

    def entity_of(self, call: Call) -> str:
        return self.entity_field.text(call)

    def adopt_state(self, other: CompiledRule) -> None:
        """Keep the window state of the rule this one replaces (its logic is unchanged)."""
        self.state = other.state
        self.started_at = other.started_at
        learned = other.aggregate.learned()
        if learned is not None:
            self.aggregate.take_learned(learned)

    def except_entity(self, entity: str, until: float) -> None:
        """`entity` raises nothing before event time `until` (inf: ever)."""
        if until > self.excepted_until.get(entity, -math.inf):
            self.excepted_until[entity] = until

    def excepted(self, entity: str, ts: float) -> bool:
        until = self.excepted_until.get(entity)
        return until is not None and ts < until

    def evaluate(
        self,
        call: Call,
        ts: Timestamp,
        tracker: CallTracker,
        quiet: Quiet = _never_quiet,
    ) -> Finding | None:
        """The finding a call this rule selects makes, if any (`RuleGroup.selected`
        says which rules select a call, and starts them). `quiet(rule_id, entity, ts,
        critical, since)` says whether an alert would be suppressed: the window still
        takes the call, but no finding (scan of open calls, evidence) is made for a
        quiet entity."""
        entity = self.entity_of(call)
        if not entity:
            return None
        in_progress = self.in_progress
        if in_progress is not None:
            return self._concurrent(in_progress, call, entity, ts, tracker, quiet)
        # The entity's state. Its `last_ts` is when it was last put at the most
        # recently used end, not when last used: it is moved there again (taken out
        # and put back) only once that is more than `touch_s` ago, so the order of the
        # keys is least-recently-used to within `touch_s`, and most calls of a busy
        # entity cost one lookup rather than a removal and an insertion.
        # `drop_idle` allows for the lag. Inlined: this runs for every selected call
        # of every rule.
        # The time as a double for the arithmetic below (on the object, each step was
        # a generic operation and a new float); the object itself goes into the window.
        now: float = ts
        aggregate = self.aggregate
        keyed = self.state
        states = keyed.states
        state = states.get(entity)
        if state is None:
            state = aggregate.new_state(now)
            state.last_ts = now
            keyed.put(entity, state)
        elif now - state.last_ts > self.touch_s:
            del states[entity]
            states[entity] = state
            state.last_ts = now
        if not aggregate.add(state, call, ts):
            return None
        if state.leave_until(now - self.window_s):
            # A busy entity's window: bounded whatever its rate (engine.detect.windows).
            aggregate.fold(state)
        pregate = self.pregate
        if pregate is not None and not pregate(call):
            return None
        measured = aggregate.measure(state, call)
        if measured is None or not self.condition.holds(measured):
            return None
        selector = self.selector
        if selector is not None:
            # As of when the judged call ended: the calls finished before it ended then
            # too, and what the switch reported since is not yet known in every run (a
            # replay cut there and resumed from a snapshot judges as one that was not).
            until = reported_until(call, now)
            ended, talking = self._answered_in_progress(entity, until, tracker, selector)
            measured = aggregate.settled(state, call, measured, ended, talking)
            if not self.condition.holds(measured):
                return None
        critical_bar = self.critical
        critical = critical_bar is None or critical_bar.holds(measured)
        start = state.start() or ts
        since = self.incident_since(start, ts)
        if quiet(self.id, entity, ts, critical, since) or self.excepted(entity, ts):
            return None
        if self.gate is not None and not self.gate(call):
            return None
        evidence = aggregate.evidence(state)
        return Finding(self, entity, ts, start, ts, measured, evidence, critical)

    def _answered_in_progress(
        self, entity: str, now: float, tracker: CallTracker, selector: Selector
    ) -> tuple[list[Call], list[Call]]:
        """The entity's answered calls not finished yet that the rule selects, as the
        reports up to `now` tell them: those whose Bye came, and those still going on,
        each as if it ended now. Asked only when a measure holds, so a scan of the calls
        in progress is rare."""
        since = now - self.window_s
        ended: list[Call] = []
        talking: list[Call] = []
        for ongoing in tracker.open.values():
            answered_at = ongoing.answered_at
            if answered_at is None or answered_at < since or answered_at > now:
                continue
            if self.entity_of(ongoing) != entity:
                continue
            ended_at = ongoing.ended_at
            over = ended_at is not None and answered_at <= ended_at <= now
            as_ended = Call(
                ongoing.call_id,
                ongoing.caller,
                ongoing.callee,
                ongoing.forward,
                ongoing.menu_id,
                ongoing.menu_name,
                ongoing.started_at,
                ongoing.ringing_at,
                ongoing.ring_code,
                answered_at,
                ongoing.answer_serial,
                ended_at if over else now,
                ongoing.end_serial,
                ongoing.last_at,
                ongoing.reports,
                "answered",
                ongoing.deadline,
                ongoing.switch,
            )
            if selector.takes(as_ended):
                (ended if over else talking).append(as_ended)
        return ended, talking

    def _concurrent(
        self,
        in_progress: Concurrent,
        call: Call,
        entity: str,
        ts: float,
        tracker: CallTracker,
        quiet: Quiet,
    ) -> Finding | None:
        if not in_progress.may_hold(tracker, entity):
            return None
        pregate = self.pregate
        if pregate is not None and not pregate(call):
            return None
        # Whether the count could reach the critical bar: an alert at warning then
        # may still escalate, so a quiet entity is asked about at that level.
        critical_bar = self.critical
        could_escalate = critical_bar is None or critical_bar.may_hold_up_to(
            float(tracker.open_count(entity))
        )
        # Calls in progress: no new incident within the suppression (which calls a
        # finding holds is known only once they are listed; see the rule's schema).
        if quiet(self.id, entity, ts, could_escalate, _NO_START):
            return None
        live = in_progress.in_progress(tracker, entity, ts, call)
        value = float(len(live))
        if not self.condition.holds(value) or self.excepted(entity, ts):
            return None
        critical = critical_bar is None or critical_bar.holds(value)
        if not critical and quiet(self.id, entity, ts, False, _NO_START):
            return None
        if self.gate is not None and not self.gate(call):
            return None
        start = min(c.started_at for c in live) if live else ts
        evidence = [c.call_id for c in reversed(live[:200])]
        return Finding(self, entity, ts, start, ts, value, evidence, critical)

    def drop_idle(self, now: float) -> int:
        """Forget entities quiet for longer than their aggregate keeps them."""
        # An entity's last use may be up to `touch_s` after its `last_ts` (see
        # `evaluate`): only one whose window is surely empty goes.
        keep = self.aggregate.keep_s + self.touch_s
        # The keys' order is least recently used first (see `evaluate`): walked from
        # the front until one is in use. A loop over typed states here, not a
        # predicate handed to KeyedState.drop_idle (a Python call per key).
        cutoff = now - keep
        states = self.state.states
        idle: list[Hashable] = []
        for entity, state in states.items():
            if state.last_ts >= cutoff:
                break
            idle.append(entity)
        for entity in idle:
            del states[entity]
        return len(idle)


class RuleGroup:
    """The rules that watch one kind of fact (finished calls, or calls starting), with
    one selector that returns those whose selection takes a call: most rules select
    few calls, and asking each rule in turn cost a method call per rule per call."""

    def __init__(self, rules: list[CompiledRule]) -> None:
        self.rules = rules
        # Rules that have not seen a call yet; each starts at the first it is asked about.
        self.unstarted = [rule for rule in rules if rule.started_at is None]
        # The rules of a set share one site clock (engine.detect.rules.load_rules).
        clock = rules[0].clock if rules else None
        self.selector = Selector([(rule, rule.tests) for rule in rules], clock)

    def selected(self, call: Call) -> list[CompiledRule]:
        return self.selector.choose(call)

    def start(self, ts: float) -> None:
        for rule in self.unstarted:
            if rule.started_at is None:
                rule.started_at = ts
        self.unstarted = []


def _day_after(expires: date | None) -> float:
    """The event time an inline exception stops at: the midnight (UTC) after `expires`."""
    if expires is None or expires == date.max:
        return math.inf  # the last day there is: it never ends
    following = expires + timedelta(days=1)
    return datetime(following.year, following.month, following.day, tzinfo=UTC).timestamp()


def _logic_hash(spec: RuleSpec, clock: SiteClock) -> str:
    logic: dict[str, Any] = {
        "on": spec.on,
        "selection": spec.selection,
        "aggregate": spec.aggregate,
        "model": spec.model,
    }
    numerator = spec.aggregate.numerator or {}
    if any(name in CLOCK_FIELDS for name in [*spec.selection, *numerator]):
        # The calls such a rule takes depend on the site's time zone too.
        logic["timezone"] = str(clock.zone)
    text = json.dumps(
        json.loads(
            json.dumps(logic, default=lambda o: o.model_dump(by_alias=True, exclude_none=True))
        ),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
