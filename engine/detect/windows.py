"""Sliding event-time windows per key, with a bound on how many keys are tracked.

A window of length W at event time t holds the entries with ts in (t - W, t]:
an entry exactly W old has just left. Entries arrive in event-time order (the
pipeline feeds facts in that order); one that is older than the newest is
still added and expires by its own time.

    t=0   t=10  t=20  t=30           window 30 s, evaluated at t=30:
    |-----x-----x-----x              the entry at 0 is out, 10, 20, 30 are in

Per-key state is small (slots, plain lists), keys idle longer than their
window are dropped first, and past `max_keys` the least recently used key is
evicted and counted, so an attack that invents millions of callers costs a
bounded amount of memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

S = TypeVar("S")


class SlidingWindow:
    """Entries (ts, call_id, value) of one key within the last `length` seconds.

    The aggregate is kept up to date as entries come and go, so reading it is
    O(1) whatever the window holds: `total` (sum of numeric values), `hits`
    (truthy values, for ratios) and, when `distinct` is asked for, a count per value.
    Values are kept only when an aggregate needs them (`keep_values`): a plain count
    holds times and call ids alone, which matters with a million tracked callers.
    """

    __slots__ = ("call_ids", "counts", "head", "hits", "length", "times", "total", "values")

    def __init__(self, length: float, distinct: bool = False, keep_values: bool = True) -> None:
        self.length = length
        self.times: list[float] = []
        self.call_ids: list[str] = []
        self.values: list[object] | None = [] if keep_values or distinct else None
        self.head = 0
        self.total = 0.0
        self.hits = 0
        self.counts: dict[object, int] | None = {} if distinct else None

    def add(self, ts: float, call_id: str, value: object = None) -> None:
        self.times.append(ts)
        self.call_ids.append(call_id)
        values = self.values
        if values is None:
            return
        values.append(value)
        if value is True:
            self.hits += 1
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self.total += value
        if self.counts is not None:
            self.counts[value] = self.counts.get(value, 0) + 1

    def expire(self, now: float) -> None:
        cutoff = now - self.length
        times, head = self.times, self.head
        values, counts = self.values, self.counts
        while head < len(times) and times[head] <= cutoff:
            if values is not None:
                value = values[head]
                if value is True:
                    self.hits -= 1
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    self.total -= value
                if counts is not None:
                    left = counts[value] - 1
                    if left:
                        counts[value] = left
                    else:
                        del counts[value]
            head += 1
        if head > 64 and head * 2 > len(times):
            # Compact now and then; amortised O(1) per entry.
            del self.times[:head], self.call_ids[:head]
            if values is not None:
                del values[:head]
            head = 0
        self.head = head

    def __len__(self) -> int:
        return len(self.times) - self.head

    def live_call_ids(self, last: int = 200) -> list[str]:
        return self.call_ids[max(self.head, len(self.call_ids) - last) :]

    def start(self) -> float | None:
        return self.times[self.head] if len(self) else None

    def distinct(self) -> int:
        if self.counts is not None:
            return len(self.counts)
        return len(set((self.values or [])[self.head :]))


class EwBaseline:
    """Exponentially weighted mean and variance of a key's past window counts,
    closed every `bucket_s` seconds of event time (buckets with nothing count as 0)."""

    __slots__ = ("alpha", "bucket_s", "buckets", "current", "current_start", "mean", "var")

    def __init__(self, bucket_s: float, alpha: float = 0.2) -> None:
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


class KeyedState(Generic[S]):
    """Per-key state in least-recently-used order, at most `max_keys` of them."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.states: OrderedDict[Hashable, S] = OrderedDict()
        self.evicted = 0

    def get(self, key: Hashable) -> S | None:
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def put(self, key: Hashable, state: S) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        while len(self.states) > self.max_keys:
            self.states.popitem(last=False)
            self.evicted += 1

    def drop_idle(self, is_idle: object) -> int:
        """Drop keys from the least recently used end while `is_idle(state)` holds."""
        dropped = 0
        states = self.states
        while states:
            key = next(iter(states))
            if not is_idle(states[key]):  # type: ignore[operator]
                break
            del states[key]
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self.states)
