"""Dedup and group commit, without I/O: the part of ingest that live and replay share.

The receiver (or replay) offers each decoded report; `Intake` decides whether
it is new (joins the open batch), a copy of a stored report (answer again now),
a copy of a report still waiting for its commit (answer once that commit is
durable), or more than the store can take (left unanswered for the switch to
retry). `seal()` hands the open batch to the committer; `durable()` says what to
answer and which events go on to detection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.codec import Decoded
from engine.events import CallEvent, Reject
from engine.journal import Record
from engine.lake import event_record, reject_record
from engine.stats import Stats

Key = tuple[str, int]
# Where an answer goes: (transport, address). Opaque here.
ReplyTo = tuple[Any, Any]
# Keep a few distinct return addresses per pending report; more is a flood, not retries.
_MAX_REPLY_ADDRESSES = 4


class SeenReports:
    """Keys of stored reports, remembered for `horizon_s` of event time."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._keys: set[Key] = set()
        self._order: deque[tuple[float, Key]] = deque()

    def __contains__(self, key: Key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Key, ts: float) -> None:
        if key not in self._keys:
            self._keys.add(key)
            self._order.append((ts, key))

    def forget_before(self, ts: float) -> None:
        cutoff = ts - self.horizon_s
        order = self._order
        while order and order[0][0] < cutoff:
            self._keys.discard(order.popleft()[1])


class Outcome(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    DUPLICATE_PENDING = "duplicate_pending"
    OVERLOADED = "overloaded"
    QUARANTINE_FULL = "quarantine_full"


@dataclass
class Batch:
    records: list[Record] = field(default_factory=list)
    items: list[CallEvent | Reject] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class _Waiting:
    answer: bytes | None
    replies: list[ReplyTo]


class Intake:
    def __init__(
        self,
        stats: Stats,
        seen: SeenReports,
        *,
        next_seq: int = 1,
        max_pending: int = 50_000,
        unkeyed_per_minute: int = 600,
    ) -> None:
        self.stats = stats
        self.seen = seen
        self.next_seq = next_seq
        self.max_pending = max_pending
        self.unkeyed_per_minute = unkeyed_per_minute
        self.open = Batch()
        self.in_flight: Batch | None = None
        self._waiting: dict[Key, _Waiting] = {}
        self._quota_minute = -1
        self._quota_used = 0
        self._latest_ts = 0.0

    @property
    def pending(self) -> int:
        return len(self.open) + (len(self.in_flight) if self.in_flight else 0)

    def offer(
        self, decoded: Decoded, reply_to: ReplyTo | None = None
    ) -> tuple[Outcome, bytes | None]:
        """Returns the outcome and, for a copy of a stored report, the answer to send now."""
        item = decoded.item
        key = item.key
        if key is not None:
            if key in self.seen:
                self.stats.duplicates += 1
                return Outcome.DUPLICATE, decoded.answer
            waiting = self._waiting.get(key)
            if waiting is not None:
                self.stats.duplicates += 1
                if (
                    reply_to is not None
                    and reply_to not in waiting.replies
                    and len(waiting.replies) < _MAX_REPLY_ADDRESSES
                ):
                    waiting.replies.append(reply_to)
                return Outcome.DUPLICATE_PENDING, None
        if self.pending >= self.max_pending:
            self.stats.dropped_overload += 1
            return Outcome.OVERLOADED, None
        if isinstance(item, Reject):
            self.stats.rejected[item.reason.value] += 1
            if key is None and not self._quarantine_quota(item.ts):
                self.stats.quarantine_overflow += 1
                return Outcome.QUARANTINE_FULL, None
            record = reject_record(self.next_seq, item)
        else:
            record = event_record(self.next_seq, item)
        self.next_seq += 1
        self.open.records.append(record)
        self.open.items.append(item)
        if key is not None:
            self.open.keys.append(key)
            self._waiting[key] = _Waiting(decoded.answer, [reply_to] if reply_to else [])
        if item.ts > self._latest_ts:
            self._latest_ts = item.ts
        return Outcome.ACCEPTED, None

    def _quarantine_quota(self, ts: float) -> bool:
        minute = int(ts // 60)
        if minute != self._quota_minute:
            self._quota_minute = minute
            self._quota_used = 0
        if self._quota_used >= self.unkeyed_per_minute:
            return False
        self._quota_used += 1
        return True

    def seal(self) -> Batch | None:
        """Hand the open batch to the committer (one batch in flight at a time)."""
        if self.in_flight is not None or not self.open.records:
            return None
        self.in_flight, self.open = self.open, Batch()
        return self.in_flight

    def durable(self, batch: Batch) -> list[tuple[bytes, ReplyTo]]:
        """The batch is fsync'd: remember its keys and return the answers now due."""
        assert batch is self.in_flight
        self.in_flight = None
        answers: list[tuple[bytes, ReplyTo]] = []
        for key in batch.keys:
            waiting = self._waiting.pop(key)
            self.seen.add(key, self._latest_ts)
            if waiting.answer is not None:
                answers.extend((waiting.answer, reply) for reply in waiting.replies)
        self.stats.stored += len(batch)
        self.seen.forget_before(self._latest_ts)
        return answers
