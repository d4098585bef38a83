"""Rebuilding calls from their reports, in event time and whatever the arrival order
(docs/protocol.md, obligation 5).

A call opens with its first report and is finished when event time passes a
deadline: `settle_s` after its Bye (so a retried OK that arrives after the Bye
still counts), `ring_timeout_s` after its last report while it only rang
(Ringing without OK), or `max_call_s` after its last report once answered.
Nothing here reads the wall clock.

A retried OK that arrives after its Bye still makes the call answered (with no ring
or talk time, since when it was answered is unknown): tests/test_detect.py shows
this and the other outcomes. This module is compiled by mypyc where built, so it
keeps no doctests (pytest cannot collect them from a compiled module).
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Final

from engine.core.events import CallEvent, CallState
from engine.detect.windows import Snapshotted, Timestamp

OUTCOMES = ("answered", "unanswered", "abandoned", "timed_out", "in_progress")

# Final: compiled, each is a C static, where `CallState.RINGING` or `heapq.heappush`
# was a lookup in the module's namespace and another on the class or module.
_RINGING: Final = CallState.RINGING
_ANSWERED: Final = CallState.ANSWERED
_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop
# Every this many finished calls, the deadline entries are counted (and the stale
# dropped if they far outnumber the open calls: `_forget_stale_deadlines`).
_STALE_CHECK_EVERY: Final = 65_536
# The answered calls in progress are marked every this many seconds of event time, the
# last this many marks kept: a call is judged within `settle_s` of its Bye, a mark or
# two later (CallTracker.answered_open_at).
_MARK_S: Final = 5.0
_MARKS_KEPT: Final = 16


@dataclass(slots=True)
class Call(Snapshotted):
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
    switch: str = ""

    def __init__(
        self,
        call_id: str,
        caller: str,
        callee: str,
        forward: str,
        menu_id: str,
        menu_name: str,
        started_at: float,
        ringing_at: float | None = None,
        ring_code: int | None = None,
        answered_at: float | None = None,
        answer_serial: int | None = None,
        ended_at: float | None = None,
        end_serial: int | None = None,
        last_at: float = 0.0,
        reports: int = 0,
        outcome: str = "in_progress",
        deadline: float = 0.0,
        switch: str = "",
    ) -> None:
        # Written out rather than made by @dataclass: compiled, this runs as C for
        # every call opened; the dataclass's own is Python (3 % of detection then).
        self.call_id = call_id
        self.caller = caller
        self.callee = callee
        self.forward = forward
        self.menu_id = menu_id
        self.menu_name = menu_name
        self.started_at = started_at
        self.ringing_at = ringing_at
        self.ring_code = ring_code
        self.answered_at = answered_at
        self.answer_serial = answer_serial
        self.ended_at = ended_at
        self.end_serial = end_serial
        self.last_at = last_at
        self.reports = reports
        self.outcome = outcome
        self.deadline = deadline
        # The switch that reported the call's first report (engine.ingest.senders).
        self.switch = switch

    def state_fields(self) -> tuple[str, ...]:
        return (
            "ringing_at",
            "ring_code",
            "answered_at",
            "answer_serial",
            "ended_at",
            "end_serial",
            "last_at",
            "reports",
            "outcome",
            "deadline",
            # Last, and not among what a call is made with: a snapshot written before
            # calls had a switch leaves it "" (engine.detect.state revives calls so).
            "switch",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # What a call is made with, then the rest (see Snapshotted).
        made_with = (self.call_id, self.caller, self.callee, self.forward, self.menu_id)
        return (Call, (*made_with, self.menu_name, self.started_at), self.__getstate__())

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


# Where a call has no such time (or ring code): NaN in the columns, null in the table.
_NAN: Final = math.nan

CALL_COLUMNS = (
    "call_id",
    "caller",
    "callee",
    "forward",
    "menu_id",
    "menu_name",
    "started_at",
    "ringing_at",
    "answered_at",
    "ended_at",
    "ring_s",
    "talk_s",
    "outcome",
    "ring_code",
    "reports",
    "finished_at",
    "switch",
)


def reported_until(call: Call, now: float) -> float:
    """Up to when the reports a call judged at `now` is judged with go: its Bye, if it
    came by then, else `now`. A replay cut there and resumed from a snapshot reads the
    same reports up to then as one that was not cut; what came after may differ."""
    ended_at = call.ended_at
    return ended_at if ended_at is not None and ended_at <= now else now


def _or_nan(value: float | None) -> float:
    return _NAN if value is None else value


def call_columns(calls: list[Call]) -> dict[str, Any]:
    """The `calls` table's columns for these calls, named and ordered as
    engine.lake.parquet.CALL_SCHEMA (CALL_COLUMNS): texts as lists of str, numbers (times in
    epoch seconds) as `array("d")` with NaN where unknown. Built here (compiled where
    built) for the lake writer's frame, and cheap to pickle from a process that runs
    detection: a column of doubles pickles as one block of bytes, and each text is one
    object per distinct value, so pickle sends a repeated caller once."""
    call_id: list[str] = []
    caller: list[str] = []
    callee: list[str] = []
    forward: list[str] = []
    menu_id: list[str] = []
    menu_name: list[str] = []
    outcome: list[str] = []
    started_at: list[float] = []
    ringing_at: list[float] = []
    answered_at: list[float] = []
    ended_at: list[float] = []
    ring_s: list[float] = []
    talk_s: list[float] = []
    ring_code: list[float] = []
    reports: list[float] = []
    finished_at: list[float] = []
    switch: list[str] = []
    # Equal texts of different calls as one object.
    texts: dict[str, str] = {}
    for call in calls:
        call_id.append(call.call_id)
        caller.append(texts.setdefault(call.caller, call.caller))
        callee.append(texts.setdefault(call.callee, call.callee))
        forward.append(texts.setdefault(call.forward, call.forward))
        menu_id.append(texts.setdefault(call.menu_id, call.menu_id))
        menu_name.append(texts.setdefault(call.menu_name, call.menu_name))
        outcome.append(call.outcome)
        started_at.append(call.started_at)
        ringing_at.append(_or_nan(call.ringing_at))
        answered_at.append(_or_nan(call.answered_at))
        ended_at.append(_or_nan(call.ended_at))
        ring_s.append(_or_nan(call.ring_s))
        talk_s.append(_or_nan(call.talk_s))
        code = call.ring_code
        ring_code.append(_NAN if code is None else float(code))
        reports.append(float(call.reports))
        finished_at.append(call.deadline)
        switch.append(texts.setdefault(call.switch, call.switch))
    return {
        "call_id": call_id,
        "caller": caller,
        "callee": callee,
        "forward": forward,
        "menu_id": menu_id,
        "menu_name": menu_name,
        "started_at": array("d", started_at),
        "ringing_at": array("d", ringing_at),
        "answered_at": array("d", answered_at),
        "ended_at": array("d", ended_at),
        "ring_s": array("d", ring_s),
        "talk_s": array("d", talk_s),
        "outcome": outcome,
        "ring_code": array("d", ring_code),
        "reports": array("d", reports),
        "finished_at": array("d", finished_at),
        "switch": switch,
    }


_INF: Final = math.inf
# What a deadline is for: which of the tracker's in-order queues it may join.
_RING_TIMEOUT: Final = 0
_SETTLE: Final = 1
_LONG_CALL: Final = 2
_OUT_OF_ORDER: Final = 3


class DeadlineQueue(Snapshotted):
    """Deadlines of one kind with their calls, each pushed no earlier than the one
    before: a flat list `[deadline, call_id, ...]` read from a moving head, where a heap
    compares its way down for every entry and needs a dict from each deadline to its
    calls. Event time mostly moves forward, so each kind's deadlines (a report's time
    plus that kind's fixed delay) come in order; one that does not goes to the heap."""

    def state_fields(self) -> tuple[str, ...]:
        return ("items", "head")

    def __init__(self) -> None:
        # Deadlines as given (float objects); typed locals below make each comparison
        # one of two doubles when compiled.
        self.items: list[Any] = []
        self.head = 0  # index in `items` of the earliest deadline

    def first(self) -> float:
        if self.head == len(self.items):
            return _INF
        first: float = self.items[self.head]
        return first

    def takes(self, deadline: float) -> bool:
        items = self.items
        if self.head == len(items):
            return True
        last: float = items[-2]
        return deadline >= last

    def pop(self) -> str:
        """The call id of the earliest entry, which leaves."""
        items = self.items
        call_id: str = items[self.head + 1]
        head = self.head + 2
        if head > 2048 and head > len(items) // 2:
            # Compact now and then; amortised O(1) per entry.
            del items[:head]
            head = 0
        self.head = head
        return call_id


@dataclass
class TrackerStats(Snapshotted):
    calls_started: int = 0
    calls_finished: int = 0
    late_reports: int = 0
    # Finished early because more than `max_open_calls` were in progress.
    evicted_calls: int = 0
    # Times a rule looked through a caller's calls in progress (concurrency).
    open_call_scans: int = 0

    def state_fields(self) -> tuple[str, ...]:
        return (
            "calls_started",
            "calls_finished",
            "late_reports",
            "evicted_calls",
            "open_call_scans",
        )


@dataclass
class CallTracker(Snapshotted):
    settle_s: float = 6.0
    ring_timeout_s: float = 180.0
    max_call_s: float = 4 * 3600.0
    # Bye without OK after less than this much ringing: the caller gave up (abandoned).
    abandon_s: float = 10.0
    # Finished call ids remembered so a late report does not open a new call.
    remember_finished: int = 100_000
    # Calls in progress kept at most: past it the calls that started first are
    # finished as timed out (and counted), so a flood of calls that never end (a
    # million OKs with no Bye) costs a bounded amount of memory: about 740 bytes a
    # call in progress, 140 MiB at this bound.
    max_open_calls: int = 200_000
    stats: TrackerStats = field(default_factory=TrackerStats)

    def state_fields(self) -> tuple[str, ...]:
        return (
            "settle_s",
            "ring_timeout_s",
            "max_call_s",
            "abandon_s",
            "remember_finished",
            "max_open_calls",
            "stats",
            "open",
            "deadlines",
            "_in_order",
            "next_due",
            "_due",
            "_by_caller",
            "_finished",
            "evicted",
            "now",
            "answered_marks",
        )

    def __post_init__(self) -> None:
        self.open: dict[str, Call] = {}
        # For each open call an entry no later than its deadline (see `_schedule`);
        # entries that no longer match stay until they come up (cheaper than removing
        # them). Most go to the queue of their kind (see DeadlineQueue): ring timeouts,
        # settles after a Bye, long calls' limits.
        self._in_order = [DeadlineQueue(), DeadlineQueue(), DeadlineQueue()]
        # The rest (reports out of order), a heap of floats, and the call ids due at
        # each: floats, which compare as doubles, where (deadline, call_id) tuples would
        # compare element by element. One call id due at a moment is kept as it is,
        # several in a list.
        self.deadlines: list[float] = []
        self._due: dict[float, str | list[str]] = {}
        # The earliest entry of the queues and the heap (inf: none): detection asks
        # it for every report.
        self.next_due = _INF
        # Open calls per caller, in the order they started (dicts keep insertion order).
        self._by_caller: dict[str, dict[str, Call]] = {}
        # Insertion order is age: the oldest are forgotten first (see `_finish`).
        self._finished: dict[str, None] = {}
        # Calls finished early for the bound, handed out by the next `advance`.
        self.evicted: list[Call] = []
        self.now = 0.0
        # Answered calls in progress (an OK, no Bye yet) through a menu, per menu and
        # in all (`unusual_share` counts the other menus' as calls that are no short
        # call: all but those answered in the last seconds are past 5 s). Worked out
        # again from `open` when a snapshot is read, not kept in it.
        self.answered_open: dict[str, int] = {}
        self.answered_open_all = 0
        # The counts as they stood before the first report at or after each
        # `_MARK_S` boundary, the last `_MARKS_KEPT` of them (`answered_open_at`), and
        # the next boundary.
        self.answered_marks: list[tuple[float, dict[str, int], int]] = []
        self._next_mark = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._count_answered_open()
        marks = self.answered_marks
        self._next_mark = marks[-1][0] + _MARK_S if marks else 0.0

    def _count_answered_open(self) -> None:
        counts: dict[str, int] = {}
        for call in self.open.values():
            if call.answered_at is not None and call.ended_at is None and call.menu_id:
                counts[call.menu_id] = counts.get(call.menu_id, 0) + 1
        self.answered_open = counts
        self.answered_open_all = sum(counts.values())

    def _mark(self, ts: float) -> None:
        boundary = ts - math.fmod(ts, _MARK_S)
        marks = self.answered_marks
        marks.append((boundary, dict(self.answered_open), self.answered_open_all))
        if len(marks) > _MARKS_KEPT:
            del marks[0]
        self._next_mark = boundary + _MARK_S

    def answered_open_at(self, at: float) -> tuple[dict[str, int], int]:
        """The answered calls in progress per menu, and in all, as of event time `at`:
        as they stood before the first report at or after the last boundary by then
        (the oldest mark kept, for a time before it; the counts now, when none is
        kept). The same in a run cut at any report, moved on a few seconds and resumed
        from its snapshot as in one that never stopped (the reports after `at` may or
        may not have been read when a call that ended at `at` is judged), but for
        answered calls that time out within those seconds."""
        marks = self.answered_marks
        for index in range(len(marks) - 1, -1, -1):
            mark = marks[index]
            if mark[0] <= at:
                return mark[1], mark[2]
        if marks:
            return marks[0][1], marks[0][2]
        return self.answered_open, self.answered_open_all

    def _answer_over(self, call: Call) -> None:
        """An answered call in progress got its Bye or timed out."""
        menu = call.menu_id
        if not menu:
            return
        left = self.answered_open.get(menu, 0) - 1
        if left > 0:
            self.answered_open[menu] = left
        else:
            self.answered_open.pop(menu, None)
        self.answered_open_all -= 1

    def open_calls(
        self, caller: str, since: float = float("-inf"), limit: int = 1000
    ) -> list[Call]:
        """Calls of `caller` in progress (started, no Bye, not timed out) that started
        after `since`, newest first, at most `limit` of them (a flood from one caller
        must not make every evaluation scan all its calls)."""
        self.stats.open_call_scans += 1
        calls = self._by_caller.get(caller)
        if not calls:
            return []
        found: list[Call] = []
        for call in reversed(calls.values()):
            if call.started_at <= since or len(found) >= limit:
                break
            found.append(call)
        return found

    def open_count(self, caller: str) -> int:
        """How many calls of `caller` are in progress (`open_calls` with no window)."""
        calls = self._by_caller.get(caller)
        return 0 if calls is None else len(calls)

    def observe(self, event: CallEvent) -> Call | None:
        """Take one report; returns the call if this report opened it."""
        ts = event.ts
        # Whatever `now` is: a report after `advance` moved time on (something was due
        # by it, or a quiet switch's tick) marks too.
        if ts >= self._next_mark:
            self._mark(ts)
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
                switch=event.switch,
            )
            self.open[event.call_id] = call
            # Not setdefault(caller, {}): that makes a dict for every call opened.
            by_caller = self._by_caller.get(call.caller)
            if by_caller is None:
                self._by_caller[call.caller] = {call.call_id: call}
            else:
                by_caller[call.call_id] = call
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
        if state is _RINGING:
            if call.ringing_at is None or ts < call.ringing_at:
                call.ringing_at = ts
                call.ring_code = event.code
        elif state is _ANSWERED:
            if call.answered_at is None and call.ended_at is None and call.menu_id:
                menu = call.menu_id
                self.answered_open[menu] = self.answered_open.get(menu, 0) + 1
                self.answered_open_all += 1
            if call.answered_at is None or ts < call.answered_at:
                call.answered_at = ts
                call.answer_serial = event.serial
        elif call.ended_at is None or ts < call.ended_at:
            if call.ended_at is None and call.answered_at is not None:
                self._answer_over(call)
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
        if calls is not None and call.call_id in calls:
            del calls[call.call_id]
            if not calls:
                del self._by_caller[call.caller]

    def _schedule(self, call: Call) -> None:
        if call.ended_at is not None:
            deadline, kind = call.ended_at + self.settle_s, _SETTLE
        elif call.answered_at is not None:
            deadline, kind = call.last_at + self.max_call_s, _LONG_CALL
        else:
            deadline, kind = call.last_at + self.ring_timeout_s, _RING_TIMEOUT
        # The heap needs an entry no later than each open call's deadline, not one per
        # deadline: a later deadline is found when the earlier entry comes up (see
        # `advance`). An answered call's deadline moves four hours out at its OK and
        # back to seconds at its Bye; pushing each made the heap hold every answered
        # call of the last four hours, and its pops a seventh of detection.
        previous = call.deadline
        if deadline != previous:
            call.deadline = deadline
            if deadline < previous or previous == 0.0:
                # Its entry at the later deadline is skipped when it comes up (the
                # call's deadline no longer matches; most calls end within their
                # ring timeout).
                self._push(deadline, call.call_id, kind)

    def _push(self, deadline: Timestamp, call_id: str, kind: int) -> None:
        if deadline < self.next_due:
            self.next_due = deadline
        if kind != _OUT_OF_ORDER:
            queue = self._in_order[kind]
            if queue.takes(deadline):
                # `deadline` as given (a float object), shared with the call's.
                queue.items.append(deadline)
                queue.items.append(call_id)
                return
        due = self._due.get(deadline)
        if due is None:
            self._due[deadline] = call_id
            _heappush(self.deadlines, deadline)
        elif isinstance(due, str):
            self._due[deadline] = [due, call_id]
        else:
            due.append(call_id)

    def advance(self, now: float) -> list[Call]:
        """Event time is now `now`: finish every call whose deadline has passed, in order."""
        if now > self.now:
            self.now = now
        finished: list[Call] = []
        if self.evicted:
            finished, self.evicted = self.evicted, []
        while self.next_due <= self.now:
            deadline = self.next_due
            due = self._take_due(deadline)
            # Calls due at the same moment finish in call_id order.
            for call_id in due if len(due) == 1 else sorted(due):
                call = self.open.get(call_id)
                if call is None or call.deadline < deadline:
                    continue  # finished already, or superseded by an earlier deadline
                if call.deadline > deadline:
                    # Moved later since this entry was pushed: queued again at its
                    # deadline, so calls still finish in (deadline, call_id) order.
                    self._push(call.deadline, call_id, _OUT_OF_ORDER)
                    continue
                finished.append(self._finish(call))
        return finished

    def _take_due(self, deadline: float) -> list[str]:
        """Take every entry at `deadline` (the earliest: `next_due`) from the queues and
        the heap, with their call ids (some may no longer be due: see `advance`), and
        work out `next_due` again."""
        due: list[str] = []
        for queue in self._in_order:
            while queue.first() == deadline:
                due.append(queue.pop())
        heap = self.deadlines
        while heap and heap[0] == deadline:
            _heappop(heap)
            # get and del, which compile to direct dict operations (pop with a default
            # is a method call looked up by name).
            ids = self._due.get(deadline)
            if ids is None:
                continue  # an equal entry came up already
            del self._due[deadline]
            if isinstance(ids, str):
                due.append(ids)
            else:
                due.extend(ids)
        following = heap[0] if heap else _INF
        for queue in self._in_order:
            first = queue.first()
            if first < following:
                following = first
        self.next_due = following
        return due

    def _finish(self, call: Call) -> Call:
        del self.open[call.call_id]
        self._leave(call)
        if call.ended_at is None and call.answered_at is not None:
            self._answer_over(call)
        if call.ended_at is None:
            call.outcome = "timed_out"
        elif call.answered_at is not None:
            call.outcome = "answered"
        else:
            ring = call.ring_s
            call.outcome = (
                "abandoned" if ring is not None and ring < self.abandon_s else "unanswered"
            )
        finished = self._finished
        finished[call.call_id] = None
        if len(finished) > self.remember_finished + self.remember_finished // 16:
            # The oldest sixteenth at once: a plain dict costs half an OrderedDict's
            # upkeep per call, and finding its oldest keys walks past the holes that
            # earlier deletions left, so do it rarely.
            for old in list(itertools.islice(finished, len(finished) - self.remember_finished)):
                del finished[old]
        self.stats.calls_finished += 1
        if self.stats.calls_finished % _STALE_CHECK_EVERY == 0:
            self._forget_stale_deadlines()
        return call

    def _forget_stale_deadlines(self) -> None:
        """Drop the queues' and the heap's entries that can no longer finish a call, when
        they outnumber the open calls' by far. An answered call leaves an entry four
        hours out (`max_call_s`) when its Bye brings its deadline to seconds: at a
        flood's rate those, each holding its call id, grew by gigabytes. An entry is
        kept while its call is open and its deadline is no later than the call's (each
        open call keeps one such entry: see `_schedule`), so no call finishes
        differently; the queues keep their order."""
        open_calls = self.open
        queued = sum(len(queue.items) - queue.head for queue in self._in_order) // 2
        if queued + len(self.deadlines) <= 4 * len(open_calls) + _STALE_CHECK_EVERY:
            return
        for queue in self._in_order:
            items = queue.items
            kept: list[Any] = []
            for at in range(queue.head, len(items), 2):
                deadline: float = items[at]
                call = open_calls.get(items[at + 1])
                if call is not None and deadline <= call.deadline:
                    kept.append(items[at])
                    kept.append(items[at + 1])
            queue.items = kept
            queue.head = 0
        due: dict[float, str | list[str]] = {}
        for deadline, ids in self._due.items():
            live = [
                call_id
                for call_id in ([ids] if isinstance(ids, str) else ids)
                if (call := open_calls.get(call_id)) is not None and deadline <= call.deadline
            ]
            if live:
                due[deadline] = live[0] if len(live) == 1 else live
        self._due = due
        self.deadlines = list(due)
        heapq.heapify(self.deadlines)
        following = self.deadlines[0] if self.deadlines else _INF
        for queue in self._in_order:
            first = queue.first()
            if first < following:
                following = first
        self.next_due = following
