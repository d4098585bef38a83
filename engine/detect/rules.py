"""YAML rules: a strict schema, loading with file:line errors, and compiled evaluators.

One rule per file in `rules/`, shared lists in `rules/lists/`. A rule says which
facts it watches (`on: call` for finished calls, `on: call_start` for a call's
first report), which of them count (`selection`), how they add up per entity
over a sliding event-time window (`aggregate`), when that is an alert
(`condition`), how long to stay quiet afterwards per entity (`suppression`),
and which entities never alert (`exceptions`). Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from engine.detect.calls import Call
from engine.detect.windows import EwBaseline, KeyedState, SlidingWindow, ValueWindow
from engine.simulator.calls import Duration
from engine.yamlfile import YamlDocument, YamlFileError, parse_file, parse_files_with_ids
from models.registry import ModelSet, build_models, load_model_specs, models_dir
from models.spec import ModelSpec

FieldName = Literal[
    "caller",
    "callee",
    "forward",
    "menu_id",
    "menu_name",
    "outcome",
    "ring_s",
    "talk_s",
    "answered",
    "ring_code",
]
ENTITY_FIELDS = {"caller": "caller", "menu": "menu_id", "forward": "forward", "callee": "callee"}
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Matcher(_Strict):
    """Conditions on one field; all given must hold."""

    in_: list[str | int | float | bool] | None = Field(default=None, alias="in")
    not_in: list[str | int | float | bool] | None = None
    in_list: str | None = None
    not_in_list: str | None = None
    prefix: list[str] | None = None
    prefix_list: str | None = None
    not_prefix_list: str | None = None
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    eq: str | int | float | bool | None = None
    ne: str | int | float | bool | None = None
    empty: bool | None = None


def _matcher(value: Any) -> Any:
    # A bare value means equality: `outcome: answered`.
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {"in": value}
    return {"eq": value}


Selection = dict[
    FieldName,
    Annotated[Matcher, BeforeValidator(_matcher)],
]


class Aggregate(_Strict):
    type: Literal[
        "count",
        "distinct",
        "sum",
        "ratio",
        "baseline_spike",
        "first_seen",
        "sequential",
        "concurrent",
    ]
    group_by: Literal["caller", "menu", "forward", "callee"]
    window: Duration | None = None
    field: Literal["caller", "callee", "forward", "menu_id", "ring_s", "talk_s"] | None = None
    numerator: Selection | None = None
    min_volume: int = Field(default=1, ge=1)
    baseline_alpha: float = Field(default=0.2, gt=0, le=1)
    baseline_warmup: int = Field(default=6, ge=1)
    new_for: Duration | None = None
    warmup: Duration = 3600.0
    max_step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Aggregate:
        if self.type != "concurrent" and not self.window:
            raise ValueError(f"aggregate type {self.type} needs a window")
        if self.type in ("distinct", "sum") and self.field is None:
            raise ValueError(f"aggregate type {self.type} needs a field")
        if self.type == "sum" and self.field not in ("ring_s", "talk_s"):
            raise ValueError("sum needs a numeric field (ring_s or talk_s)")
        if self.type == "ratio" and not self.numerator:
            raise ValueError("aggregate type ratio needs a numerator selection")
        if self.type == "first_seen" and not self.new_for:
            raise ValueError("aggregate type first_seen needs new_for (how long a key is new)")
        if self.type == "sequential" and self.group_by != "caller":
            raise ValueError("sequential dialling is grouped by caller")
        return self


class Condition(_Strict):
    op: Literal[">=", ">", "<=", "<"] = ">="
    threshold: float


class Suppression(_Strict):
    duration: Duration = 1800.0


class ExceptionRule(_Strict):
    name: str = Field(min_length=1)
    values: list[str] = Field(default_factory=list)
    list_: str | None = Field(default=None, alias="list")
    reason: str = Field(min_length=1)
    expires: date | None = None

    @model_validator(mode="after")
    def _check(self) -> ExceptionRule:
        if not self.values and not self.list_:
            raise ValueError("an exception needs values or a list")
        return self


class TestCalls(_Strict):
    """A series of calls for an inline test: `repeat` calls, `every` seconds apart."""

    at: Duration = 0.0
    every: Duration = 60.0
    repeat: int = Field(default=1, ge=1, le=10_000)
    caller: str = "8613800000001"
    callee: str = "4008001000"
    callee_step: int = 0
    forward: str = ""
    menu_id: str = "1"
    menu_name: str = "Main menu"
    ring: Duration = 3.0
    talk: Duration = 60.0
    answered: bool = True
    hangup: bool = True


class TestExpect(_Strict):
    entity: str
    min_alerts: int = Field(default=1, ge=1)


class ModelGate(_Strict):
    """The rule fires only while a model's latest score for the call's caller or menu
    (the model's kind decides which) is above a running quantile of its scores."""

    model: str = Field(min_length=1)
    above_quantile: float = Field(gt=0.5, lt=1)


class RuleTest(_Strict):
    name: str = Field(min_length=1)
    calls: list[TestCalls] = Field(min_length=1)
    expect: list[TestExpect] = Field(default_factory=list)


class RuleSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    title: str = Field(min_length=1)
    description: str = ""
    severity: Literal["low", "medium", "high", "critical"]
    status: Literal["experimental", "stable", "deprecated"] = "experimental"
    mode: Literal["alert", "shadow"] = "alert"
    tags: list[str] = Field(default_factory=list)
    on: Literal["call", "call_start"] = "call"
    selection: Selection = Field(default_factory=dict)
    aggregate: Aggregate
    condition: Condition
    model: ModelGate | None = None
    suppression: Suppression = Field(default_factory=Suppression)
    exceptions: list[ExceptionRule] = Field(default_factory=list)
    summary: str | None = None
    tests: list[RuleTest] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> RuleSpec:
        if self.aggregate.type == "concurrent" and self.on != "call_start":
            raise ValueError("concurrent calls are counted on call_start")
        window = self.aggregate.window or 0.0
        if self.suppression.duration < window:
            raise ValueError(
                f"suppression ({self.suppression.duration:.0f} s) is shorter than the window "
                f"({window:.0f} s): one incident would raise several alerts"
            )
        return self


class ListSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    description: str = ""
    values: list[str] = Field(min_length=1)


# -- evaluation ---------------------------------------------------------------------------


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


# Each condition of a matcher as a Python expression on `v` (the field's value), the
# names c0, c1, ... standing for its constants. A missing number (an unanswered call's
# talk_s) never satisfies a comparison; every expression is a bool.
_NUMBER = "isinstance(v, (int, float)) and not isinstance(v, bool) and "


def _conditions(matcher: Matcher, lists: Mapping[str, frozenset[str]]) -> list[tuple[str, object]]:
    """(expression with `{c}` where its constant goes, constant), in the order tested."""
    found: list[tuple[str, object]] = []
    if matcher.in_ is not None:
        found.append(("v in {c}", frozenset(matcher.in_)))
    if matcher.not_in is not None:
        found.append(("v not in {c}", frozenset(matcher.not_in)))
    if matcher.in_list is not None:
        found.append(("v in {c}", lists[matcher.in_list]))
    if matcher.not_in_list is not None:
        found.append(("v not in {c}", lists[matcher.not_in_list]))
    if matcher.prefix is not None:
        found.append(("isinstance(v, str) and v.startswith({c})", tuple(matcher.prefix)))
    if matcher.prefix_list is not None:
        found.append(
            (
                'isinstance(v, str) and v != "" and v.startswith({c})',
                tuple(sorted(lists[matcher.prefix_list])),
            )
        )
    if matcher.not_prefix_list is not None:
        found.append(
            (
                "not (isinstance(v, str) and v.startswith({c}))",
                tuple(sorted(lists[matcher.not_prefix_list])),
            )
        )
    for name, op in (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")):
        bound = getattr(matcher, name)
        if bound is not None:
            found.append((_NUMBER + "v " + op + " {c}", bound))
    if matcher.eq is not None:
        found.append(("v == {c}", matcher.eq))
    if matcher.ne is not None:
        found.append(("v != {c}", matcher.ne))
    if matcher.empty is not None:
        found.append(("(v in ('', None)) == {c}", matcher.empty))
    return found


def _always(call: Call) -> bool:
    return True


def _never_quiet(rule_id: str, entity: str, ts: float) -> bool:
    return False


_CALL_FIELDS = frozenset(FieldName.__args__)  # type: ignore[attr-defined]

# One condition of a selection: the call's field, an expression on its value `v` with
# `{c}` where the constant goes, and the constant.
Test = tuple[str, str, object]


def selection_tests(
    selection: Mapping[Any, Matcher], lists: Mapping[str, frozenset[str]]
) -> list[Test]:
    tests: list[Test] = []
    for name, matcher in selection.items():
        if name not in _CALL_FIELDS:
            raise ValueError(f"selection on unknown field {name!r}")
        for expression, constant in _conditions(matcher, lists):
            tests.append((name, expression, constant))
    return tests


def _generated(source: list[str], namespace: dict[str, Any], name: str) -> Any:
    """A function from generated source. Selections are written out as Python: they
    run for every rule on every call, and a loop over one closure per condition cost
    four times as much as the same tests written out. Only field names (checked
    against the schema's) and placeholders go into the source; every value from a
    rule file is a constant in `namespace`."""
    exec(compile("\n".join(source), f"<rule {name}>", "exec"), namespace)
    return namespace[name]


def _tests_source(
    tests: list[Test], constants: dict[str, object], indent: str, *, nested: bool
) -> tuple[list[str], str]:
    """Source testing `tests` in order: nested `if`s (the last indent is where code
    runs when all hold), or guard clauses returning False."""
    lines: list[str] = []
    field_loaded = None
    for name, expression, constant in tests:
        if name != field_loaded:
            lines.append(f"{indent}v = call.{name}")
            field_loaded = name
        placeholder = f"c{len(constants)}"
        constants[placeholder] = constant
        test = expression.format(c=placeholder)
        if nested:
            lines.append(f"{indent}if {test}:")
            indent += "    "
        else:
            lines.append(f"{indent}if not ({test}):")
            lines.append(f"{indent}    return False")
    return lines, indent


def compile_selection(
    selection: Mapping[Any, Matcher], lists: Mapping[str, frozenset[str]]
) -> Callable[[Call], bool]:
    """One function testing every condition in turn, stopping at the first that fails."""
    tests = selection_tests(selection, lists)
    if not tests:
        return _always
    constants: dict[str, object] = {}
    body, _ = _tests_source(tests, constants, "    ", nested=False)
    source = ["def match(call):", *body, "    return True"]
    match: Callable[[Call], bool] = _generated(source, dict(constants), "match")
    return match


def _list_references(spec: RuleSpec) -> list[str]:
    names = []
    selections = [spec.selection, spec.aggregate.numerator or {}]
    for selection in selections:
        for matcher in selection.values():
            for ref in (
                matcher.in_list,
                matcher.not_in_list,
                matcher.prefix_list,
                matcher.not_prefix_list,
            ):
                if ref:
                    names.append(ref)
    names.extend(e.list_ for e in spec.exceptions if e.list_)
    return names


class _CountState(SlidingWindow):
    """One entity's state for a rule that counts: its window and when it last counted."""

    __slots__ = ("last_ts",)

    def __init__(self, length: float) -> None:
        super().__init__(length)
        self.last_ts = 0.0


class _ValueState(ValueWindow):
    """For sum, ratio and distinct: a window whose entries carry values."""

    __slots__ = ("last_ts",)

    def __init__(self, length: float) -> None:
        super().__init__(length)
        self.last_ts = 0.0


class _SpikeState(_CountState):
    __slots__ = ("baseline",)

    def __init__(self, length: float, alpha: float) -> None:
        super().__init__(length)
        self.baseline = EwBaseline(length, alpha)


class _FirstSeenState(_CountState):
    __slots__ = ("first_seen",)

    def __init__(self, length: float, first_seen: float) -> None:
        super().__init__(length)
        self.first_seen = first_seen


class _SequentialState(_CountState):
    __slots__ = ("last_callee", "run")

    def __init__(self, length: float) -> None:
        super().__init__(length)
        self.last_callee: int | None = None
        self.run = 0


# Each aggregate keeps only what it needs per entity: with a million tracked callers
# a few unused slots per state add up to a hundred megabytes.
_KeyState = _CountState | _ValueState


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
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.source = source
        self.version = version
        self.logic = _logic_hash(spec)
        self.tests = selection_tests(spec.selection, lists)
        aggregate = spec.aggregate
        self.numerator = compile_selection(aggregate.numerator or {}, lists)
        self.entity_field = ENTITY_FIELDS[aggregate.group_by]
        self.window_s = aggregate.window or 0.0
        self.compare = OPS[spec.condition.op]
        self.threshold = spec.condition.threshold
        self.exceptions: list[tuple[frozenset[str], date | None]] = [
            (frozenset(e.values) | (lists[e.list_] if e.list_ else frozenset()), e.expires)
            for e in spec.exceptions
        ]
        self.state: KeyedState[_KeyState] = KeyedState(max_keys)
        # The aggregate, read once here rather than from the spec on every call.
        self.kind = aggregate.type
        self.min_volume = aggregate.min_volume
        self.spike = self.kind == "baseline_spike"
        self.concurrent = self.kind == "concurrent"
        # The value a window entry carries: a field (distinct, sum), whether the
        # numerator selects the call (ratio), or nothing.
        self.item_field = aggregate.field if self.kind in ("distinct", "sum") else None
        self.ratio = self.kind == "ratio"
        self._measure: Callable[[Any, Call], float | None] = getattr(
            self, "_" + ("count" if self.kind == "concurrent" else self.kind)
        )
        self.started_at: float | None = None
        # Set by the rule set when the rule has a `model:` condition.
        self.gate: Callable[[Call], bool] | None = None

    def adopt_state(self, other: CompiledRule) -> None:
        """Keep the window state of the rule this one replaces (its logic is unchanged)."""
        self.state = other.state
        self.started_at = other.started_at

    def excepted(self, entity: str, ts: float) -> bool:
        today = datetime.fromtimestamp(ts, tz=UTC).date() if self.exceptions else None
        for values, expires in self.exceptions:
            if entity in values and (expires is None or (today is not None and today <= expires)):
                return True
        return False

    def _new_state(self, ts: float) -> _KeyState:
        kind = self.kind
        length = self.window_s
        if kind in ("sum", "ratio", "distinct"):
            return _ValueState(length)
        if kind == "baseline_spike":
            return _SpikeState(length, self.spec.aggregate.baseline_alpha)
        if kind == "first_seen":
            return _FirstSeenState(length, ts)
        if kind == "sequential":
            return _SequentialState(length)
        return _CountState(length)

    def evaluate(
        self,
        call: Call,
        ts: float,
        open_calls: Callable[[str, float], list[Call]],
        quiet: Callable[[str, str, float], bool] = _never_quiet,
    ) -> Finding | None:
        """The finding a call this rule selects makes, if any (`RuleGroup.selected`
        says which rules select a call, and starts them). `quiet(rule_id, entity, ts)`
        says whether an alert would be suppressed: the window still takes the call,
        but no finding (scan of open calls, evidence) is made for a quiet entity."""
        entity = getattr(call, self.entity_field)
        if not entity:
            return None
        if self.concurrent:
            return self._concurrent(call, entity, ts, open_calls, quiet)
        # The entity's state, made the most recently used (KeyedState.get, inlined:
        # this runs for every selected call of every rule).
        keyed = self.state
        states = keyed.states
        state = states.pop(entity, None)
        if state is None:
            state = self._new_state(ts)
            keyed.put(entity, state)
        else:
            states[entity] = state
        state.last_ts = ts
        item: object = None
        if self.item_field is not None:
            item = getattr(call, self.item_field)
            if item is None:
                return None
        elif self.ratio:
            item = bool(self.numerator(call))
        if self.spike:
            state.baseline.observe(ts)  # type: ignore[union-attr]
        state.add(ts, call.call_id, item)
        state.expire(ts)
        measured = self._measure(state, call)
        if measured is None or not self.compare(measured, self.threshold):
            return None
        if quiet(self.id, entity, ts) or self.excepted(entity, ts):
            return None
        if self.gate is not None and not self.gate(call):
            return None
        start = state.start() or ts
        return Finding(self, entity, ts, start, ts, measured, state.live_call_ids())

    def _concurrent(
        self,
        call: Call,
        entity: str,
        ts: float,
        open_calls: Callable[[str, float], list[Call]],
        quiet: Callable[[str, str, float], bool],
    ) -> Finding | None:
        # In progress right now, from the call tracker's open calls (no counters to
        # drift); with a window, only those that started within it.
        if quiet(self.id, entity, ts):
            return None
        since = ts - self.window_s if self.window_s else float("-inf")
        live = open_calls(entity, since)
        value = float(len(live))
        if not self.compare(value, self.threshold) or self.excepted(entity, ts):
            return None
        if self.gate is not None and not self.gate(call):
            return None
        start = min(c.started_at for c in live) if live else ts
        evidence = [c.call_id for c in reversed(live[:200])]
        return Finding(self, entity, ts, start, ts, value, evidence)

    # What each aggregate measures once the call is in the window; None: not yet
    # enough to judge.

    def _count(self, state: _KeyState, call: Call) -> float | None:
        return float(len(state))

    def _distinct(self, state: _ValueState, call: Call) -> float | None:
        return float(state.distinct())

    def _sum(self, state: _ValueState, call: Call) -> float | None:
        return state.total

    def _ratio(self, state: _ValueState, call: Call) -> float | None:
        total = len(state)
        if total < self.min_volume:
            return None
        return state.hits / total

    def _baseline_spike(self, state: _SpikeState, call: Call) -> float | None:
        baseline = state.baseline
        count = len(state)
        if baseline.buckets < self.spec.aggregate.baseline_warmup or count < self.min_volume:
            return None
        return count / max(baseline.mean, 1.0)

    def _first_seen(self, state: _FirstSeenState, call: Call) -> float | None:
        aggregate = self.spec.aggregate
        started = self.started_at or 0.0
        first_seen = state.first_seen
        if first_seen < started + aggregate.warmup:
            return None  # seen while the rule was still learning what is normal
        if (state.last_time() or first_seen) - first_seen > (aggregate.new_for or 0.0):
            return None
        return float(len(state))

    def _sequential(self, state: _SequentialState, call: Call) -> float | None:
        # A run of callees each one step (at most max_step) beyond the last, in one
        # direction and never back: a scan. Alternating between two neighbouring IVR
        # numbers (a busy trunk's pattern) is no run.
        try:
            callee = int(call.callee)
        except ValueError:
            state.run, state.last_callee = 0, None
            return 0.0
        previous = state.last_callee
        step = 0 if previous is None else callee - previous
        direction = 1 if step > 0 else -1
        if (
            step
            and abs(step) <= self.spec.aggregate.max_step
            and (state.run == 0 or direction * state.run > 0)
        ):
            state.run += direction
        else:
            state.run = 0
        state.last_callee = callee
        return float(abs(state.run) + 1 if state.run else 0)

    def drop_idle(self, now: float) -> int:
        """Forget entities quiet for longer than the window (first_seen keeps them longer)."""
        keep = self.window_s
        if self.spec.aggregate.type == "first_seen":
            keep = max(keep, 30 * 86400.0)
        elif self.spec.aggregate.type == "baseline_spike":
            keep = max(keep * 50, 86400.0)
        return self.state.drop_idle(lambda s: s.last_ts < now - keep)


class RuleGroup:
    """The rules that watch one kind of fact (finished calls, or calls starting), with
    one generated function that returns those whose selection takes a call: asking
    each rule in turn cost a method call per rule per call, and most rules select
    few calls."""

    def __init__(self, rules: list[CompiledRule]) -> None:
        self.rules = rules
        # Rules that have not seen a call yet; each starts at the first it is asked about.
        self.unstarted = [rule for rule in rules if rule.started_at is None]
        constants: dict[str, object] = {}
        source = ["def selected(call):", "    found = []"]
        for index, rule in enumerate(rules):
            body, indent = _tests_source(rule.tests, constants, "    ", nested=True)
            source.extend(body)
            source.append(f"{indent}found.append(r{index})")
        source.append("    return found")
        namespace: dict[str, Any] = dict(constants)
        namespace.update((f"r{index}", rule) for index, rule in enumerate(rules))
        self.selected: Callable[[Call], list[CompiledRule]] = _generated(
            source, namespace, "selected"
        )

    def start(self, ts: float) -> None:
        for rule in self.unstarted:
            if rule.started_at is None:
                rule.started_at = ts
        self.unstarted = []


def _logic_hash(spec: RuleSpec) -> str:
    logic = {
        "on": spec.on,
        "selection": spec.selection,
        "aggregate": spec.aggregate,
        "model": spec.model,
    }
    text = json.dumps(
        json.loads(
            json.dumps(logic, default=lambda o: o.model_dump(by_alias=True, exclude_none=True))
        ),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RuleSet:
    rules: list[CompiledRule] = field(default_factory=list)
    lists: dict[str, frozenset[str]] = field(default_factory=dict)
    models: ModelSet = field(default_factory=ModelSet)

    def __post_init__(self) -> None:
        for rule in self.rules:
            gate = rule.spec.model
            if gate is not None:
                rule.gate = self.models.gate(gate.model, gate.above_quantile)

    def by_id(self) -> dict[str, CompiledRule]:
        return {rule.id: rule for rule in self.rules}

    def adopt_state_from(self, previous: RuleSet) -> list[str]:
        """Keep window state for rules whose logic did not change; returns their ids."""
        old = previous.by_id()
        kept = self.models.adopt_state_from(previous.models)
        for rule in self.rules:
            before = old.get(rule.id)
            if before is not None and before.logic == rule.logic:
                rule.adopt_state(before)
                kept.append(rule.id)
        return kept


@dataclass
class LoadedRules:
    rules: RuleSet
    specs: list[tuple[RuleSpec, YamlDocument]]
    models: list[tuple[ModelSpec, YamlDocument]] = field(default_factory=list)


def rule_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.yaml") if p.is_file()) + sorted(
        p for p in path.glob("*.yml") if p.is_file()
    )


def _lists_dir(path: Path) -> Path:
    return (path.parent if path.is_file() else path) / "lists"


def load_lists(folder: Path, problems: list[str]) -> dict[str, frozenset[str]]:
    lists: dict[str, frozenset[str]] = {}
    if not folder.is_dir():
        return lists
    for path in sorted(folder.glob("*.yaml")):
        parsed = parse_file(path, ListSpec, problems, "a list (name, description, values)")
        if parsed is None:
            continue
        spec, document = parsed
        if spec.name in lists:
            problems.append(f"{document.where(('name',))}: list {spec.name!r} is defined twice")
        lists[spec.name] = frozenset(str(v) for v in spec.values)
    return lists


def load_rules(path: Path, *, max_keys: int = 200_000) -> LoadedRules:
    """Load every rule under `path` (a folder or one file), or raise YamlFileError listing
    every problem at once, each as `file:line: key: reason`."""
    problems: list[str] = []
    if not path.exists():
        raise YamlFileError([f"{path}: no such rule file or folder"])
    lists = load_lists(_lists_dir(path), problems)
    specs = parse_files_with_ids(rule_files(path), RuleSpec, problems, "rule")
    for spec, document in specs:
        for name in _list_references(spec):
            if name not in lists:
                known = ", ".join(sorted(lists)) or "none"
                problems.append(
                    f"{document.path}:{_line_of_value(document, name)}: list {name!r} is not "
                    f"in {_lists_dir(path)} (known: {known})"
                )
    model_specs = load_model_specs(models_dir(path), problems)
    known_models = {spec.id: spec for spec, _ in model_specs}
    for spec, document in specs:
        if spec.model is None:
            continue
        target = known_models.get(spec.model.model)
        if target is None or not target.enabled:
            state = "disabled" if target is not None else "unknown"
            enabled = sorted(m for m, s in known_models.items() if s.enabled)
            problems.append(
                f"{document.where(('model', 'model'))}: model.model: {state} model "
                f"{spec.model.model!r} (enabled: {', '.join(enabled) or 'none'})"
            )
        elif spec.model.above_quantile not in target.threshold.quantiles():
            problems.append(
                f"{document.where(('model', 'above_quantile'))}: model.above_quantile: model "
                f"{target.id!r} tracks the quantiles {target.threshold.quantiles()}; add "
                f"{spec.model.above_quantile} to its threshold.also_track"
            )
    if problems:
        raise YamlFileError(problems)
    compiled = []
    for spec, document in specs:
        version = hashlib.sha256(document.path.read_bytes()).hexdigest()[:12]
        compiled.append(
            CompiledRule(spec, lists, source=str(document.path), version=version, max_keys=max_keys)
        )
    models = build_models(model_specs, max_keys)
    return LoadedRules(RuleSet(compiled, lists, models), specs, model_specs)


def _line_of_value(document: YamlDocument, value: str) -> int:
    for number, line in enumerate(document.path.read_text(encoding="utf-8").splitlines(), 1):
        if value in line:
            return number
    return 1


def describe_window(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def summary_of(finding: Finding) -> str:
    rule = finding.rule
    spec = rule.spec
    value = finding.value
    if spec.aggregate.type == "ratio":
        shown = f"{value:.0%}"
    elif spec.aggregate.type == "baseline_spike":
        shown = f"{value:.1f}"
    else:
        shown = f"{value:.2f}" if not float(value).is_integer() else f"{int(value)}"
    values = {
        "entity": finding.entity,
        "entity_type": spec.aggregate.group_by,
        "value": shown,
        "threshold": f"{spec.condition.threshold:g}",
        "window": describe_window(rule.window_s),
        "title": spec.title,
    }
    if spec.summary:
        try:
            return spec.summary.format(**values)
        except (KeyError, IndexError, ValueError):
            pass
    return (
        f"{values['entity_type']} {finding.entity}: {spec.title.lower()}: {shown} "
        f"({spec.aggregate.type}) within {values['window']}, threshold {spec.condition.op} "
        f"{values['threshold']}"
    )


__all__ = [
    "CompiledRule",
    "Finding",
    "LoadedRules",
    "RuleGroup",
    "RuleSet",
    "RuleSpec",
    "load_rules",
    "summary_of",
]
