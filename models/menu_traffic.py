"""What the menu model (models/menu.py) keeps per menu: its calls within the last
window as columns, with their counts and sums kept up to date as calls come and go.

Every call a menu takes goes through here twice (into the window, out of it), so it
is compiled by mypyc with the detection (engine/detect/__init__.py); it keeps no
doctests for that reason. Both classes are written into snapshots by their state
fields (engine.detect.windows.Snapshotted), the same compiled or not.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections import deque
from typing import Final

from engine.detect.calls import Call
from engine.detect.windows import Snapshotted

# Distinct callers in a menu's window are estimated from counts in this many
# buckets of caller numbers (linear counting, models.menu.distinct_estimate): exact
# enough up to tens of thousands of callers, and a flood of invented callers costs
# the same 64 KiB per menu as a quiet day, where a set of callers would grow with it.
CALLER_BUCKETS: Final = 16_384

# A call's flags in a menu's window.
ANSWERED: Final = 1
SHORT: Final = 2
FORWARDED: Final = 4
RANG: Final = 8  # ring_s is known
TALKED: Final = 16  # talk_log is known
# Call ids a finding cites: the newest of the window.
EVIDENCE: Final = 200


class CallWindow(Snapshotted):
    """Calls oldest first as columns: time, caller bucket, flags, ring seconds, log of
    talk seconds: 27 bytes a call, where a tuple of Python objects took about 200. A
    menu's window holds every call of its last `window` seconds, so at a flood's
    rate (tens of thousands of calls a second) this is what bounds the model's memory."""

    __slots__ = ("bucket", "flags", "head", "ring", "talk", "ts")

    def state_fields(self) -> tuple[str, ...]:
        return ("ts", "bucket", "flags", "ring", "talk", "head")

    def __init__(self) -> None:
        self.ts: array[float] = array("d")
        self.bucket: array[int] = array("H")
        self.flags: array[int] = array("B")
        self.ring: array[float] = array("d")
        self.talk: array[float] = array("d")
        self.head = 0  # the oldest call still in the window

    def __len__(self) -> int:
        return len(self.ts) - self.head

    def append(self, ts: float, bucket: int, flags: int, ring: float, talk: float) -> None:
        self.ts.append(ts)
        self.bucket.append(bucket)
        self.flags.append(flags)
        self.ring.append(ring)
        self.talk.append(talk)

    def extend(self, other: CallWindow, start: int, stop: int) -> None:
        """`other`'s calls start to stop, after these: one block copy per column, the
        columns' types being the same."""
        self.ts.extend(other.ts[start:stop])
        self.bucket.extend(other.bucket[start:stop])
        self.flags.extend(other.flags[start:stop])
        self.ring.extend(other.ring[start:stop])
        self.talk.extend(other.talk[start:stop])

    def first_ts(self) -> float:
        return float(self.ts[self.head])

    def calls(self) -> list[tuple[float, int, int, float, float]]:
        """(ts, bucket, flags, ring, talk) of each call in the window, oldest first."""
        head = self.head
        return list(
            zip(
                self.ts[head:],
                self.bucket[head:],
                self.flags[head:],
                self.ring[head:],
                self.talk[head:],
                strict=True,
            )
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallWindow) and self.calls() == other.calls()

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        raise TypeError("unhashable type: 'CallWindow'")

    def forget_taken(self) -> None:
        """Let go of the calls before `head` once they are most of the columns."""
        head = self.head
        if head > 4096 and 2 * head > len(self.ts):
            del self.ts[:head]
            del self.bucket[:head]
            del self.flags[:head]
            del self.ring[:head]
            del self.talk[:head]
            self.head = 0


class MenuTraffic(Snapshotted):
    """A menu's calls within the last window, with their counts and sums kept up to
    date as calls come and go: a step reads them instead of walking the window."""

    __slots__ = (
        "answered",
        "callers",
        "empty_buckets",
        "forwarded",
        "live",
        "newest_ids",
        "pending",
        "pending_ids",
        "ring_sum",
        "rings",
        "short",
        "talk_sum",
        "talks",
        "total",
    )

    def state_fields(self) -> tuple[str, ...]:
        return (
            "pending",
            "pending_ids",
            "live",
            "newest_ids",
            "total",
            "answered",
            "short",
            "forwarded",
            "rings",
            "talks",
            "ring_sum",
            "talk_sum",
            "callers",
            "empty_buckets",
        )

    def __init__(self) -> None:
        self.pending = CallWindow()  # finished after the last step
        self.pending_ids: deque[str] = deque()
        self.live = CallWindow()
        # The ids of the newest calls of `live`, as many as it holds up to EVIDENCE.
        self.newest_ids: deque[str] = deque(maxlen=EVIDENCE)
        self.total = 0
        self.answered = 0
        self.short = 0
        self.forwarded = 0
        self.rings = 0
        self.talks = 0
        self.ring_sum = 0.0
        self.talk_sum = 0.0
        self.callers: array[int] = array("I", bytes(4 * CALLER_BUCKETS))
        self.empty_buckets = CALLER_BUCKETS

    def take(self, call: Call, short_s: float) -> None:
        """A finished call (deadlines in order, as calls finish), as the menu model
        sees it: answered, short (answered and talked less than `short_s`), forwarded."""
        talk = call.talk_s
        answered = call.answered_at is not None
        flags = ANSWERED if answered else 0
        talk_log: float | None = None
        if answered and talk is not None:
            talk_log = math.log10(1.0 + talk)
            if talk < short_s:
                flags |= SHORT
        if call.forward:
            flags |= FORWARDED
        self.add(
            call.deadline,
            call.call_id,
            zlib.crc32(call.caller.encode()) % CALLER_BUCKETS,
            flags,
            call.ring_s,
            talk_log,
        )

    def add(
        self,
        deadline: float,
        call_id: str,
        bucket: int,
        flags: int,
        ring_s: float | None,
        talk_log: float | None,
    ) -> None:
        """A call finished after the last step (deadlines in order, as calls finish)."""
        if ring_s is not None:
            flags |= RANG
        if talk_log is not None:
            flags |= TALKED
        self.pending.append(deadline, bucket, flags, ring_s or 0.0, talk_log or 0.0)
        self.pending_ids.append(call_id)

    def evidence(self) -> list[str]:
        """The newest call ids of the window (at most EVIDENCE), oldest first."""
        return list(self.newest_ids)

    def move_to(self, at: float, window: float) -> None:
        """The window is now (at - window, at]: calls come in from `pending` and leave
        `live`, each counted as it does (the counts in locals: this runs twice for every
        call a menu takes). The columns of the calls that move are read as lists, and
        copied into `live` as one block each: compiled, an array's items and `append`
        are generic calls, each several hundred instructions (bench/README.md, "Long
        replays")."""
        pending, live = self.pending, self.live
        cutoff = at - window
        if not (len(pending) and pending.first_ts() <= at) and not (
            len(live) and live.first_ts() <= cutoff
        ):
            return
        total, answered, short, forwarded = self.total, self.answered, self.short, self.forwarded
        rings, talks, ring_sum, talk_sum = self.rings, self.talks, self.ring_sum, self.talk_sum
        callers, empty = self.callers, self.empty_buckets
        head = pending.head
        # The calls that come in: pending's from its head up to the first that finished
        # after `at`. Pending is in the order the calls were taken, not always by time
        # (a late report's call): one behind a later call waits for a later step.
        stop = head
        for finished in pending.ts[head:].tolist():
            if finished > at:
                break
            stop += 1
        if stop > head:
            flags_in: list[int] = pending.flags[head:stop].tolist()
            rings_in: list[float] = pending.ring[head:stop].tolist()
            talks_in: list[float] = pending.talk[head:stop].tolist()
            buckets_in: list[int] = pending.bucket[head:stop].tolist()
            for k in range(stop - head):
                flags: int = flags_in[k]
                total += 1
                if flags & ANSWERED:
                    answered += 1
                if flags & TALKED:
                    talks += 1
                    talk_sum += talks_in[k]
                if flags & SHORT:
                    short += 1
                if flags & FORWARDED:
                    forwarded += 1
                if flags & RANG:
                    rings += 1
                    ring_sum += rings_in[k]
                bucket: int = buckets_in[k]
                before: int = callers[bucket]
                callers[bucket] = before + 1
                if before == 0:
                    empty -= 1
            live.extend(pending, head, stop)
            ids, newest = self.pending_ids, self.newest_ids
            for _ in range(stop - head):
                newest.append(ids.popleft())
            pending.head = stop
            pending.forget_taken()
        # The calls that leave: live's from its head up to the first that finished after
        # `cutoff` (its times read one at a time: the window is longer than what leaves).
        ts = live.ts
        first, end = live.head, len(ts)
        gone = first
        while gone < end and not ts[gone] > cutoff:
            gone += 1
        if gone > first:
            flags_out: list[int] = live.flags[first:gone].tolist()
            rings_out: list[float] = live.ring[first:gone].tolist()
            talks_out: list[float] = live.talk[first:gone].tolist()
            buckets_out: list[int] = live.bucket[first:gone].tolist()
            for k in range(gone - first):
                flags = flags_out[k]
                total -= 1
                if flags & ANSWERED:
                    answered -= 1
                if flags & TALKED:
                    talks -= 1
                    talk_sum -= talks_out[k]
                if flags & SHORT:
                    short -= 1
                if flags & FORWARDED:
                    forwarded -= 1
                if flags & RANG:
                    rings -= 1
                    ring_sum -= rings_out[k]
                bucket = buckets_out[k]
                left: int = callers[bucket] - 1
                callers[bucket] = left
                if left == 0:
                    empty += 1
            live.head = gone
            live.forget_taken()
        newest = self.newest_ids
        while len(newest) > len(live):  # ids of calls that left the window
            newest.popleft()
        if not len(live):
            # Sums of floats added and taken away drift; start an empty window clean.
            ring_sum = talk_sum = 0.0
        self.total, self.answered, self.short, self.forwarded = total, answered, short, forwarded
        self.rings, self.talks, self.ring_sum, self.talk_sum = rings, talks, ring_sum, talk_sum
        self.empty_buckets = empty
