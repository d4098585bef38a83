"""Aggregates: how the calls a rule selects add up per entity, and the comparison its
condition makes of what they add up to.

One small class per `type:` of the rule files, registered by that name in
`AGGREGATES` (the rule compiler looks it up there), each with the same contract:

- made from the rule's `aggregate:` (and its numerator selection and condition);
- `new_state(now)`: an entity's state when its first call comes: a window of entries
  (engine.detect.windows) and whatever else this aggregate needs besides, nothing
  more (with a million tracked callers, every field kept per entity costs megabytes);
- `add(state, call, ts)`: the call enters the entity's window; False (and the window
  unchanged) when the call carries nothing this aggregate counts. The rule then lets
  entries `window_s` old leave (`leave_until(ts - window_s)`);
- `measure(state, call)`: the value the condition is tested against, once the call is
  in the window; None when there is not yet enough to judge (or the condition could
  not hold, which comes to the same: no finding);
- `fold(state)`: the rule calls it when a window holds FOLD_AT calls one by one, to
  fold the older ones into time buckets (engine.detect.windows); a distinct count
  keeps each folded value's count, the others only counts and sums;
- `keep_s`: how long an entity's state outlives its last call before it is dropped;
- `learned()`, `take_learned(...)`: what it learns across entities (`unusual_share`'s
  peers), for snapshots and rule reloads;
- `started_at`: when the rule took its first call (the rule sets it).

`Concurrent` is the one that keeps no window: calls in progress are the call
tracker's to know (`in_progress`). tests/test_aggregates.py runs every registered
aggregate through the same checks.

This module is part of the detection's hot path (compiled by mypyc where built, see
engine/detect/__init__.py), so it keeps no doctests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Final, cast

from engine.detect.calls import Call, CallTracker, reported_until
from engine.detect.fields import FIELDS, CallField, TextField
from engine.detect.schema import Aggregate as AggregateSpec
from engine.detect.schema import Condition as ConditionSpec
from engine.detect.windows import (
    BUCKETS_PER_WINDOW,
    EVIDENCE_CALLS,
    CountState,
    EntityState,
    EwBaseline,
    Timestamp,
    ValueState,
)

# -- the condition: the measured value against the threshold ----------------------


class Comparison:
    """A rule's `condition:` (`op` against `threshold`)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def holds(self, value: float) -> bool:
        raise NotImplementedError

    def may_hold_up_to(self, most: float) -> bool:
        """Whether the condition could hold for some value no greater than `most`: a
        measure bounded by a count (distinct values, calls in progress) need not be
        made when even the bound fails an at-least condition."""
        return True


class AtLeast(Comparison):
    def holds(self, value: float) -> bool:
        return value >= self.threshold

    def may_hold_up_to(self, most: float) -> bool:
        return most >= self.threshold


class Above(Comparison):
    def holds(self, value: float) -> bool:
        return value > self.threshold

    def may_hold_up_to(self, most: float) -> bool:
        return most > self.threshold


class AtMost(Comparison):
    def holds(self, value: float) -> bool:
        return value <= self.threshold


class Below(Comparison):
    def holds(self, value: float) -> bool:
        return value < self.threshold


COMPARISONS: dict[str, type[Comparison]] = {
    ">=": AtLeast,
    ">": Above,
    "<=": AtMost,
    "<": Below,
}


def comparison(spec: ConditionSpec) -> Comparison:
    """The condition's first bar: its warning when it has one (below the critical
    threshold for an at-least condition, so a bounded measure is made whenever
    either level could be reached)."""
    return COMPARISONS[spec.op](spec.entry)


class Numerator:
    """Whether a call is one a ratio counts as a hit (the rule's numerator selection);
    engine.detect.evaluate's `Selector` is the one in use."""

    def takes(self, call: Call) -> bool:
        raise NotImplementedError


# -- the aggregates -------------------------------------------------------------------


class Aggregate:
    """The contract (see the module's docstring), and `count`'s behaviour: how many
    calls the window holds."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        self.window_s = spec.window or 0.0
        self.keep_s = self.window_s
        # A folded window's buckets (never zero long: a window of none folds nothing).
        self.bucket_s = max(self.window_s / BUCKETS_PER_WINDOW, 0.001)
        self.condition = condition
        # Whether it keeps a window per entity (all but `concurrent`).
        self.windowed = True
        # When the rule took its first call (None: not yet): an aggregate that learns
        # what is usual judges nothing from the time before (`first_seen`).
        self.started_at: float | None = None
        # Whether `settled` may lower a measure that holds (`unusual_share`'s).
        self.settles = False

    def new_state(self, now: float) -> EntityState:
        return CountState()

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        state.add(ts, call.call_id, None)
        return True

    def measure(self, state: EntityState, call: Call) -> float | None:
        return float(len(state))

    def fold(self, state: EntityState) -> None:
        state.fold(self.bucket_s, False)

    def learned(self) -> tuple[float, ...] | None:
        """What the aggregate learned across its entities, beyond their states (None:
        nothing): a snapshot keeps it beside the rule's windows, and a rule reload
        whose logic is unchanged hands it on (`take_learned`)."""
        return None

    def take_learned(self, learned: tuple[float, ...]) -> None:
        """Carry on from what `learned` returned (of an aggregate of the same logic)."""

    def settled(
        self,
        state: EntityState,
        call: Call,
        measured: float,
        ended: list[Call],
        talking: list[Call],
    ) -> float:
        """The measure again, told of the entity's answered calls not finished yet: those
        whose Bye came (`ended`, to finish within seconds) and those still going on
        (`talking`, each as if it ended now); asked only when `measured` holds."""
        return measured

    def evidence(self, state: EntityState) -> list[str]:
        """The calls a finding names: the window's newest."""
        return state.live_call_ids()


class Count(Aggregate):
    """`count`: the calls in the window."""


class FieldValues(Aggregate):
    """A window whose entries carry a field's value; a call without one is not counted."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        if spec.field is None:
            raise ValueError(f"aggregate type {spec.type} needs a field")
        self.field: CallField = FIELDS[spec.field]

    def new_state(self, now: float) -> EntityState:
        return ValueState()

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        value = self.field.read(call)
        if value is None:
            return False
        state.add(ts, call.call_id, value)
        return True


class Distinct(FieldValues):
    """`distinct`: how many different values of the field the window holds."""

    def measure(self, state: EntityState, call: Call) -> float | None:
        # No more distinct values than entries: when even that many cannot meet the
        # condition (most windows: a caller with a few calls), nothing is counted,
        # where counting made a set of the window's values for every call.
        if not self.condition.may_hold_up_to(float(len(state))):
            return None
        return float(cast(ValueState, state).distinct())

    def fold(self, state: EntityState) -> None:
        state.fold(self.bucket_s, True)


class Sum(FieldValues):
    """`sum`: the total of a numeric field (ring_s, talk_s) over the window."""

    def measure(self, state: EntityState, call: Call) -> float | None:
        return cast(ValueState, state).total


class Ratio(Aggregate):
    """`ratio`: the share of the window's calls that the numerator selects, once the
    window holds `min_volume` calls."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.numerator = numerator
        self.min_volume = spec.min_volume

    def new_state(self, now: float) -> EntityState:
        return ValueState()

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        state.add(ts, call.call_id, self.numerator.takes(call))
        return True

    def measure(self, state: EntityState, call: Call) -> float | None:
        total = len(state)
        if total < self.min_volume:
            return None
        return cast(ValueState, state).hits / total


class SpikeState(CountState):
    """A `baseline_spike` entity: its window and the usual count of its past windows."""

    __slots__ = ("baseline",)

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "baseline")

    def __init__(self, bucket_s: float = 0.0, alpha: float = 0.2) -> None:
        super().__init__()
        self.baseline = EwBaseline(bucket_s, alpha)


class BaselineSpike(Aggregate):
    """`baseline_spike`: the window's count over the usual count of the entity's past
    windows (exponentially weighted), once `baseline_warmup` windows are behind it and
    the window holds `min_volume` calls."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.alpha = spec.baseline_alpha
        self.warmup = spec.baseline_warmup
        self.min_volume = spec.min_volume
        self.keep_s = max(self.window_s * 50, 86400.0)

    def new_state(self, now: float) -> EntityState:
        return SpikeState(self.window_s, self.alpha)

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        cast(SpikeState, state).baseline.observe(ts)
        state.add(ts, call.call_id, None)
        return True

    def measure(self, state: EntityState, call: Call) -> float | None:
        baseline = cast(SpikeState, state).baseline
        count = len(state)
        if baseline.buckets < self.warmup or count < self.min_volume:
            return None
        return count / max(baseline.mean, 1.0)


class FirstSeenState(CountState):
    """A `first_seen` entity: its window and when it was first seen."""

    __slots__ = ("first_seen",)

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "first_seen")

    def __init__(self, first_seen: float = 0.0) -> None:
        super().__init__()
        self.first_seen = first_seen


class FirstSeen(Aggregate):
    """`first_seen`: the calls in the window of an entity first seen less than
    `new_for` ago, and not while the rule was learning what is usual (`warmup` from
    its first call). Entities are remembered for 30 days."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.warmup: float = spec.warmup
        self.new_for: float = spec.new_for or 0.0
        self.keep_s = max(self.window_s, 30 * 86400.0)

    def new_state(self, now: float) -> EntityState:
        return FirstSeenState(now)

    def measure(self, state: EntityState, call: Call) -> float | None:
        started = self.started_at or 0.0
        first_seen = cast(FirstSeenState, state).first_seen
        if first_seen < started + self.warmup:
            return None  # seen while the rule was still learning what is normal
        if (state.last_time() or first_seen) - first_seen > self.new_for:
            return None
        return float(len(state))


class SequentialState(CountState):
    """A `sequential` caller: its window, its last callee and the run so far (signed:
    its direction)."""

    __slots__ = ("last_callee", "run")

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "last_callee", "run")

    def __init__(self) -> None:
        super().__init__()
        self.last_callee: int | None = None
        self.run = 0


class Sequential(Aggregate):
    """`sequential`: the length of the caller's run of callees, each one step (at most
    `max_step`) beyond the last, in one direction and never back: a scan. Alternating
    between two neighbouring IVR numbers (a busy trunk's pattern) is no run."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.max_step = spec.max_step

    def new_state(self, now: float) -> EntityState:
        return SequentialState()

    def measure(self, state: EntityState, call: Call) -> float | None:
        scan = cast(SequentialState, state)
        try:
            callee = int(call.callee)
        except ValueError:
            scan.run, scan.last_callee = 0, None
            return 0.0
        previous = scan.last_callee
        step = 0 if previous is None else callee - previous
        direction = 1 if step > 0 else -1
        if step and abs(step) <= self.max_step and (scan.run == 0 or direction * scan.run > 0):
            scan.run += direction
        else:
            scan.run = 0
        scan.last_callee = callee
        return float(abs(scan.run) + 1 if scan.run else 0)


class Concurrent(Aggregate):
    """`concurrent`: a caller's calls in progress now (started within the window, if
    it has one), from the call tracker's open calls: no window and no counters to
    drift. Measured on `call_start`. With `field` (a text field such as `menu_id`), only
    the calls in progress that share the judged call's value of it: calls converging
    on one menu rather than spread as a PBX's users spread theirs; with `min_share`
    too, none unless they are at least that share of the caller's calls in progress
    (a busy caller's calls into its favourite menu are many, and still a third of
    its calls)."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.windowed = False
        self.field: TextField | None = (
            cast(TextField, FIELDS[spec.field]) if spec.field is not None else None
        )
        self.min_share: float = spec.min_share or 0.0

    def may_hold(self, tracker: CallTracker, caller: str) -> bool:
        """Whether the condition could hold: all of the caller's calls in progress are
        at least as many as those within the window, so when even they are too few,
        nothing need be listed (nor the alert manager asked: a call into Python for
        every call started)."""
        return self.condition.may_hold_up_to(float(tracker.open_count(caller)))

    def in_progress(self, tracker: CallTracker, caller: str, now: float, call: Call) -> list[Call]:
        """The caller's calls in progress that started within the window, newest first
        (with `field`: those whose value of it is `call`'s)."""
        since = now - self.window_s if self.window_s else float("-inf")
        live = tracker.open_calls(caller, since)
        field = self.field
        if field is None:
            return live
        value = field.text(call)
        if not value:
            # A call with no value of the field (no menu) says nothing of what it shares.
            return []
        same = [c for c in live if field.text(c) == value]
        if len(same) < self.min_share * len(live):
            return []  # spread over the values, as a busy caller's calls are
        return same


class NewValueState(CountState):
    """A `new_value` entity: its window (the calls that brought a value new to it), when
    it was first seen, how many calls it made, and the values it has shown."""

    __slots__ = ("calls", "first_seen", "seen")

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "first_seen", "calls", "seen")

    def __init__(self, first_seen: float = 0.0) -> None:
        super().__init__()
        self.first_seen = first_seen
        self.calls = 0
        # A tuple, not a set: an entity shows a few values (countries), and a set's
        # table costs 200 bytes for even one.
        self.seen: tuple[str, ...] = ()


# A `new_value` entity that has shown this many values is judged no further (a
# trunk that reaches everywhere): its state stays bounded.
NEW_VALUE_MAX_SEEN: Final = 32


class NewValue(Aggregate):
    """`new_value`: the calls in the window that brought a value of `field` the entity
    had never shown (a caller's first call to a country), counted once the entity has
    been seen for `known_for` and made `min_volume` calls (this one included): a new
    entity's first calls show it nothing new. An empty value (a number not judged) is not a value.
    Entities are remembered for 30 days."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        if spec.field is None:
            raise ValueError("aggregate type new_value needs a field")
        self.field = cast(TextField, FIELDS[spec.field])
        self.known_for: float = spec.known_for or 0.0
        self.min_volume = spec.min_volume
        self.keep_s = max(self.window_s, 30 * 86400.0)

    def new_state(self, now: float) -> EntityState:
        return NewValueState(now)

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        entity = cast(NewValueState, state)
        now: float = ts
        entity.calls += 1
        known = entity.calls >= self.min_volume and now - entity.first_seen >= self.known_for
        value = self.field.text(call)
        seen = entity.seen
        if not value or value in seen or len(seen) >= NEW_VALUE_MAX_SEEN:
            return False
        entity.seen = (*seen, value)
        if not known:
            return False
        state.add(ts, call.call_id, None)
        return True


# The newest calls of a `paced` window that are looked at for a run: a bounded sort
# and scan for each call however busy the entity. At six calls a second they span
# nearly three minutes, more than a run of ten at 15 s needs; a flood busier than
# that narrows the tolerance to milliseconds anyway (see `Paced`).
PACED_CALLS: Final = 1024


class Paced(Aggregate):
    """`paced`: the longest run of the window's calls, the judged call among them, each
    starting one steady interval after the last: an interval from `min_spacing` to
    `max_spacing`, every call within `tolerance` of where it says (the interval is
    measured again as the run grows, so a slow drift of the pace stays one run). Calls
    placed by a machine, from one caller or spread over many; people calling do not
    keep a metronome's pace. Where the window's other calls come so close together
    that one would fall within the tolerance by chance more than `chance` of the time
    (a busy entity), the tolerance narrows until it would not: a run of chance stays
    rare whatever the entity's volume, and a run is found only as steady as that (to
    12 ms at two calls a second). The evidence is the run's calls."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.min_spacing: float = spec.min_spacing
        self.max_spacing: float = spec.max_spacing
        self.tolerance: float = spec.tolerance
        self.chance: float = spec.chance
        # The calls of the run the last measure found (its evidence, if it holds).
        self.run_ids: list[str] = []

    def new_state(self, now: float) -> EntityState:
        return ValueState()

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        state.add(ts, call.call_id, call.started_at)
        return True

    def measure(self, state: EntityState, call: Call) -> float | None:
        if not self.condition.may_hold_up_to(float(len(state))):
            return None  # fewer calls in the window than the run must have
        window = cast(ValueState, state)
        # The window's newest calls, at most PACED_CALLS of them (a flood of calls into
        # one entity costs a bounded sort and scan for each).
        held = len(window.values) - (window.head >> 1)
        judged = min(held, PACED_CALLS)
        starts = cast(list[float], window.values[len(window.values) - judged :])
        ids: list[str] = window.entries[len(window.entries) - 2 * judged + 1 :: 2]
        order = sorted(range(len(starts)), key=starts.__getitem__)
        times = [starts[i] for i in order]
        # How often one of the calls beside a run falls within the tolerance of a given
        # moment by chance: about 2 * tolerance * their rate. They are the window's
        # calls but for the run's own, at least as many as the condition asks for (a
        # burst does not narrow its own tolerance), over the span of the window's calls
        # (a window still filling is not taken for a quiet one).
        others = len(times) - max(int(self.condition.threshold), 1)
        tolerance = self.tolerance
        if others > 0:
            span = max(times[-1] - times[0], self.max_spacing)
            tolerance = min(tolerance, self.chance * span / (2.0 * others))
        best = self._longest_run(times, call.started_at, tolerance)
        self.run_ids = [ids[order[i]] for i in best]
        return float(len(best))

    def _longest_run(self, times: list[float], anchor: float, tolerance: float) -> list[int]:
        """The longest run through `anchor` (one of `times`, which are sorted)."""
        at = bisect.bisect_left(times, anchor)
        best: list[int] = [at]
        first = bisect.bisect_left(times, anchor - self.max_spacing)
        last = bisect.bisect_right(times, anchor + self.max_spacing)
        for partner in range(first, last):
            if abs(times[partner] - anchor) < self.min_spacing:
                continue
            run = _paced_run(times, min(at, partner), max(at, partner), tolerance)
            if len(run) > len(best):
                best = run
        return best

    def evidence(self, state: EntityState) -> list[str]:
        return self.run_ids[-EVIDENCE_CALLS:]


def _nearest(times: list[float], want: float, tolerance: float) -> int:
    """The index of the time nearest `want` within `tolerance` of it (-1: none)."""
    index = bisect.bisect_left(times, want - tolerance)
    found = -1
    while index < len(times) and times[index] <= want + tolerance:
        if found < 0 or abs(times[index] - want) < abs(times[found] - want):
            found = index
        index += 1
    return found


def _paced_run(times: list[float], low: int, high: int, tolerance: float) -> list[int]:
    """The run through `times[low]` and `times[high]` (one interval apart), grown later
    and earlier by that interval, measured again over the run at each call."""
    run = [low, high]
    spacing = times[high] - times[low]
    # Each call found lies strictly later (earlier) than the last: the run ends, however
    # its measured interval has drifted.
    while True:
        found = _nearest(times, times[run[-1]] + spacing, tolerance)
        if found < 0 or times[found] <= times[run[-1]]:
            break
        run.append(found)
        spacing = (times[run[-1]] - times[run[0]]) / (len(run) - 1)
    while True:
        found = _nearest(times, times[run[0]] - spacing, tolerance)
        if found < 0 or times[found] >= times[run[0]]:
            break
        run.insert(0, found)
        spacing = (times[run[-1]] - times[run[0]]) / (len(run) - 1)
    return run


class ShareState(CountState):
    """An `unusual_share` entity: its window of hits (the calls the numerator takes: the
    evidence), every call it takes counted in time buckets of the window (parallel
    lists, oldest first: `bucket_start`, `bucket_calls`, `bucket_hits`, by when each
    call ended; `settled_calls`, `settled_hits`, by when it settled: answered, or
    ended unanswered), and its usual: the calls and hits that have left its window,
    decayed to `usual_at`."""

    __slots__ = (
        "bucket_calls",
        "bucket_hits",
        "bucket_start",
        "settled_calls",
        "settled_hits",
        "usual_at",
        "usual_calls",
        "usual_hits",
    )

    def state_fields(self) -> tuple[str, ...]:
        return (
            *super().state_fields(),
            "bucket_calls",
            "bucket_hits",
            "bucket_start",
            "usual_at",
            "usual_calls",
            "usual_hits",
            # Last: a snapshot from before them leaves them empty (see `UnusualShare.add`).
            "settled_calls",
            "settled_hits",
        )

    def __init__(self) -> None:
        super().__init__()
        self.bucket_start: list[float] = []
        self.bucket_calls: list[int] = []
        self.bucket_hits: list[int] = []
        self.settled_calls: list[int] = []
        self.settled_hits: list[int] = []
        self.usual_calls = 0.0
        self.usual_hits = 0.0
        self.usual_at = 0.0


# An `unusual_share` window is judged over each stretch of its newest buckets (the last
# one, the last two, ... all of them): a burst is found over about its own length,
# however long it lasts within the window.
SHARE_BUCKETS: Final = 20
# Calls every entity together must have taken (counted whole, not decayed: a quiet site
# of fewer calls an hour than this warms up too) before their share is a usual to judge by.
PEERS_WARM: Final = 200
# Calls the other entities must have made (decayed) for an entity to be judged by
# them alone: fewer, and it is nearly all of its peers (one menu), judged by them all.
OTHERS_WARM: Final = 50.0


def surprise(hits: float, expected: float) -> float:
    """How many standard deviations `hits` lies above a Poisson count of mean `expected`
    (the signed root of the likelihood-ratio statistic, close to the exact tail even for
    a handful of calls; half a call of continuity correction); 0 at or below it, and
    for a mean of none (no share to judge by)."""
    count = hits - 0.5
    if count <= expected or expected <= 0.0:
        return 0.0
    return math.sqrt(2.0 * (count * math.log(count / expected) - (count - expected)))


class UnusualShare(Aggregate):
    """`unusual_share`: how far the share of the window's calls that the numerator takes
    lies above the entity's usual share, in standard deviations, volume accounted for:
    k hits of n calls against n times the usual share p. More calls at the usual share
    (a campaign) are no more surprising than few; a handful of extra hits (a burst)
    among few calls or many is, once they are more than the count's own spread. The
    most surprising stretch of the window's newest buckets counts, with at least
    `min_excess` hits more than expected in it. The usual is the entity's calls that
    have left its window, decayed over `usual_over`, with its peers' (every other
    entity of the rule: its own window left out) counted as `peer_weight` calls of it:
    a new entity is judged against its peers, a known one against itself; its
    uncertainty widens the spread."""

    def __init__(self, spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> None:
        super().__init__(spec, condition, numerator)
        self.numerator = numerator
        self.share_bucket_s = max(self.window_s / SHARE_BUCKETS, 0.001)
        self.usual_s: float = spec.usual_over
        self.peer_weight = float(spec.peer_weight)
        self.min_excess = float(spec.min_excess)
        # An entity's usual is worth keeping while it has not decayed to nothing.
        self.keep_s = max(self.window_s, 4.0 * self.usual_s)
        # Every entity's calls and hits as they come, decayed over `usual_s` (the rule's
        # own, relearned within minutes after a restart: each entity's usual is kept).
        self.peer_calls = 0.0
        self.peer_hits = 0.0
        self.peer_at = 0.0
        self.peer_seen = 0
        # `numerator_behaviour:` (the rule set puts its gate over the callers' conduct
        # here): a call the numerator takes is a hit only if its caller passes it too.
        self.hit_gate: Callable[[Call], bool] | None = None
        self.settles = True
        # The call tracker, for a rule whose peers' answered calls in progress count
        # (`CompiledRule.watch_calls_in_progress`): set by the pipeline, None otherwise.
        self.in_progress: CallTracker | None = None

    def new_state(self, now: float) -> EntityState:
        return ShareState()

    def add(self, state: EntityState, call: Call, ts: Timestamp) -> bool:
        share = cast(ShareState, state)
        now: float = ts
        hit = self.numerator.takes(call)
        if hit:
            gate = self.hit_gate
            if gate is not None and not gate(call):
                hit = False
        self._roll(share, now)
        self._learn_peers(now, hit)
        starts = share.bucket_start
        settled_calls, settled_hits = share.settled_calls, share.settled_hits
        if len(settled_calls) != len(starts):
            # Restored from a snapshot from before they were kept: the window's buckets
            # so far are unknown so (-1), and `settled` judges nothing until they leave.
            settled_calls[:] = [-1] * len(starts)
            settled_hits[:] = [-1] * len(starts)
        if not starts or now >= starts[-1] + self.share_bucket_s:
            starts.append(now - math.fmod(now, self.share_bucket_s))
            share.bucket_calls.append(0)
            share.bucket_hits.append(0)
            settled_calls.append(0)
            settled_hits.append(0)
        last = len(starts) - 1
        share.bucket_calls[last] += 1
        # An answered call settled when it was answered (the bucket then, if still in
        # the window), any other when it ended.
        answered_at = call.answered_at
        place = last
        if answered_at is not None and answered_at < starts[last]:
            place = bisect.bisect_right(starts, answered_at) - 1
        if place >= 0 and settled_calls[place] >= 0:
            settled_calls[place] += 1
            if hit:
                settled_hits[place] += 1
        if not hit:
            return False
        share.bucket_hits[last] += 1
        state.add(ts, call.call_id, None)
        return True

    def _roll(self, share: ShareState, now: float) -> None:
        """Buckets wholly out of the window leave it for the entity's usual."""
        starts = share.bucket_start
        cutoff = now - self.window_s - self.share_bucket_s
        gone = 0
        while gone < len(starts) and starts[gone] <= cutoff:
            gone += 1
        if not gone:
            return
        kept = self._decay(share.usual_at, now)
        calls = share.usual_calls * kept
        hits = share.usual_hits * kept
        # A bucket left the window this long after it began: after a quiet gap that
        # was long before `now`, and it joins the usual decayed as if it had left then
        # (an entity's usual is what it did, weighted by how long ago).
        left_after = self.window_s + self.share_bucket_s
        bucket_calls, bucket_hits = share.bucket_calls, share.bucket_hits
        for index in range(gone):
            weight = self._decay(starts[index] + left_after, now)
            calls += bucket_calls[index] * weight
            hits += bucket_hits[index] * weight
        del starts[:gone]
        del bucket_calls[:gone]
        del bucket_hits[:gone]
        del share.settled_calls[:gone]
        del share.settled_hits[:gone]
        share.usual_calls = calls
        share.usual_hits = hits
        share.usual_at = now

    def _decay(self, since: float, now: float) -> float:
        if now <= since:
            return 1.0
        return math.exp((since - now) / self.usual_s)

    def learned(self) -> tuple[float, ...] | None:
        return (self.peer_calls, self.peer_hits, self.peer_at, float(self.peer_seen))

    def take_learned(self, learned: tuple[float, ...]) -> None:
        if len(learned) != 4:
            return  # another aggregate's: the peers start cold
        self.peer_calls, self.peer_hits, self.peer_at = learned[0], learned[1], learned[2]
        self.peer_seen = int(learned[3])

    def _learn_peers(self, now: float, hit: bool) -> None:
        kept = self._decay(self.peer_at, now)
        self.peer_calls = self.peer_calls * kept + 1.0
        self.peer_seen += 1
        self.peer_hits = self.peer_hits * kept + (1.0 if hit else 0.0)
        if now > self.peer_at:
            self.peer_at = now

    def _usual(self, share: ShareState, call: Call) -> tuple[float, float] | None:
        """The entity's usual share and the calls behind it (None: not known yet)."""
        kept = self._decay(share.usual_at, self.peer_at)
        calls = share.usual_calls * kept
        hits = share.usual_hits * kept
        if self.peer_seen >= PEERS_WARM and self.peer_calls > 0.0:
            # The peers' answered calls in progress are not hits (see
            # `CompiledRule.watch_calls_in_progress`): counted, in the first minutes after a start
            # the peers' share is not that of the short calls that end first.
            talking = own_talking = 0.0
            tracker = self.in_progress
            if tracker is not None:
                # As of when the judged call ended (judged at its deadline), as
                # `CompiledRule.evaluate` asks the calls in progress for the second look.
                by_menu, in_all = tracker.answered_open_at(reported_until(call, call.deadline))
                talking = float(in_all)
                own_talking = float(by_menu.get(call.menu_id, 0))
            peer_calls, peer_hits = self._others(share)
            peer_calls += talking - own_talking
            if peer_calls < OTHERS_WARM:
                # The judged entity is (nearly) all of its peers: a site of one menu,
                # or one that carries nearly all the calls. Every entity's calls then.
                peer_calls, peer_hits = self.peer_calls + talking, self.peer_hits
            weight = min(self.peer_weight, peer_calls)
            calls += weight
            hits += weight * peer_hits / peer_calls
        elif calls < self.peer_weight:
            return None  # neither its own usual nor its peers' known yet
        if calls <= 0.0:
            return None
        # Half a hit at least: a share never seen is small, not impossible.
        return max(hits, 0.5) / calls, calls

    def _others(self, share: ShareState) -> tuple[float, float]:
        """The peers' calls and hits without the entity's window: what it is judged by
        is what the others do. A burst in the first minutes after a start would
        otherwise make much of the peers' share itself and hide in it. Each bucket is
        taken out decayed from its end, the latest any of its calls joined the peers:
        never less than it added (what is left is the others', not a remainder of its
        own), and more by at most a bucket's width over `usual_over` of its calls (15 s
        of an hour, 0.4 %, for the shipped rules)."""
        own_calls = own_hits = 0.0
        starts = share.bucket_start
        bucket_calls, bucket_hits = share.bucket_calls, share.bucket_hits
        width = self.share_bucket_s
        for index in range(len(starts)):
            weight = self._decay(starts[index] + width, self.peer_at)
            own_calls += bucket_calls[index] * weight
            own_hits += bucket_hits[index] * weight
        calls = self.peer_calls - own_calls
        if calls <= 0.0:
            return 0.0, 0.0
        return calls, min(max(self.peer_hits - own_hits, 0.0), calls)

    def _most_surprising(
        self,
        usual: float,
        behind: float,
        starts: list[float],
        calls: list[int],
        hits: list[int],
        more_calls: list[float],
        more_hits: list[float],
    ) -> float:
        """The most surprising stretch of the newest buckets (`calls`, `hits`, aligned
        with `starts`), with `more_calls` and `more_hits` (times, newest first)
        counted in the stretches they fall in."""
        best = 0.0
        n = k = 0
        extra_calls = extra_hits = 0
        for index in range(len(calls) - 1, -1, -1):
            begins = starts[index]
            while extra_calls < len(more_calls) and more_calls[extra_calls] >= begins:
                extra_calls += 1
            while extra_hits < len(more_hits) and more_hits[extra_hits] >= begins:
                extra_hits += 1
            n += calls[index]
            k += hits[index]
            judged = n + extra_calls
            struck = k + extra_hits
            expected = judged * usual
            if struck - expected < self.min_excess:
                continue
            # The usual's own uncertainty (from `behind` calls) widens the spread.
            value = surprise(float(struck), expected) / math.sqrt(1.0 + judged / behind)
            if value > best:
                best = value
        return best

    def measure(self, state: EntityState, call: Call) -> float | None:
        share = cast(ShareState, state)
        known = self._usual(share, call)
        if known is None:
            return None
        usual, behind = known
        return self._most_surprising(
            usual, behind, share.bucket_start, share.bucket_calls, share.bucket_hits, [], []
        )

    def settled(
        self,
        state: EntityState,
        call: Call,
        measured: float,
        ended: list[Call],
        talking: list[Call],
    ) -> float:
        """The most surprising stretch again, each call counted by when it settled
        rather than when it ended: an answered call is known not to be a hit once the
        numerator would not take it were it to end now (a call past 5 s is no short
        call), minutes before it ends, and one whose Bye came is known either way. A
        surge of answered calls (a campaign's first minutes) ends its short calls
        first, so by when they ended its hits come before its other calls; by when
        they settled they come together. The lower of the two counts."""
        share = cast(ShareState, state)
        known = self._usual(share, call)
        starts = share.bucket_start
        settled_calls = share.settled_calls
        if known is None or not starts or len(settled_calls) != len(starts) or settled_calls[0] < 0:
            return measured
        usual, behind = known
        oldest = starts[0]
        numerator = self.numerator
        gate = self.hit_gate
        calls: list[float] = []
        hits: list[float] = []
        for finished in ended:
            answered_at = finished.answered_at
            if answered_at is None or answered_at < oldest:
                continue
            if not numerator.takes(finished):
                calls.append(answered_at)
            elif gate is None:
                calls.append(answered_at)
                hits.append(answered_at)
            # else: a hit only if its caller's conduct, this call not yet in it, passes
            # the gate: left out until it finishes.
        for ongoing in talking:
            answered_at = ongoing.answered_at
            if answered_at is not None and answered_at >= oldest and not numerator.takes(ongoing):
                calls.append(answered_at)
        calls.sort(reverse=True)
        hits.sort(reverse=True)
        value = self._most_surprising(
            usual, behind, starts, settled_calls, share.settled_hits, calls, hits
        )
        return min(measured, value)


AGGREGATES: dict[str, type[Aggregate]] = {
    "count": Count,
    "distinct": Distinct,
    "sum": Sum,
    "ratio": Ratio,
    "baseline_spike": BaselineSpike,
    "first_seen": FirstSeen,
    "sequential": Sequential,
    "concurrent": Concurrent,
    "new_value": NewValue,
    "unusual_share": UnusualShare,
    "paced": Paced,
}


def aggregate(spec: AggregateSpec, condition: Comparison, numerator: Numerator) -> Aggregate:
    """The aggregate a rule's `aggregate:` names, made from it."""
    return AGGREGATES[spec.type](spec, condition, numerator)
