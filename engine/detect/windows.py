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

A window also holds a bounded amount whatever the rate of its key's calls: it keeps
its newest calls one by one (time and call id: the evidence an alert names is the
newest `EVIDENCE_CALLS`), at least `KEEP_EXACT` of them, and once it holds
`FOLD_AT` folds the older ones into `BUCKETS_PER_WINDOW` time buckets of counts
(`Folded`). A bucket leaves when its newest call would have: until then the window
may still count up to one bucket's calls (1/64 of its length at its old edge) that
a window kept call by call has let go. A window that never holds `FOLD_AT` calls at
once (every window of the scenario library, and every caller's in a flood of
callers) is never folded, so its counts are exact. (A distinct count's buckets keep
each folded value's count: bounded by the distinct values in the window, not by how
often they come.)

    oldest ......................................................... newest
    [Folded: bucket, bucket, ...] [ts, call_id, ts, call_id, ... KEEP_EXACT to FOLD_AT]
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
# The newest calls an alert names as its evidence (and a model's finding asks for).
EVIDENCE_CALLS: Final = 200
# A window holding this many calls one by one folds all but its newest `KEEP_EXACT`
# into time buckets (see the module's docstring): KEEP_EXACT >= EVIDENCE_CALLS, so
# the evidence is the same as a window kept call by call names; folding half at a
# time costs O(1) per call, amortised.
FOLD_AT: Final = 1024
KEEP_EXACT: Final = 512
# A folded window's buckets are its length / BUCKETS_PER_WINDOW long.
BUCKETS_PER_WINDOW: Final = 64
# An entry's time as it was given (a float object), typed so: compiled by mypyc, a
# `float` parameter is unboxed, and storing it again makes a float object per window
# entry; as given, every window that takes a call shares the one object (24 bytes a
# window for each of a million tracked callers).
Timestamp = Any


class Snapshotted:
    """Written into detection snapshots as a dict of its `state_fields` (under its state
    type, engine.detect.snapshot; many of one class under their keys as rows of them,
    engine.detect.state), whether this module runs compiled by mypyc (see
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

    def state_row(self) -> tuple[Any, ...]:
        """The values of `state_fields`, in their order: how a snapshot writes many
        objects of one class (`engine.detect.state`, "keyed-rows"). A class with
        a million of them (a caller's) reads its fields directly instead."""
        return tuple([getattr(self, name) for name in self.state_fields()])

    def set_row(self, row: tuple[Any, ...]) -> None:
        """The fields from a `state_row` (what `__setstate__` does with its dict)."""
        self.__setstate__(dict(zip(self.state_fields(), row, strict=True)))


class Bucket(Snapshotted):
    """Calls folded out of a window (`Folded`): how many, how many of their values were
    true (`hits`, for ratios), the sum of their numeric values (`total`), each value's
    count where a distinct count needs them (`values`), and the oldest and newest of
    their times; calls at `limit` or after go to the next bucket."""

    __slots__ = ("count", "first", "hits", "last", "limit", "total", "values")

    def state_fields(self) -> tuple[str, ...]:
        return ("count", "first", "hits", "last", "limit", "total", "values")

    def __init__(self, first: float = 0.0, limit: float = 0.0) -> None:
        self.first = first
        self.last = first
        self.limit = limit
        self.count = 0
        self.hits = 0
        self.total = 0.0
        self.values: dict[object, int] | None = None


class Folded(Snapshotted):
    """The older part of a window that held `FOLD_AT` calls one by one: buckets of
    `bucket_s` seconds of event time (at most BUCKETS_PER_WINDOW + 1 of a window's
    length, whatever its rate), oldest first, and how many calls they hold in all."""

    __slots__ = ("bucket_s", "buckets", "count")

    def state_fields(self) -> tuple[str, ...]:
        return ("bucket_s", "buckets", "count")

    def __init__(self, bucket_s: float = 1.0) -> None:
        self.bucket_s = bucket_s
        self.buckets: list[Bucket] = []
        self.count = 0

    def take(self, ts: float, value: object, keep_values: bool) -> None:
        buckets = self.buckets
        if buckets and ts < buckets[-1].limit:
            bucket = buckets[-1]
        else:
            start = math.floor(ts / self.bucket_s) * self.bucket_s
            bucket = Bucket(ts, start + self.bucket_s)
            buckets.append(bucket)
        if ts > bucket.last:
            bucket.last = ts
        bucket.count += 1
        self.count += 1
        if value is True:
            bucket.hits += 1
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bucket.total += value
        if keep_values:
            values = bucket.values
            if values is None:
                values = bucket.values = {}
            values[value] = values.get(value, 0) + 1

    def leaving(self, cutoff: float) -> list[Bucket]:
        """The buckets whose newest call is at `cutoff` or before, oldest first, taken
        out (up to the first that stays)."""
        buckets = self.buckets
        gone = 0
        while gone < len(buckets) and buckets[gone].last <= cutoff:
            gone += 1
        if not gone:
            return []
        leaving = buckets[:gone]
        del buckets[:gone]
        for bucket in leaving:
            self.count -= bucket.count
        return leaving

    def start(self) -> float | None:
        return self.buckets[0].first if self.buckets else None

    def last_time(self) -> float | None:
        return self.buckets[-1].last if self.buckets else None


class Entries(Snapshotted):
    """Entries (ts, call_id) of one key, oldest first, that leave when told.

    One flat list `[ts, call_id, ts, call_id, ...]` rather than two lists: with a
    million tracked callers, each holding a window or three of one or two entries,
    the second list's header would cost more than the entries. The window's length
    is the caller's to keep (a rule keeps one for all its entities' windows).

    A window folded (`fold`, see the module's docstring) keeps its `Folded` older part
    as the list's first item, ahead of the pairs: then `head` is odd. (Odd, rather than
    a field of its own: a field costs 8 bytes in each of millions of windows that are
    never folded.)
    """

    __slots__ = ("entries", "head")

    def state_fields(self) -> tuple[str, ...]:
        return ("entries", "head")

    def __init__(self) -> None:
        self.entries: list[Any] = []
        # Index in `entries` of the oldest live timestamp; odd when entries[0] is the
        # window's folded part.
        self.head = 0

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

    def leave_until(self, cutoff: float) -> bool:
        """Entries at `cutoff` or before leave (a folded bucket, with its newest); True
        when the window then holds FOLD_AT entries one by one (time to `fold` it)."""
        entries, head = self.entries, self.head
        if head & 1:
            folded: Folded = entries[0]
            buckets = folded.buckets
            if not buckets or buckets[0].last <= cutoff:
                self._leave_folded(folded, cutoff)
                entries, head = self.entries, self.head
        if head < len(entries):
            # Typed, so compiled code compares two doubles rather than two objects.
            oldest: float = entries[head]
            if oldest > cutoff:
                # Nothing leaves: the common case, for every call a window takes.
                return len(entries) - head >= 2 * FOLD_AT
        while head < len(entries) and entries[head] <= cutoff:
            self._leaving(head >> 1)
            head += 2
        if head > 128 and head > len(entries) // 2:
            # Compact now and then; amortised O(1) per entry.
            self._compact(head)
            head &= 1
        self.head = head
        return len(self.entries) - head >= 2 * FOLD_AT

    def _leave_folded(self, folded: Folded, cutoff: float) -> None:
        for bucket in folded.leaving(cutoff):
            self._bucket_leaving(bucket)
        if not folded.buckets:
            # Nothing folded is left: the window is kept call by call again.
            del self.entries[0]
            self.head -= 1

    def _leaving(self, index: int) -> None:
        """The entry at `index` (counted in entries) leaves the window."""

    def _bucket_leaving(self, bucket: Bucket) -> None:
        """A folded bucket leaves the window (its count, with the `Folded` it was in)."""

    def _compact(self, head: int) -> None:
        del self.entries[head & 1 : head]

    def fold(self, bucket_s: float, keep_values: bool = False) -> None:
        """All but the newest KEEP_EXACT entries go into the folded part's buckets of
        `bucket_s` seconds (with each value's count, if `keep_values`)."""
        entries, head = self.entries, self.head
        moving = ((len(entries) - head) >> 1) - KEEP_EXACT
        if moving <= 0:
            return
        folded: Folded = entries[0] if head & 1 else Folded(bucket_s)
        keep_values = self._before_fold(keep_values)
        first = head >> 1
        for index in range(moving):
            folded.take(entries[head + 2 * index], self._value(first + index), keep_values)
        kept: list[Any] = [folded]
        kept.extend(entries[head + 2 * moving :])
        self.entries = kept
        self._values_folded(first + moving)
        self.head = 1

    def _before_fold(self, keep_values: bool) -> bool:
        return keep_values

    def _value(self, index: int) -> object:
        return None

    def _values_folded(self, count: int) -> None:
        """The first `count` values (counted in entries) are folded or gone."""

    def __len__(self) -> int:
        entries, head = self.entries, self.head
        exact = (len(entries) - head) >> 1
        if head & 1:
            folded: Folded = entries[0]
            return exact + folded.count
        return exact

    def last_time(self) -> float | None:
        entries, odd = self.entries, self.head & 1
        if len(entries) >= 2 + odd:
            last: float = entries[-2]
            return last
        if odd:
            folded: Folded = entries[0]
            return folded.last_time()
        return None

    def live_call_ids(self, last: int = EVIDENCE_CALLS) -> list[str]:
        return self.entries[max(self.head, len(self.entries) - 2 * last) + 1 :: 2]

    def start(self) -> float | None:
        entries, head = self.entries, self.head
        if head & 1:
            folded: Folded = entries[0]
            started = folded.start()
            if started is not None:
                return started
        if head < len(entries):
            oldest: float = entries[head]
            return oldest
        return None


class ValueEntries(Entries):
    """Entries that carry a value, with aggregates kept up to date as entries come and
    go, so reading them is O(1) whatever the window holds: `total` (sum of numeric
    values), `hits` (true values, for ratios), and a distinct count."""

    __slots__ = ("counts", "hits", "total", "values")

    def state_fields(self) -> tuple[str, ...]:
        return (*super().state_fields(), "counts", "hits", "total", "values")

    def __init__(self) -> None:
        super().__init__()
        # One per entry held one by one (`values[i]` is the value of the i-th pair).
        self.values: list[object] = []
        # Over the whole window, folded part included.
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

    def _bucket_leaving(self, bucket: Bucket) -> None:
        self.hits -= bucket.hits
        self.total -= bucket.total
        counts, values = self.counts, bucket.values
        if counts is not None and values is not None:
            for value, count in values.items():
                left = counts[value] - count
                if left:
                    counts[value] = left
                else:
                    del counts[value]

    def _compact(self, head: int) -> None:
        del self.entries[head & 1 : head]
        del self.values[: head >> 1]

    def _before_fold(self, keep_values: bool) -> bool:
        # A distinct count kept up to date must see each folded value leave.
        if keep_values and self.counts is None:
            self.distinct()
        return keep_values or self.counts is not None

    def _value(self, index: int) -> object:
        return self.values[index]

    def _values_folded(self, count: int) -> None:
        del self.values[:count]

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
