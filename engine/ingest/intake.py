"""Dedup and group commit, without I/O: the part of ingest that live and replay share.

The receiver (or replay) offers each report by its key; `Intake` decides whether
it is new (joins the open batch), a copy of a stored report (answer again now),
a copy of a report still waiting for its commit (answer once that commit is
durable), or more than the store can take (left unanswered for the switch to
retry). `seal()` hands the open batch to the committer. A batch carries the first
answer of each of its reports (`Batch.answers`), which the committer sends as soon
as its fsync returns; `durable()` then returns the answers owed to copies that
came in while the batch was being written. These are obligations 1 (no answer
before the report is durable; a bounded backlog) and 2 (a copy is answered again,
never stored twice) of docs/protocol.md.
"""

from __future__ import annotations

import itertools
import operator
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.core.events import CallEvent, Reject
from engine.ingest import native
from engine.ingest.stats import Stats

Key = tuple[str, int]

_TS = operator.itemgetter(CallEvent._fields.index("ts"))
_CALL_ID = operator.itemgetter(CallEvent._fields.index("call_id"))
_SERIAL = operator.itemgetter(CallEvent._fields.index("serial"))


def _compiled(name: str) -> Callable[..., Any] | None:
    """A function of the compiled helper; None where it is not built or is stale (the
    Python below then does the same)."""
    fastio = native.load("_fastio")
    if fastio is None:
        return None
    function: Callable[..., Any] = getattr(fastio, name)
    return function


_take_usual = _compiled("take_usual")
_release_waiting = _compiled("release_waiting")

# Where an answer goes: (transport, address). Opaque here.
ReplyTo = tuple[Any, Any]
# Keep a few distinct return addresses per pending report; more is a flood, not retries.
_MAX_REPLY_ADDRESSES = 4


def _key_table() -> Any:
    """An empty set of report keys that forgets them oldest first: the compiled
    fingerprint table (engine/ingest/_seen.c, 43 to 85 bytes a key) where built, else
    `KeySet` (a Python set, about 190)."""
    seen = native.load("_seen")
    if seen is None:
        return KeySet()
    # A key of the process's own: fingerprints cannot be chosen from outside to collide.
    return seen.KeyTable(os.urandom(16))


class KeySet:
    """`engine.ingest._seen.KeyTable`'s behaviour with a Python set (where it is not built):
    `add_batch(keys)`, `forget_oldest(count)` of the keys added first, `in`,
    `len`, `isdisjoint`."""

    def __init__(self) -> None:
        self._keys: set[Key] = set()
        self._order: deque[list[Key]] = deque()
        self._forgotten = 0  # of the oldest batch in _order, already forgotten

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def isdisjoint(self, keys: Iterable[Key]) -> bool:
        return self._keys.isdisjoint(keys)

    def add_batch(self, keys: list[Key]) -> int:
        self._keys.update(keys)
        self._order.append(keys)
        return len(keys)

    def forget_oldest(self, count: int) -> None:
        held = sum(map(len, self._order)) - self._forgotten
        if not 0 <= count <= held:
            raise ValueError(f"cannot forget {count} keys of {held} added")
        while count:
            oldest = self._order[0]
            taken = min(count, len(oldest) - self._forgotten)
            self._keys.difference_update(oldest[self._forgotten : self._forgotten + taken])
            self._forgotten += taken
            count -= taken
            if self._forgotten == len(oldest):
                self._order.popleft()
                self._forgotten = 0


class SeenReports:
    """Keys of stored reports, remembered for `horizon_s` of event time, and at most
    `max_keys` of them: past that many, the oldest are forgotten before the horizon
    (counted in `forgotten_early`), so memory has a bound whatever the rate. A copy
    of a report is still known as long as fewer than `max_keys` reports came after
    it: the switch retries for 18 s, far less than the default bound takes to fill
    at any rate the receiver can take.

    Kept per commit batch (one deque entry per batch, not per key), so
    remembering a batch is one C-level call.
    """

    def __init__(self, horizon_s: float, max_keys: int | None = None) -> None:
        self.horizon_s = horizon_s
        self.max_keys = max_keys
        # Public so the intake can test membership without a method call per report.
        self.keys = _key_table()
        # (event time, number of keys) of each batch, oldest first.
        self._batches: deque[tuple[float, int]] = deque()
        self._held = 0  # keys added and not forgotten: the sum over _batches
        self.forgotten_early = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: Key, ts: float) -> None:
        self.add_batch([key], ts)

    def add_batch(self, keys: list[Key], ts: float) -> int:
        """Remember `keys` until `ts` leaves the horizon; returns how many older keys
        this forgot early to stay within `max_keys`."""
        added = self.keys.add_batch(keys)
        self._batches.append((ts, added))
        self._held += added
        if self.max_keys is None or self._held <= self.max_keys:
            return 0
        excess = self._held - self.max_keys
        forget = excess
        batches = self._batches
        while forget:
            oldest_ts, count = batches[0]
            if count <= forget:
                batches.popleft()
                forget -= count
            else:
                batches[0] = (oldest_ts, count - forget)
                forget = 0
        self.keys.forget_oldest(excess)
        self._held -= excess
        self.forgotten_early += excess
        return excess

    def forget_before(self, ts: float) -> None:
        cutoff = ts - self.horizon_s
        batches = self._batches
        forget = 0
        while batches and batches[0][0] < cutoff:
            forget += batches.popleft()[1]
        if forget:
            self.keys.forget_oldest(forget)
            self._held -= forget


class Outcome(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    DUPLICATE_PENDING = "duplicate_pending"
    OVERLOADED = "overloaded"
    QUARANTINE_FULL = "quarantine_full"


@dataclass
class Batch:
    """Records for one group commit; their sequence numbers run on from `first_seq`.

    A record is what the journal keeps: a raw datagram (live) or a decoded
    report (replay). The intake never looks inside one.
    """

    first_seq: int
    records: list[Any] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    # (answer, reply-to) for each report that came with an address to answer.
    answers: list[tuple[bytes, ReplyTo]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


class Intake:
    def __init__(
        self,
        stats: Stats,
        seen: SeenReports,
        *,
        next_seq: int = 1,
        max_pending: int = 50_000,
        unkeyed_per_minute: int | None = 600,
        max_in_flight: int = 2,
    ) -> None:
        self.stats = stats
        self.seen = seen
        self._seen_keys = seen.keys
        self.next_seq = next_seq
        self.max_pending = max_pending
        self.unkeyed_per_minute = unkeyed_per_minute
        self.open = Batch(next_seq)
        # Sealed batches not yet durable, oldest first; they become durable in this
        # order. Two, so the next batch is ready the moment an fsync returns.
        self.in_flight: deque[Batch] = deque()
        self.max_in_flight = max_in_flight
        # Per key waiting for its commit: [answer bytes, first reply-to (answered
        # from the batch), further reply-to, ...]
        self._waiting: dict[Key, list[Any]] = {}
        self._quota_minute = -1
        self._quota_used = 0
        self._latest_ts = 0.0

    @property
    def pending(self) -> int:
        return len(self.open) + sum(len(batch) for batch in self.in_flight)

    @property
    def can_seal(self) -> bool:
        return len(self.in_flight) < self.max_in_flight

    def offer(
        self,
        key: Key | None,
        answer: bytes | None,
        record: Any,
        ts: float,
        reply_to: ReplyTo | None = None,
    ) -> tuple[Outcome, bytes | None]:
        """Returns the outcome and, for a copy of a stored report, the answer to send now.

        `key` and `answer` are None for a report whose call_id and serial are
        unreadable: it is stored (within its quota) and never answered.
        """
        if key is not None:
            if key in self._seen_keys:
                self.stats.duplicates += 1
                return Outcome.DUPLICATE, answer
            waiting = self._waiting.get(key)
            if waiting is not None:
                self.stats.duplicates += 1
                # A retry from the first address too: that answer may have left
                # already and been lost, so it is owed another once durable.
                if (
                    reply_to is not None
                    and reply_to not in waiting[2:]
                    and len(waiting) <= _MAX_REPLY_ADDRESSES + 1
                ):
                    waiting.append(reply_to)
                return Outcome.DUPLICATE_PENDING, None
            # Keyed reports waiting for their commit; unkeyed ones are capped by their
            # quota (docs/protocol.md, obligation 3).
            if len(self._waiting) >= self.max_pending:
                self.stats.dropped_overload += 1
                return Outcome.OVERLOADED, None
        elif self.unkeyed_per_minute is not None and not self._quarantine_quota(ts):
            self.stats.quarantine_overflow += 1
            return Outcome.QUARANTINE_FULL, None
        self.next_seq += 1
        batch = self.open
        batch.records.append(record)
        if key is not None:
            batch.keys.append(key)
            self._waiting[key] = [answer, reply_to]
            if reply_to is not None and answer is not None:
                batch.answers.append((answer, reply_to))
        if ts > self._latest_ts:
            self._latest_ts = ts
        return Outcome.ACCEPTED, None

    def offer_read(
        self, items: Iterable[CallEvent | Reject], record_of: Callable[[Any], Any]
    ) -> None:
        """`offer` for each row read from an event file (replay: no answers, no
        senders), in one loop: a decoded report is its own record and keyed by
        (call_id, serial); a quarantined one goes through `offer` with
        `record_of(item)`. The same batch, waiting set and counters as `offer`."""
        items = list(items)
        if self._take_all_new(items):
            return
        seen, waiting, batch, stats = self._seen_keys, self._waiting, self.open, self.stats
        records, keys = batch.records, batch.keys
        for item in items:
            if type(item) is not CallEvent:
                self.offer(item.key, None, record_of(item), item.ts)
                continue
            key = (item.call_id, item.serial)
            if key in seen or key in waiting:
                stats.duplicates += 1
                continue
            if len(waiting) >= self.max_pending:
                stats.dropped_overload += 1
                continue
            self.next_seq += 1
            records.append(item)
            keys.append(key)
            waiting[key] = [None, None]
            if item.ts > self._latest_ts:
                self._latest_ts = item.ts

    def _take_all_new(self, items: list[CallEvent | Reject]) -> bool:
        """The usual run of rows read from a file, taken whole with no Python per row
        (a tenth of the reading process's time went to the loop in `offer_read`):
        each a decoded report, none a copy of a stored or waiting one or of another
        in the run, and room for them all. False, with nothing taken, otherwise."""
        if not items or set(map(type, items)) != {CallEvent}:
            return False
        run = dict.fromkeys(zip(map(_CALL_ID, items), map(_SERIAL, items), strict=True))
        waiting = self._waiting
        if (
            len(run) != len(items)
            or len(waiting) + len(run) > self.max_pending
            or not self._seen_keys.isdisjoint(run)
            or not waiting.keys().isdisjoint(run)
        ):
            return False
        batch = self.open
        batch.records.extend(items)
        batch.keys.extend(run)
        # [answer, reply-to]: none for a row read from a file.
        waiting.update(zip(run, map(list, itertools.repeat((None, None), len(run))), strict=True))
        self.next_seq += len(items)
        latest = max(map(_TS, items))
        if latest > self._latest_ts:
            self._latest_ts = latest
        return True

    def take_usual(
        self,
        received: list[tuple[bytes, Any, Key | None, bytes | None]],
        start: int,
        peers: dict[Any, str | None],
        now: float,
        endpoint: Any,
    ) -> int:
        """`offer` for a run of received datagrams (bytes, address, key, answer) from
        `start`, while each is the common case: its sender known and allowed
        (`peers[address]` is its "host:port"), its key read, new, and room for it.
        Each joins the open batch exactly as `offer` would add it, in compiled code
        where built. Returns the index of the first datagram left for `offer`."""
        if _take_usual is None:
            return start
        batch = self.open
        end: int = _take_usual(
            received,
            start,
            peers,
            self._seen_keys,
            self._waiting,
            self.max_pending,
            now,
            endpoint,
            batch.records,
            batch.keys,
            batch.answers,
        )
        if end > start:
            self.next_seq += end - start
            if now > self._latest_ts:
                self._latest_ts = now
        return end

    def _quarantine_quota(self, ts: float) -> bool:
        minute = int(ts // 60)
        if minute != self._quota_minute:
            self._quota_minute = minute
            self._quota_used = 0
        if self._quota_used >= (self.unkeyed_per_minute or 0):
            return False
        self._quota_used += 1
        return True

    def seal(self) -> Batch | None:
        """Hand the open batch to the committer (at most `max_in_flight` at a time)."""
        if len(self.in_flight) >= self.max_in_flight or not self.open.records:
            return None
        sealed, self.open = self.open, Batch(self.next_seq)
        self.in_flight.append(sealed)
        return sealed

    def durable(self, batch: Batch) -> list[tuple[bytes, ReplyTo]]:
        """The batch is fsync'd: remember its keys and return the answers due to
        copies that came while it was written (`batch.answers` has the rest)."""
        assert self.in_flight and batch is self.in_flight[0], "batches become durable in order"
        self.in_flight.popleft()
        answers: list[tuple[bytes, ReplyTo]]
        if _release_waiting is not None:
            answers = _release_waiting(batch.keys, self._waiting)
        else:
            waiting_for = self._waiting.pop
            answers = []
            append = answers.append
            for key in batch.keys:
                waiting = waiting_for(key)
                answer = waiting[0]
                if answer is not None:
                    for index in range(2, len(waiting)):
                        append((answer, waiting[index]))
        latest = self._latest_ts
        self.stats.dedup_forgotten_early += self.seen.add_batch(batch.keys, latest)
        self.stats.stored += len(batch)
        self.seen.forget_before(latest)
        return answers
