"""One existing UDP consumer, fed every stored report with the switch's own retry rules.

Each report goes out as the switch sent it (or re-encoded with the target's own
separator and encoding) and again every `retry_interval_s` until the target
answers `call_id,serial`, as docs/protocol.md describes the switch. Then:

- a target that has answered nothing for longer than its retry window
  (`retries` x `retry_interval_s`, counted from the oldest report it owes) is
  *down*: no new report goes to it, its oldest unanswered one is sent again every
  interval as a probe, and nothing is given up. The first answer brings it back
  *up*: every report it owes is sent again with its retries afresh;
- a report is given up (counted, logged) only when the target is up, answered
  something sent after this report's last copy, and still did not answer this one
  after `retries`;
- the cursor is the highest sequence number below which every report was
  answered or given up. Saved to disk (engine.relay.state) it is where delivery
  resumes after a restart: what was sent after the last save is sent again
  (a consumer of the switch de-duplicates by call_id and serial already, since
  the switch retries too).

Timeline for one target (retries 2, interval 3 s, window 6 s):

    t=0 send r1 | t=3 r1 again | t=6 r1 again | t=6 no answer since t=0: down
    t=9, 12 ... r1 as a probe          | t=14 answer to r1: up, cursor past r1
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.events import CallEvent
from engine.core.text import shown
from engine.ingest.codec import SEPARATORS, Vos3000TextCodec
from engine.relay.feed import JournalReader, Position, RelayItem

log = logging.getLogger(__name__)

# A report's key as the answer carries it: the call_id's bytes and the serial.
Key = tuple[bytes, int]

# Given-up reports logged one by one, at most this many per target per minute.
_LOGGED_PER_MINUTE = 20
# Datagrams sent to one target per pass of the relay's loop, at most.
BURST = 1000

COUNTERS = (
    "sent",
    "answered",
    "retried",
    "given_up",
    "given_up_horizon",
    "bad_answers",
    "lag_reports",
    "lag_seconds",
    "down",
)


@dataclass(frozen=True)
class UdpTargetSpec:
    """A target as the settings give it; `separator`/`encoding` empty: as received."""

    name: str
    host: str
    port: int
    retries: int = 6
    retry_interval_s: float = 3.0
    separator: str = ""
    encoding: str = ""
    window: int = 10_000

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"target {self.name}: retries must be 0 or more")
        if self.retry_interval_s <= 0:
            raise ValueError(f"target {self.name}: retry_interval_s must be more than 0")
        if self.window < 1:
            raise ValueError(f"target {self.name}: window must be at least 1")
        if self.separator and self.separator not in SEPARATORS:
            raise ValueError(
                f"target {self.name}: separator {self.separator!r} is not one of ,|;\\t"
            )

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def retry_window_s(self) -> float:
        """Silence longer than this (from the oldest report owed) means the target is down."""
        return max(self.retries, 1) * self.retry_interval_s


@dataclass(slots=True)
class _Owed:
    item: RelayItem
    key: Key
    payload: bytes
    first_sent: float
    last_sent: float
    copies: int
    # When its next copy (or look) is due; a `_due` entry with another time is stale.
    due: float = 0.0


@dataclass
class TargetCounters:
    sent: int = 0
    answered: int = 0
    retried: int = 0
    given_up: int = 0
    given_up_horizon: int = 0
    bad_answers: int = 0
    lag_reports: int = 0
    lag_seconds: float = 0.0
    down: bool = False

    def values(self) -> list[float]:
        return [float(getattr(self, name)) for name in COUNTERS]


@dataclass
class _GiveUpLog:
    window_start: float = 0.0
    logged: int = 0
    unlogged: int = 0


def key_of(payload: bytes, separator: bytes) -> Key | None:
    """(call_id bytes, serial) as an answer to `payload` carries them."""
    parts = payload.split(separator, 2)
    if len(parts) < 2:
        return None
    serial = parts[1].strip()
    if not serial.isdigit():
        return None
    return parts[0].strip(), int(serial)


class UdpTarget:
    """Delivery to one target: what it owes, its socket, its cursor. Driven by
    `UdpRelay`'s loop through `receive`, `step` and `cursor`."""

    def __init__(
        self,
        spec: UdpTargetSpec,
        reader: JournalReader,
        *,
        counters: TargetCounters | None = None,
        source_separator: str = ",",
        source_encoding: str = "utf-8",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`source_separator`, `source_encoding`: the switch's (codec settings), kept
        when the target sets only the other one."""
        self.spec = spec
        self.reader = reader
        self.counters = counters or TargetCounters()
        self.clock = clock
        self.wall = wall
        # Up until shown otherwise: a restart forgets when it last answered.
        self.down = self.counters.down = False
        self.last_answer = clock()
        self.last_probe = 0.0
        self._reencode = (
            Vos3000TextCodec(
                separator=spec.separator or source_separator,
                encodings=(spec.encoding or source_encoding,),
            )
            if spec.separator or spec.encoding
            else None
        )
        self._separator = (spec.separator or source_separator).encode("ascii")
        # Owed reports in sequence order (the dict keeps insertion order; reports are
        # added in sequence order and removed anywhere).
        self.owed: dict[int, _Owed] = {}
        self._by_key: dict[Key, list[int]] = {}
        # (due at, seq): when an owed report's next copy is due; sends happen in time
        # order with one interval, so this is in due order too.
        self._due: deque[tuple[float, int]] = deque()
        # Read and not sent yet, in sequence order.
        self.queue: deque[RelayItem] = deque()
        # Owed reports to send again at once (the target came back up), in order.
        self._again: deque[int] = deque()
        self._give_up_log = _GiveUpLog()
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # Connected: only the target's own answers are read, from no one else.
        self.sock.connect((spec.host, spec.port))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()
        self.reader.close()

    # -- what the loop asks ------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def cursor(self) -> int:
        """Every report with a sequence number up to this is answered or given up."""
        if self.owed:
            return next(iter(self.owed)) - 1
        if self.queue:
            return self.queue[0].seq - 1
        return self.reader.through

    @property
    def resume_at(self) -> Position:
        """Where reading must start again to find the report after the cursor."""
        if self.owed:
            return self.owed[next(iter(self.owed))].item.at
        if self.queue:
            return self.queue[0].at
        return self.reader.position

    def receive(self) -> int:
        """Take every answer waiting on the socket; how many settled a report."""
        settled = 0
        now = self.clock()
        while True:
            try:
                answer = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP port unreachable for an earlier datagram: the target is not
                # listening. Nothing to read; its silence decides whether it is down.
                continue
            key = key_of(answer.rstrip(b"\r\n\x00"), self._separator)
            if key is None:
                self.counters.bad_answers += 1
                continue
            # Any answer says the target is there, a late copy of one already had too.
            self.last_answer = now
            if self.down:
                self._up(now)
            for seq in self._by_key.pop(key, ()):
                if self.owed.pop(seq, None) is not None:
                    self.counters.answered += 1
                    settled += 1
        return settled

    def step(self) -> None:
        """Copies due, give-ups, the down check, then new reports while the window allows."""
        now = self.clock()
        budget = BURST
        if self.down:
            self._probe(now)
        else:
            budget = self._again_now(now, budget)
            budget = self._retry_due(now, budget)
            self._check_down(now)
            if not self.down:
                self._send_new(now, budget)
        self._update_lag(now)

    # -- states ------------------------------------------------------------------

    def _check_down(self, now: float) -> None:
        if not self.owed:
            return
        oldest = self.owed[next(iter(self.owed))]
        silent = now - max(self.last_answer, oldest.first_sent)
        if silent > self.spec.retry_window_s:
            self.down = self.counters.down = True
            self.last_probe = now
            log.warning(
                "relay target %s (%s) is down: no answer for %.0f s; holding at seq %d, "
                "nothing is given up while it is down",
                self.spec.name,
                self.spec.address,
                silent,
                self.cursor,
            )

    def _up(self, now: float) -> None:
        self.down = self.counters.down = False
        self._again = deque(self.owed)
        self._due.clear()
        for owed in self.owed.values():
            owed.copies = 0
            owed.first_sent = now
        log.warning(
            "relay target %s (%s) answers again; resuming from seq %d (%d reports owed)",
            self.spec.name,
            self.spec.address,
            self.cursor + 1,
            len(self.owed),
        )

    def _probe(self, now: float) -> None:
        if self.owed and now - self.last_probe >= self.spec.retry_interval_s:
            self.last_probe = now
            oldest = self.owed[next(iter(self.owed))]
            self._send(oldest.payload)
            oldest.last_sent = now
            self.counters.retried += 1

    # -- sending -----------------------------------------------------------------

    def _send(self, payload: bytes) -> bool:
        try:
            self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # Refused (the target is not listening) or unreachable: as a lost datagram,
            # it is sent again in its turn.
            pass
        return True

    def _sent(self, owed: _Owed, now: float) -> None:
        owed.copies += 1
        owed.last_sent = now
        owed.due = now + self.spec.retry_interval_s
        self._due.append((owed.due, owed.item.seq))

    def _again_now(self, now: float, budget: int) -> int:
        again = self._again
        while again and budget > 0:
            owed = self.owed.get(again[0])
            if owed is None:
                again.popleft()
                continue
            if not self._send(owed.payload):
                return 0
            again.popleft()
            self._sent(owed, now)
            budget -= 1
        return budget

    def _retry_due(self, now: float, budget: int) -> int:
        due = self._due
        retries = self.spec.retries
        while due and due[0][0] <= now and budget > 0:
            at, seq = due[0]
            owed = self.owed.get(seq)
            if owed is None or owed.due != at:
                due.popleft()  # answered since, or rescheduled
                continue
            if owed.copies <= retries:
                if not self._send(owed.payload):
                    return 0
                due.popleft()
                self._sent(owed, now)
                self.counters.retried += 1
                budget -= 1
            elif self.last_answer > owed.last_sent:
                # Up, answering what was sent after this report's last copy, and never
                # this one: given up, as the switch gives up.
                due.popleft()
                self._give_up(owed, f"no answer after {retries} retries")
            else:
                # Silent since its last copy: maybe down (the check decides); not given
                # up, looked at again after another interval.
                due.popleft()
                owed.due = now + self.spec.retry_interval_s
                due.append((owed.due, seq))
        return budget

    def _send_new(self, now: float, budget: int) -> None:
        window = self.spec.window
        owed = self.owed
        queue = self.queue
        while budget > 0 and len(owed) < window:
            if not queue:
                queue.extend(self.reader.read(min(window, 4096)))
                if not queue:
                    return
            item = queue[0]
            prepared = self._prepare(item)
            if prepared is None:
                queue.popleft()
                continue
            key, payload = prepared
            if not self._send(payload):
                return
            queue.popleft()
            entry = _Owed(item, key, payload, now, now, 0)
            owed[item.seq] = entry
            self._by_key.setdefault(key, []).append(item.seq)
            self._sent(entry, now)
            self.counters.sent += 1
            budget -= 1

    def _prepare(self, item: RelayItem) -> tuple[Key, bytes] | None:
        """The key and the bytes for `item`; None (given up) when it cannot be written in
        the target's encoding."""
        if self._reencode is None:
            payload = item.raw
        else:
            try:
                payload = self._reencode.encode(item.event)
            except UnicodeEncodeError as error:
                self._count_given_up(item.event, f"not writable in {error.encoding}")
                return None
        key = key_of(payload, self._separator)
        if key is None:  # a report decodes only with a readable key; kept safe anyway
            self._count_given_up(item.event, "no key")
            return None
        return key, payload

    # -- giving up ---------------------------------------------------------------

    def _give_up(self, owed: _Owed, why: str, *, horizon: bool = False) -> None:
        del self.owed[owed.item.seq]
        seqs = self._by_key.get(owed.key)
        if seqs is not None:
            seqs.remove(owed.item.seq)
            if not seqs:
                del self._by_key[owed.key]
        self._count_given_up(owed.item.event, why, horizon=horizon)

    def _count_given_up(self, event: CallEvent, why: str, *, horizon: bool = False) -> None:
        self.counters.given_up += 1
        if horizon:
            self.counters.given_up_horizon += 1
        record = self._give_up_log
        now = self.clock()
        if now - record.window_start >= 60:
            if record.unlogged:
                log.warning(
                    "relay target %s: %d more reports given up in the last minute",
                    self.spec.name,
                    record.unlogged,
                )
            record.window_start, record.logged, record.unlogged = now, 0, 0
        if record.logged < _LOGGED_PER_MINUTE:
            record.logged += 1
            log.warning(
                "relay target %s: report %s serial %d given up: %s",
                self.spec.name,
                shown(event.call_id),
                event.serial,
                why,
            )
        else:
            record.unlogged += 1

    def give_up_through(self, segment: int) -> int:
        """The journal segments up to `segment` are gone (past the horizon or the byte
        bound): what this target still owed from them is given up. How many."""
        gone = 0
        for seq in [s for s, o in self.owed.items() if o.item.at.segment <= segment]:
            self._give_up(self.owed[seq], "past the relay horizon", horizon=True)
            gone += 1
        while self.queue and self.queue[0].at.segment <= segment:
            self._count_given_up(self.queue.popleft().event, "past the relay horizon", horizon=True)
            gone += 1
        while self.reader.position.segment <= segment:
            for item in self.reader.skip_segment():
                self._count_given_up(item.event, "past the relay horizon", horizon=True)
                gone += 1
        return gone

    def _update_lag(self, now: float) -> None:
        counters = self.counters
        counters.lag_reports = max(0, self.reader.mark.get().head - self.cursor)
        oldest = (
            self.owed[next(iter(self.owed))].item.event.ts
            if self.owed
            else self.queue[0].event.ts
            if self.queue
            else None
        )
        counters.lag_seconds = max(0.0, self.wall() - oldest) if oldest is not None else 0.0


@dataclass
class TargetState:
    """What is saved of a target between runs (engine.relay.state)."""

    cursor: int
    position: Position
    counters: TargetCounters = field(default_factory=TargetCounters)
