"""The rule files' schema: strict (unknown keys are errors), checked by pydantic.

One rule per file in `rules/`, shared lists in `rules/lists/`. A rule says which
facts it watches (`on: call` for finished calls, `on: call_start` for a call's
first report), which of them count (`selection`), how they add up per entity
over a sliding event-time window (`aggregate`), when that is an alert
(`condition`), how long to stay quiet afterwards per entity (`suppression`),
and which entities never alert (`exceptions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from engine.core.durations import Duration
from engine.core.text import check_template
from engine.detect.calls import OUTCOMES
from engine.detect.numbers import KIND_NAMES, REGIONS, check_region

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
    "switch",
    # Where the numbers lead (engine.detect.numbers): the ISO region of the number's
    # plan, its type there, and whether the plan has it (False: unallocated).
    "caller_country",
    "caller_type",
    "caller_valid",
    "callee_country",
    "callee_type",
    "callee_valid",
    "forward_country",
    "forward_type",
    "forward_valid",
    # Whether the number leads out of the site's region (`detection.default_region`);
    # null when its region is unknown, and for every number while no region is set.
    "caller_abroad",
    "callee_abroad",
    "forward_abroad",
    # When the call started, in the site's time zone (`detection.timezone`): the hour
    # of the day (0-23) and the day of the week (mon ... sun).
    "hour",
    "weekday",
]
# What a rule's entities may be named by; several (`group_by: [switch, caller]`) name
# an entity by those fields joined with "/" in that order ("east/8613800000001").
GroupName = Literal[
    "caller",
    "menu",
    "forward",
    "callee",
    "switch",
    "caller_country",
    "callee_country",
    "forward_country",
]
# The text fields an aggregate's `field:` may name besides the numeric ones.
TextFieldName = Literal[
    "caller",
    "callee",
    "forward",
    "menu_id",
    "caller_country",
    "caller_type",
    "callee_country",
    "callee_type",
    "forward_country",
    "forward_type",
]


# The placeholders a rule's `summary` may name (engine.detect.rules.summary_of fills them).
SUMMARY_FIELDS = ("entity", "entity_type", "value", "threshold", "window", "title", "level")


class _Strict(BaseModel):
    # Numbers are finite: NaN or an infinity anywhere in a rule is an error, not a rule
    # that silently never (or always) fires.
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


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
    # `hour` only: from the first hour up to (not including) the second, across
    # midnight when the first is the later (`between: [22, 6]`: 22:00 to 05:59).
    between: list[int] | None = Field(default=None, min_length=2, max_length=2)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# The fields of the call's local time and the matcher keys each takes.
_TIME_KEYS = {
    "hour": {"in_", "not_in", "eq", "ne", "lt", "le", "gt", "ge", "between"},
    "weekday": {"in_", "not_in", "eq", "ne"},
}


# Fields whose values are a closed set, and what each takes: a value outside it could
# never match, so a misspelling (`outcome: answerd`) would make a rule blind without a
# word; it is refused where the rule is read instead.
_BOOLEAN_FIELDS = frozenset(
    f"{which}_{fact}" for which in ("caller", "callee", "forward") for fact in ("valid", "abroad")
) | {"answered"}
_TYPE_FIELDS = frozenset({"caller_type", "callee_type", "forward_type"})
_COUNTRY_FIELDS = frozenset({"caller_country", "callee_country", "forward_country"})
_NUMBER_FIELDS = frozenset({"ring_s", "talk_s", "ring_code"})


def _value_problem(name: str, value: object) -> str | None:
    """Why `value` is no value of the field `name` (None: it may be one)."""
    if name == "outcome" and value not in OUTCOMES:
        return f"is not an outcome ({', '.join(OUTCOMES)})"
    if name in _BOOLEAN_FIELDS and type(value) is not bool:
        return "is not true or false"
    if name in _TYPE_FIELDS and value != "" and value not in KIND_NAMES:
        return f'is not a number type ({", ".join(KIND_NAMES)}; "" for no number)'
    if name in _COUNTRY_FIELDS and value != "" and value not in REGIONS:
        return (
            "is not a region the numbering plans know (an ISO 3166 code in capitals, "
            'such as CN or GB; 001 for the non-geographic plans; "" for none)'
        )
    if name in _NUMBER_FIELDS and (type(value) not in (int, float)):
        return "is not a number"
    if name == "ring_code" and not (type(value) is int and 100 <= value <= 699):
        return "is not a SIP status code (100 to 699: 180 and 183 for ringing)"
    return None


def check_time_matchers(selection: Mapping[Any, Matcher]) -> None:
    """`hour` and `weekday` take only what fits them: hours 0-23 (or 24 as the end of a
    `between`), weekdays by their three-letter English names in lower case; and no
    other field takes `between`. Fields of a closed set of values (outcomes, number
    types, regions, yes or no) take only those. Raises ValueError naming the field."""
    for name, matcher in selection.items():
        given = {key for key in Matcher.model_fields if getattr(matcher, key) is not None}
        allowed = _TIME_KEYS.get(name)
        if allowed is None:
            if "between" in given:
                raise ValueError(f"{name}: `between` is for `hour` only")
            for value in _values(matcher):
                problem = _value_problem(str(name), value)
                if problem is not None:
                    raise ValueError(f"{name}: {value!r} {problem}")
            continue
        wrong = sorted(given - allowed)
        if wrong:
            keys = ", ".join(k.rstrip("_") for k in wrong)
            raise ValueError(f"{name}: {keys} does not apply to {name}")
        values = _values(matcher)
        if name == "weekday":
            for value in values:
                if value not in WEEKDAYS:
                    raise ValueError(
                        f"weekday: {value!r} is not a day of the week ({', '.join(WEEKDAYS)})"
                    )
            continue
        for value in values:
            if type(value) is not int or not 0 <= value <= 23:
                raise ValueError(f"hour: {value!r} is not an hour of the day (0 to 23)")
        if matcher.between is not None:
            first, last = matcher.between
            if not (0 <= first <= 23 and 0 <= last <= 24) or first == last:
                raise ValueError(
                    f"hour: between {matcher.between} is not a range of hours: from an hour "
                    "0-23 up to a different hour 0-24 (e.g. [22, 6] for 22:00 to 05:59)"
                )


def _values(matcher: Matcher) -> list[object]:
    """The values a matcher compares a field with for (in)equality."""
    return [
        *(matcher.in_ or ()),
        *(matcher.not_in or ()),
        *(v for v in (matcher.eq, matcher.ne) if v is not None),
    ]


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


_SHARE_KEYS = ("usual_over", "peer_weight", "min_excess")
_PACED_KEYS = ("min_spacing", "max_spacing", "tolerance", "chance")


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
        "new_value",
        "unusual_share",
        "paced",
    ]
    group_by: GroupName | list[GroupName]
    window: Duration | None = None
    field: TextFieldName | Literal["ring_s", "talk_s"] | None = None
    numerator: Selection | None = None
    min_volume: int = Field(default=1, ge=1)
    baseline_alpha: float = Field(default=0.2, gt=0, le=1)
    baseline_warmup: int = Field(default=6, ge=1)
    new_for: Duration | None = None
    warmup: Duration = 3600.0
    max_step: int = Field(default=1, ge=1)
    # `new_value`: how long an entity must have been seen (and `min_volume` calls made)
    # before a value of `field` new to it counts.
    known_for: Duration | None = None
    # `unusual_share`: how long an entity's usual share remembers (its calls decay over
    # it), what its peers' share counts for in it (as so many calls: a new entity is
    # judged against its peers), and the fewest hits beyond the usual share that count.
    usual_over: Duration = Field(default=3600.0, gt=0)
    peer_weight: int = Field(default=300, ge=0, le=1_000_000)
    min_excess: float = Field(default=8.0, ge=0, le=1_000_000)
    # `unusual_share`: what a hit's caller's calls must also look like (a call the
    # numerator takes counts as a hit only then, and as a call either way):
    # `{min_calls: 2, short_share: {gt: 0.99}}` takes short calls of callers whose
    # answered calls have all been short, from their second call on.
    numerator_behaviour: Behaviour | None = None
    # `concurrent` with `field`: the share of the caller's calls in progress (within the
    # window) that must share the judged call's value for them to count at all (calls
    # converging on one menu, not a busy caller's spread over the menus).
    min_share: float | None = Field(default=None, gt=0, le=1)
    # `paced`: the interval a run of calls keeps (`min_spacing` to `max_spacing`), how
    # far from it each call may start (`tolerance`), and the most often a call may fall
    # within the tolerance by chance (`chance`: a busy entity's tolerance narrows).
    min_spacing: Duration = Field(default=2.0, gt=0)
    max_spacing: Duration = Field(default=15.0, gt=0)
    tolerance: Duration = Field(default=0.25, gt=0)
    chance: float = Field(default=0.05, gt=0, lt=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `unusual_share`'s keys only where they apply: a rule's logic hash
        # (engine.detect.evaluate) is made from this dump, and keys every rule gained
        # would change every rule's hash, so that a snapshot of an earlier build
        # restored no rule's window.
        data: dict[str, Any] = handler(self)
        if self.type != "unusual_share":
            for key in _SHARE_KEYS:
                data.pop(key, None)
        if self.type != "paced":
            for key in _PACED_KEYS:
                data.pop(key, None)
        if data.get("numerator_behaviour") is None:
            data.pop("numerator_behaviour", None)
        if self.min_share is None:
            data.pop("min_share", None)  # likewise: only the rules that set it
        return data

    @property
    def entity_names(self) -> tuple[str, ...]:
        """The fields that name an entity, in order."""
        if isinstance(self.group_by, str):
            return (self.group_by,)
        return tuple(self.group_by)

    @property
    def entity_type(self) -> str:
        """What alerts call the entity: `caller`, or `switch/caller` for several."""
        return "/".join(self.entity_names)

    @model_validator(mode="after")
    def _check(self) -> Aggregate:
        if isinstance(self.group_by, list) and not 1 <= len(self.group_by) <= 3:
            raise ValueError("group_by names one to three fields")
        if len(set(self.entity_names)) != len(self.entity_names):
            raise ValueError("group_by names a field twice")
        if self.type != "concurrent" and not self.window:
            raise ValueError(f"aggregate type {self.type} needs a window")
        if self.type in ("distinct", "sum", "new_value") and self.field is None:
            raise ValueError(f"aggregate type {self.type} needs a field")
        if self.type == "sum" and self.field not in ("ring_s", "talk_s"):
            raise ValueError("sum needs a numeric field (ring_s or talk_s)")
        if self.type == "new_value" and self.field in ("ring_s", "talk_s"):
            raise ValueError("new_value needs a text field (callee_country, forward, ...)")
        if self.type == "new_value" and self.known_for is None:
            raise ValueError(
                "aggregate type new_value needs known_for (how long an entity is seen "
                "before a value new to it counts)"
            )
        if self.type in ("ratio", "unusual_share") and not self.numerator:
            raise ValueError(f"aggregate type {self.type} needs a numerator selection")
        if self.numerator:
            check_time_matchers(self.numerator)
        if self.numerator_behaviour is not None and self.type != "unusual_share":
            raise ValueError("numerator_behaviour narrows an unusual_share's hits only")
        if self.type == "first_seen" and not self.new_for:
            raise ValueError("aggregate type first_seen needs new_for (how long a key is new)")
        if self.type == "sequential" and self.entity_names != ("caller",):
            raise ValueError("sequential dialling is grouped by caller")
        if self.type == "concurrent" and self.entity_names != ("caller",):
            # The call tracker knows the calls in progress per caller only.
            raise ValueError("concurrent calls are counted per caller (group_by: caller)")
        if self.type == "concurrent" and self.field in ("ring_s", "talk_s"):
            # `field` narrows the calls in progress to those sharing the call's value.
            raise ValueError("concurrent calls share a text field (menu_id, callee, ...)")
        if self.min_share is not None and (self.type != "concurrent" or self.field is None):
            raise ValueError("min_share is the share of a concurrent aggregate's field")
        self._check_paced()
        return self

    def _check_paced(self) -> None:
        if self.type != "paced":
            given = [key for key in _PACED_KEYS if key in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: a paced aggregate's settings only")
            return
        if self.min_spacing >= self.max_spacing:
            raise ValueError(
                f"min_spacing ({self.min_spacing:g} s) must be shorter than max_spacing "
                f"({self.max_spacing:g} s)"
            )
        if self.max_spacing >= (self.window or 0.0):
            raise ValueError(
                f"max_spacing ({self.max_spacing:g} s) must be shorter than the window: "
                "a call one window old has left it"
            )
        if 2 * self.tolerance >= self.min_spacing:
            raise ValueError(
                f"tolerance ({self.tolerance:g} s) must be under half of min_spacing "
                f"({self.min_spacing:g} s): a run's calls would blur into one another"
            )


class Condition(_Strict):
    op: Literal[">=", ">", "<=", "<"] = ">="
    # Finite (the model config refuses NaN and infinities: a NaN threshold would never
    # hold, silently) and within what any aggregate can measure.
    threshold: float = Field(ge=-1e9, le=1e9)
    # A first bar on the safe side of `threshold` (below it for `>=`/`>`, above it for
    # `<=`/`<`): crossing it raises the alert at level `warning`; `threshold` is the
    # `critical` one, and crossing it later in the same incident escalates the alert.
    warning: float | None = Field(default=None, ge=-1e9, le=1e9)

    @field_validator("warning")
    @classmethod
    def _check_warning(cls, warning: float | None, info: ValidationInfo) -> float | None:
        threshold = info.data.get("threshold")
        op = info.data.get("op", ">=")
        if warning is None or threshold is None:
            return warning
        if op in (">=", ">") and not warning < threshold:
            raise ValueError(
                f"warning ({warning:g}) must be below the threshold ({threshold:g}): with "
                f"op {op} the warning is the lower, earlier bar"
            )
        if op in ("<=", "<") and not warning > threshold:
            raise ValueError(
                f"warning ({warning:g}) must be above the threshold ({threshold:g}): with "
                f"op {op} the warning is the higher, earlier bar"
            )
        return warning

    @property
    def entry(self) -> float:
        """The bar an alert is raised at: the warning's when there is one."""
        return self.threshold if self.warning is None else self.warning


class Suppression(_Strict):
    duration: Duration = 1800.0
    # A finding whose window holds only calls from after the last finding for the
    # entity, more than this long after it, is a new incident: its own alert, within the
    # suppression (engine.detect.alerts). None: the suppression holds whatever comes.
    new_incident_after: Duration | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Suppression:
        after = self.new_incident_after
        if after is not None and after >= self.duration:
            raise ValueError(
                f"new_incident_after ({after:.0f} s) must be shorter than the "
                f"suppression's duration ({self.duration:.0f} s)"
            )
        return self


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
    # The switch the calls come through (receiver.switches names it; "" none).
    switch: str = ""
    ring: Duration = 3.0
    talk: Duration = 60.0
    answered: bool = True
    hangup: bool = True


class TestExpect(_Strict):
    entity: str
    min_alerts: int = Field(default=1, ge=1)
    # The level the entity's alert must reach by the end of the test (`critical`: raised
    # so, or escalated; `warning`: raised so and never escalated). None: any.
    level: Literal["warning", "critical"] | None = None


class ModelGate(_Strict):
    """The rule fires only while a model's latest score for the call's caller or menu
    (the model's kind decides which) is above a running quantile of its scores."""

    model: str = Field(min_length=1)
    above_quantile: float = Field(gt=0.5, lt=1)


class BehaviourBound(_Strict):
    """Bounds on one measure of a caller's recent calls (engine.detect.conduct); all
    given must hold. `below_peers: 0.5`: under half of what callers at large show;
    `above_usual: 3`: over three times the caller's own usual (its peers' while it is
    new); `lt`/`gt`: plain bounds."""

    lt: float | None = None
    gt: float | None = None
    below_peers: float | None = Field(default=None, gt=0)
    above_peers: float | None = Field(default=None, gt=0)
    below_usual: float | None = Field(default=None, gt=0)
    above_usual: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> BehaviourBound:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "a behaviour bound needs one of lt, gt, below_peers, above_peers, "
                "below_usual, above_usual"
            )
        return self


# The measures of engine.detect.conduct (MEASURES), in its order.
_MEASURES = ("answered_share", "short_share", "ring_s", "talk_s", "rate", "calls", "seen_s")


class Behaviour(_Strict):
    """What the caller's calls must also look like for the rule to fire (what it
    does, not how much): bounds on measures of its recent finished calls, all of
    which must hold, once it has finished `min_calls` calls."""

    min_calls: int = Field(default=3, ge=0, le=1000)
    answered_share: BehaviourBound | None = None
    short_share: BehaviourBound | None = None
    ring_s: BehaviourBound | None = None
    talk_s: BehaviourBound | None = None
    rate: BehaviourBound | None = None
    # Its finished calls so far (a caller first seen has none), and the seconds since
    # its first call started: plain bounds only.
    calls: BehaviourBound | None = None
    seen_s: BehaviourBound | None = None

    def bounds(self) -> list[tuple[str, BehaviourBound]]:
        """(measure, bounds) for each measure named, in the order of the fields."""
        found = []
        for name in _MEASURES:
            bound = getattr(self, name)
            if bound is not None:
                found.append((name, bound))
        return found

    @model_validator(mode="after")
    def _check(self) -> Behaviour:
        if not self.bounds():
            raise ValueError(f"behaviour names no measure ({', '.join(_MEASURES)})")
        for name in ("calls", "seen_s"):
            bound = getattr(self, name)
            if bound is not None and any(
                getattr(bound, key) is not None
                for key in ("below_peers", "above_peers", "below_usual", "above_usual")
            ):
                raise ValueError(
                    f"{name} is bounded by lt or gt only (peers and usual do not apply)"
                )
        return self


class RuleTest(_Strict):
    name: str = Field(min_length=1)
    calls: list[TestCalls] = Field(min_length=1)
    expect: list[TestExpect] = Field(default_factory=list)
    # The site's region the test runs in (`detection.default_region`: what national
    # forms belong to, and what the `*_abroad` fields read as home); unset: none.
    region: str | None = None

    @field_validator("region")
    @classmethod
    def _region_known(cls, value: str | None) -> str | None:
        return None if value is None else check_region(value)


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
    behaviour: Behaviour | None = None
    # Checked when left out too: the default (30 min) may be shorter than the window.
    suppression: Suppression = Field(default_factory=Suppression, validate_default=True)
    exceptions: list[ExceptionRule] = Field(default_factory=list)
    summary: str | None = None
    tests: list[RuleTest] = Field(default_factory=list)

    @field_validator("summary")
    @classmethod
    def _check_summary(cls, summary: str | None) -> str | None:
        if summary is not None:
            check_template(summary, SUMMARY_FIELDS)
        return summary

    @field_validator("selection")
    @classmethod
    def _check_selection(cls, selection: Selection) -> Selection:
        check_time_matchers(selection)
        return selection

    @model_validator(mode="after")
    def _check(self) -> RuleSpec:
        if self.aggregate.type == "concurrent" and self.on != "call_start":
            raise ValueError("concurrent calls are counted on call_start")
        if self.behaviour is not None and self.aggregate.entity_names != ("caller",):
            # Conduct is kept per caller (engine.detect.conduct).
            raise ValueError("behaviour is judged per caller (group_by: caller)")
        self._check_paced_reach()
        return self

    def _check_paced_reach(self) -> None:
        """A paced run long enough for the condition must fit in the window."""
        aggregate, condition = self.aggregate, self.condition
        if aggregate.type != "paced" or condition.op not in (">=", ">"):
            return
        bar = condition.entry
        calls = math.ceil(bar) if condition.op == ">=" else math.floor(bar) + 1
        window = aggregate.window or 0.0
        if calls >= 2 and (calls - 1) * aggregate.min_spacing >= window:
            raise ValueError(
                f"a run of {calls} calls at least min_spacing ({aggregate.min_spacing:g} s) "
                f"apart is longer than the window ({window:g} s): the rule could never fire"
            )

    @field_validator("suppression")
    @classmethod
    def _check_suppression(cls, suppression: Suppression, info: ValidationInfo) -> Suppression:
        # Here rather than on the whole rule, so a refusal names the suppression's line.
        aggregate = info.data.get("aggregate")
        if aggregate is None:
            return suppression  # the aggregate's own error says what is wrong
        if aggregate.type == "concurrent" and suppression.new_incident_after:
            # Its calls in progress are known only once listed, after suppression is asked.
            raise ValueError("new_incident_after is not for concurrent calls")
        window = aggregate.window or 0.0
        if suppression.duration < window:
            raise ValueError(
                f"suppression ({suppression.duration:.0f} s) is shorter than the window "
                f"({window:.0f} s): one incident would raise several alerts"
            )
        return suppression


class ListEntry(_Strict):
    """One value of a list with where it comes from (who said so, or why it is listed)."""

    value: str = Field(min_length=1)
    source: str = Field(min_length=1)
    note: str = ""


class ListSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    description: str = ""
    # `country`: every value is a region of a numbering plan (engine.detect.numbers
    # REGIONS: ISO 3166 codes in capitals, "001" the non-geographic plans), checked
    # where the rules are loaded, so a typo is an error with its line, not a country
    # that silently never matches.
    kind: Literal["text", "country"] = "text"
    values: list[str] = Field(default_factory=list)
    entries: list[ListEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ListSpec:
        if not self.values and not self.entries:
            raise ValueError("a list needs values or entries (each with its source)")
        return self

    def all_values(self) -> list[str]:
        return [*self.values, *(entry.value for entry in self.entries)]
