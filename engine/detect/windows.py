"""Sliding event-time windows per key, with a bound on how many keys are tracked.

A window of length W at event time t holds the entries with ts in (t - W, t]:
an entry exactly W old has just left (a rule keeps W, one for all its entities'
windows, and calls `leave_until(t - W)`). Entries arrive in event-time order (the
pipeline feeds facts in that order); one that is older than the newest is
still added and leaves by its own time.

    t=0   t=10  t=20  t=30           window 30 s, evaluated at t=30:
    |-----x-----x-----x              the entry at 0 is out, 10, 20, 30 are in

Per-key state is small (slots, plain lists), keys idle longer than their
window are dropped first, and past `max_keys` the least recently used key is
evicted and counted, so an attack that invents millions of callers costs a
bounded amount of memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from typing import Any, Final, Generic, TypeVar

S = TypeVar("S")

# Up to this many entries a distinct count is counted afresh when asked (cheap),
# beyond it kept up to date in a dict.
_SMALL_WINDOW: Final = 16
# An entry's time as it was given (a float object), typed so: compiled by mypyc, a
# `float` parameter is unboxed, and storing it again makes a float object per window
# entry; as given, every window that takes a call shares the one object (24 bytes a
# window for each of a million tracked callers).
Timestamp = Any


class Snapshotted:
    """Written into detection snapshots as a dict of its `state_fields` (under its state
    type, engine.detect.snapshot), whether this module runs compiled by mypyc (see
    engine/detect/__init__.py) or as Python: compiled classes have no `__dict__`, and
    both must read one snapshot. A snapshot makes the object with no arguments and
    then sets its fields, so every argument of `__init__` has a default."""

    __slots__ = ()

    def state_fields(self) -> tuple[str, ...]:
        return ()

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_fields()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class Entries(Snapshotted):
    """Entries (ts, call_id) of one key, oldest first, that leave when told.

    One flat list `[ts, call_id, ts, call_id, ...]` rather than two lists: with a
    million tracked callers, each holding a window or three of one or two entries,
    the second list's header would cost more than the entries. The window's length
    is the caller's to keep (a rule keeps one for all its entities' windows).
    """

    __slots__ = ("entries", "head")

    def state_fields(self) -> tuple[str, ...]:
        return ("entries", "head")

    def __init__(self) -> None:
        self.entries: list[Any] = []
        self.head = 0  # index in `entries` of the oldest live timestamp

    def add(self, ts: Timestamp, call_id: str, value: object = None) -> None:
        entries = self.entries
        if entries:
            # Two appends, not `+= (ts, call_id)`: no tuple made per entry.
            entries.append(ts)
            entries.append(call_id)
        else:
            # A list made whole is allocated to size; one grown from empty gets room
            # for eight entries, and most windows in a flood of callers hold one.
            self.entries = [ts, call_id]

    def leave_until(self, cutoff: float) -> None:
        """Entries at `cutoff` or before leave."""
        entries, head = self.entries, self.head
        if head < len(entries):
            # Typed, so compiled code compares two doubles rather than two objects.
            oldest: float = entries[head]
            if oldest > cutoff:
                return  # nothing leaves: the common case, for every call a window takes
        while head < len(entries) and entries[head] <= cutoff:
            self._leaving(head >> 1)
            head += 2
        if head > 128 and head > len(entries) // 2:
            # Compact now and then; amortised O(1) per entry.
            self._compact(head)
            head = 0
        self.head = head

    def _leaving(self, index: int) -> None:
        """The entry at `index` (counted in entries) leaves the window."""

    def _compact(self, head: int) -> None:
        del self.entries[:head]

    def __len__(self) -> int:
        return (len(self.entries) - self.head) >> 1

    def last_time(self) -> float | None:
        return self.entries[-2] if self.entries else None

    def live_call_ids(self, last: int = 200) -> list[str]:
        return self.entries[max(self.head, len(self.entries) - 2 * last) + 1 :: 2]

    def start(self) -> float | None:
        return self.entries[self.head] if len(self) else None


class ValueEntries(Entries):
    """Entries that carry a value, with aggregates kept up to date as entries come and
    go, so reading them is O(1) whatever the window holds: `total` (sum of numeric
    values), `hits` (true values, for ratios), and a distinct count."""

    __slots__ = ("counts", "hits", "total", "values")

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "counts", "hits", "total", "values")

    def __init__(self) -> None:
        super().__init__()
        self.values: list[object] = []
        self.total = 0.0
        self.hits = 0
        # The count per value (for distinct counts) is made only once the window holds
        # more than a few entries: most keys in a flood of callers hold one or two,
        # and a dict per key would be the largest thing they keep.
        self.counts: dict[object, int] | None = None

    def add(self, ts: Timestamp, call_id: str, value: object = None) -> None:
        entries = self.entries
        if entries:
            entries.append(ts)
            entries.append(call_id)
            self.values.append(value)
        else:
            self.entries, self.values = [ts, call_id], [value]
        if value is True:
            self.hits += 1
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self.total += value
        if self.counts is not None:
            self.counts[value] = self.counts.get(value, 0) + 1

    def _leaving(self, index: int) -> None:
        value = self.values[index]
        if value is True:
            self.hits -= 1
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self.total -= value
        counts = self.counts
        if counts is not None:
            left = counts[value] - 1
            if left:
                counts[value] = left
            else:
                del counts[value]

    def _compact(self, head: int) -> None:
        del self.entries[:head]
        del self.values[: head >> 1]

    def distinct(self) -> int:
        counts = self.counts
        if counts is not None:
            return len(counts)
        live = self.values[self.head >> 1 :]
        if len(live) <= _SMALL_WINDOW:
            return len(set(live))
        counts = self.counts = {}
        for value in live:
            counts[value] = counts.get(value, 0) + 1
        return len(counts)


class EwBaseline(Snapshotted):
    """Exponentially weighted mean and variance of a key's past window counts,
    closed every `bucket_s` seconds of event time (buckets with nothing count as 0)."""

    __slots__ = ("alpha", "bucket_s", "buckets", "current", "current_start", "mean", "var")

    def state_fields(self) -> tuple[str, ...]:
        return (
            "alpha",
            "bucket_s",
            "buckets",
            "current",
            "current_start",
            "mean",
            "var",
        )

    def __init__(self, bucket_s: float = 0.0, alpha: float = 0.2) -> None:
        self.bucket_s = bucket_s
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.buckets = 0
        self.current = 0
        self.current_start: float | None = None

    def observe(self, ts: float) -> None:
        self.roll(ts)
        self.current += 1

    def roll(self, ts: float) -> None:
        if self.current_start is None:
            self.current_start = math.floor(ts / self.bucket_s) * self.bucket_s
            return
        while ts >= self.current_start + self.bucket_s:
            self._close(self.current)
            self.current = 0
            self.current_start += self.bucket_s
            if self.buckets > 10_000:
                break

    def _close(self, count: float) -> None:
        if self.buckets == 0:
            self.mean = count
        else:
            delta = count - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.buckets += 1


class KeyedState(Snapshotted, Generic[S]):
    """Per-key state in least-recently-used order, at most `max_keys` of them.

    A plain dict, not an OrderedDict: a dict keeps insertion order, a key used is
    moved to the end by taking it out and putting it back, and each entry costs
    about half of an OrderedDict's (which matters with a million callers).
    """

    def state_fields(self) -> tuple[str, ...]:
        return ("max_keys", "states", "evicted")

    def __init__(self, max_keys: int = 0) -> None:
        self.max_keys = max_keys
        self.states: dict[Hashable, S] = {}
        self.evicted = 0

    def get(self, key: Hashable) -> S | None:
        # get and del (direct dict operations when compiled), as in CallTracker.advance.
        states = self.states
        state = states.get(key)
        if state is not None:
            del states[key]
            states[key] = state
        return state

    def put(self, key: Hashable, state: S) -> None:
        states = self.states
        if key in states:
            del states[key]
        states[key] = state
        if len(states) > self.max_keys:
            # Evict a sixteenth at a time: finding the oldest keys walks past the
            # holes that moved keys left at the front of the dict, so do it rarely.
            excess = len(states) - self.max_keys + max(1, self.max_keys // 16)
            for old in list(itertools.islice(states, excess)):
                del states[old]
            self.evicted += excess

    def drop_idle(self, is_idle: object) -> int:
        """Drop keys from the least recently used end while `is_idle(state)` holds."""
        idle = []
        for key, state in self.states.items():
            if not is_idle(state):  # type: ignore[operator]
                break
            idle.append(key)
        for key in idle:
            del self.states[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self.states)


# -- per-entity state of a rule: its window (what its aggregate needs besides is kept
# -- by the aggregate's own subclass of these, in engine.detect.aggregates) ----------


class CountState(Entries):
    """One entity's state for a rule that counts: its window's entries (the rule keeps
    the window's length, one for all its entities) and when it last counted."""

    __slots__ = ("last_ts",)

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "last_ts")

    def __init__(self) -> None:
        super().__init__()
        self.last_ts = 0.0


class ValueState(ValueEntries):
    """For sum, ratio and distinct: entries that carry values."""

    __slots__ = ("last_ts",)

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "last_ts")

    def __init__(self) -> None:
        super().__init__()
        self.last_ts = 0.0


# An entity's state in a rule: a window whose entries carry nothing, or values.
EntityState = CountState | ValueState
