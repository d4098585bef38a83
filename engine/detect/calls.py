"""Rebuilding calls from their reports, in event time and whatever the arrival order.

A call opens with its first report and is finished when event time passes a
deadline: `settle_s` after its Bye (so a retried OK that arrives after the Bye
still counts), `ring_timeout_s` after its last report while it only rang
(Ringing without OK), or `max_call_s` after its last report once answered.
Nothing here reads the wall clock.

>>> tracker = CallTracker(settle_s=20)
>>> from engine.events import CallEvent, CallState
>>> def report(ts, serial, state):
...     return CallEvent(ts, "c1", serial, state, None, "100", "200", "", "7", "Main")
>>> tracker.observe(report(0.0, 1, CallState.RINGING)).call_id   # the call it opened
'c1'
>>> _ = tracker.observe(report(30.0, 3, CallState.HANGUP))
>>> _ = tracker.observe(report(31.0, 2, CallState.ANSWERED))   # a retried OK, late
>>> [(c.outcome, c.ring_s, c.talk_s) for c in tracker.advance(60.0)]
[('answered', None, None)]
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.events import CallEvent, CallState

OUTCOMES = ("answered", "unanswered", "abandoned", "timed_out", "in_progress")


@dataclass(slots=True)
class Call:
    """A call as rebuilt so far; `outcome` is `in_progress` until it is finished."""

    call_id: str
    caller: str
    callee: str
    forward: str
    menu_id: str
    menu_name: str
    started_at: float
    ringing_at: float | None = None
    ring_code: int | None = None
    answered_at: float | None = None
    answer_serial: int | None = None
    ended_at: float | None = None
    end_serial: int | None = None
    last_at: float = 0.0
    reports: int = 0
    outcome: str = "in_progress"
    deadline: float = 0.0

    @property
    def ring_s(self) -> float | None:
        """Seconds from Ringing to OK (answered) or to Bye (not answered)."""
        if self.ringing_at is None:
            return None
        late_answer = (
            self.answered_at is not None
            and self.ended_at is not None
            and self.answered_at > self.ended_at
        )
        if late_answer:
            return None  # the OK came late (a retry): when it was answered is unknown
        until = self.answered_at if self.answered_at is not None else self.ended_at
        if until is None or until < self.ringing_at:
            return None
        return until - self.ringing_at

    @property
    def talk_s(self) -> float | None:
        """Seconds from OK to Bye; None when unknown (no Bye, or the OK came late)."""
        if self.answered_at is None or self.ended_at is None or self.ended_at < self.answered_at:
            return None
        return self.ended_at - self.answered_at

    @property
    def answered(self) -> bool:
        return self.answered_at is not None

    def field(self, name: str) -> object:
        return getattr(self, name)


@dataclass
class TrackerStats:
    calls_started: int = 0
    calls_finished: int = 0
    late_reports: int = 0
    # Finished early because more than `max_open_calls` were in progress.
    evicted_calls: int = 0


@dataclass
class CallTracker:
    settle_s: float = 6.0
    ring_timeout_s: float = 180.0
    max_call_s: float = 4 * 3600.0
    # Bye without OK after less than this much ringing: the caller gave up (abandoned).
    abandon_s: float = 10.0
    # Finished call ids remembered so a late report does not open a new call.
    remember_finished: int = 100_000
    # Calls in progress kept at most: past it the calls that started first are
    # finished as timed out (and counted), so a flood of calls that never end (a
    # million OKs with no Bye) costs a bounded amount of memory.
    max_open_calls: int = 1_000_000
    stats: TrackerStats = field(default_factory=TrackerStats)

    def __post_init__(self) -> None:
        self.open: dict[str, Call] = {}
        # (deadline, call_id), a heap; entries superseded by a later deadline stay
        # until they come up (cheaper than removing them).
        self.deadlines: list[tuple[float, str]] = []
        # Open calls per caller, in the order they started (dicts keep insertion order).
        self._by_caller: dict[str, dict[str, Call]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        # Calls finished early for the bound, handed out by the next `advance`.
        self.evicted: list[Call] = []
        self.now = 0.0

    def __setstate__(self, state: dict[str, object]) -> None:
        # A snapshot from an engine before a field was added has no value for it:
        # those of a fresh tracker fill in.
        self.__post_init__()
        for old, new in (("_deadlines", "deadlines"), ("_evicted", "evicted")):
            if old in state:  # named so before 2026-12-02
                state[new] = state.pop(old)
        self.__dict__.update(state)

    def open_calls(
        self, caller: str, since: float = float("-inf"), limit: int = 1000
    ) -> list[Call]:
        """Calls of `caller` in progress (started, no Bye, not timed out) that started
        after `since`, newest first, at most `limit` of them (a flood from one caller
        must not make every evaluation scan all its calls)."""
        calls = self._by_caller.get(caller)
        if not calls:
            return []
        found: list[Call] = []
        for call in reversed(calls.values()):
            if call.started_at <= since or len(found) >= limit:
                break
            found.append(call)
        return found

    def observe(self, event: CallEvent) -> Call | None:
        """Take one report; returns the call if this report opened it."""
        ts = event.ts
        if ts > self.now:
            self.now = ts
        call = self.open.get(event.call_id)
        started: Call | None = None
        if call is None:
            if event.call_id in self._finished:
                self.stats.late_reports += 1
                return None
            call = Call(
                event.call_id,
                event.caller,
                event.callee,
                event.forward,
                event.menu_id,
                event.menu_name,
                started_at=ts,
            )
            self.open[event.call_id] = call
            self._by_caller.setdefault(call.caller, {})[call.call_id] = call
            self.stats.calls_started += 1
            started = call
            if len(self.open) > self.max_open_calls:
                self._evict()
        call.reports += 1
        if ts > call.last_at:
            call.last_at = ts
        if ts < call.started_at:
            call.started_at = ts
        state = event.state
        if state is CallState.RINGING:
            if call.ringing_at is None or ts < call.ringing_at:
                call.ringing_at = ts
                call.ring_code = event.code
        elif state is CallState.ANSWERED:
            if call.answered_at is None or ts < call.answered_at:
                call.answered_at = ts
                call.answer_serial = event.serial
        elif call.ended_at is None or ts < call.ended_at:
            call.ended_at = ts
            call.end_serial = event.serial
            self._leave(call)
        self._schedule(call)
        return started

    def _evict(self) -> None:
        """Finish the calls that started first (a sixteenth of the bound at a time, so
        a flood pays for this rarely), as timed out at the current event time."""
        count = len(self.open) - self.max_open_calls + max(1, self.max_open_calls // 16)
        # `open` keeps the order calls opened in; the oldest are at its front.
        for call in list(itertools.islice(self.open.values(), count)):
            call.deadline = self.now
            self.evicted.append(self._finish(call))
        self.stats.evicted_calls += count

    def _leave(self, call: Call) -> None:
        """The call is no longer in progress for concurrency."""
        calls = self._by_caller.get(call.caller)
        if calls is not None:
            calls.pop(call.call_id, None)
            if not calls:
                del self._by_caller[call.caller]

    def _schedule(self, call: Call) -> None:
        if call.ended_at is not None:
            deadline = call.ended_at + self.settle_s
        elif call.answered_at is not None:
            deadline = call.last_at + self.max_call_s
        else:
            deadline = call.last_at + self.ring_timeout_s
        if deadline != call.deadline:
            call.deadline = deadline
            heapq.heappush(self.deadlines, (deadline, call.call_id))

    def advance(self, now: float) -> list[Call]:
        """Event time is now `now`: finish every call whose deadline has passed, in order."""
        if now > self.now:
            self.now = now
        finished: list[Call] = []
        if self.evicted:
            finished, self.evicted = self.evicted, []
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= self.now:
            deadline, call_id = heapq.heappop(deadlines)
            call = self.open.get(call_id)
            if call is None or call.deadline != deadline:
                continue  # superseded by a later deadline
            finished.append(self._finish(call))
        return finished

    def _finish(self, call: Call) -> Call:
        del self.open[call.call_id]
        self._leave(call)
        if call.ended_at is None:
            call.outcome = "timed_out"
        elif call.answered_at is not None:
            call.outcome = "answered"
        else:
            ring = call.ring_s
            call.outcome = (
                "abandoned" if ring is not None and ring < self.abandon_s else "unanswered"
            )
        self._finished[call.call_id] = None
        if len(self._finished) > self.remember_finished:
            self._finished.popitem(last=False)
        self.stats.calls_finished += 1
        return call
