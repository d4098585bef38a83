"""Publication to NATS JetStream: reports, finished calls, alerts and review verdicts.

Subjects (engine.relay.subjects encodes the tokens made from network text):

    PREFIX.reports.<menu>     every stored live report, as the `events` columns in JSON
    PREFIX.calls              every finished call, as the `calls` columns
    PREFIX.alerts.<severity>  every alert (not shadow ones), as the `alerts` columns
    PREFIX.reviews            every review verdict, as the `alert_reviews` columns

Every message carries `Nats-Msg-Id` from a stable key (a report: switch, call_id and
serial; a call: switch, call_id and start; an alert: its id; a review: its row id), and
the stream's duplicate window is at least the relay's horizon, so whatever is
published again within it (after a restart, an outage, a timed-out ack) is stored once.

Where each kind comes from, durably and in order:

- reports: the journal, from a cursor like a UDP target's (engine.relay.feed), in
  the relay's process. The journal is already the durable, ordered record of every
  report, and the relay already holds its segments for a target that is behind; a
  second copy of each report elsewhere would double the answer path's disk writes;
- calls, alerts and reviews: the outbox (engine.alerts.outbox), destination `nats`,
  key = Nats-Msg-Id. The lake writer enqueues a segment's calls and alerts after its
  lake write and before its journal segment goes (one transaction, one fsync, for
  thousands of calls), exactly as it enqueues alerts for the webhook; the
  `alerts review` command enqueues a verdict once it is recorded. Calls are made by
  detection in the lake writer's process and nowhere else, so the outbox is where a
  durable, restartable record of them exists without reading the lake's Parquet
  (which compaction rewrites, and which would bring pyarrow into the relay); and the
  relay's process publishes them, so the receiver's process never holds a NATS
  client.

`NatsTarget` is driven by the relay's loop like a UDP target (`receive`, `step`,
`cursor`, `give_up_through`); the NATS client (nats-py, asyncio) runs in a thread of
its own with its own event loop. Only the loop's thread reads the journal and keeps
the owed reports; the client's thread publishes and hands back the sequence numbers
JetStream acknowledged. A publication not acknowledged within `ack_timeout_s` (NATS
down, a slow server) is published again, with the same Nats-Msg-Id, until it is, or
until its journal segment is past the horizon (given up, counted). While NATS is
unreachable the target is *down*: nothing new is read, the cursor holds, nothing is
given up, and publication resumes from the cursor when the client reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from engine.core.events import CallEvent
from engine.core.text import shown
from engine.relay.feed import JournalReader, Position, RelayItem
from engine.relay.subjects import (
    Subjects,
    alert_key,
    call_id_key,
    encode_token,
    report_id,
    review_key,
)
from engine.relay.udp import TargetCounters

log = logging.getLogger(__name__)

# The outbox destination whose deliveries are NATS messages (payload: see `pack`).
OUTBOX_DESTINATION = "nats"
MSG_ID = "Nats-Msg-Id"
# Outbox deliveries read per pass.
_OUTBOX_BATCH = 2000
# Delivered outbox rows of `nats` are dropped after this: the stream de-duplicates,
# and calls are too many to keep a week of them in the outbox file.
OUTBOX_KEEP_S = 600.0


@dataclass(frozen=True)
class NatsCredentials:
    """Plain values, read by the app from the variable relay.nats.credentials_env names."""

    token: str = field(default="", repr=False)
    user: str = ""
    password: str = field(default="", repr=False)
    creds_file: str = ""

    @classmethod
    def parse(cls, value: str) -> NatsCredentials:
        """`user:password`, a path ending in `.creds`, or else a token."""
        value = value.strip()
        if not value:
            return cls()
        if value.endswith(".creds"):
            return cls(creds_file=value)
        user, sep, password = value.partition(":")
        if sep and user:
            return cls(user=user, password=password)
        return cls(token=value)


@dataclass(frozen=True)
class NatsSpec:
    urls: tuple[str, ...]
    stream: str = "CALLSENTRY"
    subject_prefix: str = "callsentry"
    credentials: NatsCredentials = NatsCredentials()
    duplicate_window_s: float = 86_400.0
    create_stream: bool = True
    window: int = 10_000
    ack_timeout_s: float = 5.0
    name: str = "nats"

    @property
    def address(self) -> str:
        return ",".join(self.urls)


# -- messages -----------------------------------------------------------------------


def _iso(seconds: float) -> str | None:
    if seconds is None or math.isnan(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def report_body(item: RelayItem) -> bytes:
    """A report as the `events` table's columns."""
    event = item.event
    return json.dumps(
        {
            "seq": item.seq,
            "ts": _iso(event.ts),
            "call_id": event.call_id,
            "serial": event.serial,
            "state": str(event.state),
            "code": event.code,
            "caller": event.caller,
            "callee": event.callee,
            "forward": event.forward,
            "menu_id": event.menu_id,
            "menu_name": event.menu_name,
            "source": event.source,
            "switch": event.switch,
        },
        ensure_ascii=False,
    ).encode("utf-8")


def report_key(event: CallEvent) -> str:
    return report_id(event.switch or event.source.rpartition(":")[0], event.call_id, event.serial)


# Which `calls` columns are times (epoch seconds in the columns detection hands over).
_CALL_TIMES = ("started_at", "ringing_at", "answered_at", "ended_at", "finished_at")
_CALL_NUMBERS = ("ring_s", "talk_s")
_CALL_INTEGERS = ("ring_code", "reports")


def call_messages(columns: dict[str, Any], subjects: Subjects) -> list[tuple[str, str, bytes]]:
    """(subject, Nats-Msg-Id, body) of each call in `columns` (engine.detect.calls's
    `call_columns`: texts as lists, numbers as doubles with NaN for unknown)."""
    names = list(columns)
    count = len(columns["call_id"])
    messages = []
    for index in range(count):
        row: dict[str, Any] = {}
        for name in names:
            value = columns[name][index]
            if name in _CALL_TIMES:
                row[name] = _iso(float(value))
            elif name in _CALL_NUMBERS:
                row[name] = None if math.isnan(value) else float(value)
            elif name in _CALL_INTEGERS:
                row[name] = None if math.isnan(value) else int(value)
            else:
                row[name] = value
        started = float(columns["started_at"][index])
        key = (
            f"{call_id_key(row['call_id'])}:{encode_token(str(row.get('switch', '')))}"
            f":{round(started * 1_000_000) if not math.isnan(started) else 0}"
        )
        body = json.dumps(row, ensure_ascii=False).encode("utf-8")
        messages.append((subjects.calls, key, body))
    return messages


def alert_message(alert: dict[str, Any], subjects: Subjects) -> tuple[str, str, bytes]:
    """An alert (its `as_json()`): subject by severity, key by alert id (an escalation's
    by the id and `:escalation`, a message of its own)."""
    body = json.dumps(alert, ensure_ascii=False).encode("utf-8")
    # As engine.detect.alerts.Alert.delivery_key (this module stays clear of detection).
    key = str(alert["alert_id"])
    if alert.get("kind") == "escalation":
        key += ":escalation"
    return subjects.alert(str(alert["severity"])), alert_key(key), body


def review_message(review: dict[str, Any], subjects: Subjects) -> tuple[str, str, bytes]:
    body = json.dumps(review, ensure_ascii=False, default=str).encode("utf-8")
    return subjects.reviews, review_key(str(review["review_id"])), body


def pack(subject: str, body: bytes) -> bytes:
    """An outbox payload for destination `nats`: the subject, a newline, the body."""
    return subject.encode("ascii") + b"\n" + body


def unpack(payload: bytes) -> tuple[str, bytes]:
    subject, _, body = payload.partition(b"\n")
    return subject.decode("ascii", "replace"), body


def outbox_items(messages: Sequence[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    """(destination, key, payload) rows for Outbox.enqueue_many."""
    return [(OUTBOX_DESTINATION, key, pack(subject, body)) for subject, key, body in messages]


class PendingMessages(Protocol):
    """What the target needs of the outbox (engine.alerts.outbox.Outbox), which the
    relay's app hands in: this layer does not import the alerts layer."""

    def due(self, destination: str, now: float, limit: int = 100) -> Sequence[Any]: ...

    def mark_delivered_many(self, deliveries: Sequence[Any]) -> None: ...

    def give_up_older_than(
        self, destination: str, enqueued_before: float, reason: str = ""
    ) -> Sequence[Any]: ...

    def forget_done_before(self, before: float, destination: str | None = None) -> int: ...

    def close(self) -> None: ...


# -- the client's thread -----------------------------------------------------------


@dataclass(slots=True)
class _Publication:
    """One message in flight. `token` names it in its reply subject: `r<seq>` a report,
    `o<id>` an outbox delivery (`delivery`)."""

    token: str
    subject: str
    msg_id: str
    body: bytes
    delivery: Any = None
    sent_at: float = 0.0


def _acknowledged(data: bytes) -> bool:
    """JetStream's answer to a publication: a PubAck (`{"stream":..,"seq":..}`, with
    `"duplicate":true` for one it already had) or an error (or an empty no-responders
    status when no stream takes the subject)."""
    return b'"seq"' in data and b'"error"' not in data


class _Client:
    """The NATS connection and its event loop, in a thread of their own."""

    def __init__(
        self,
        spec: NatsSpec,
        outbox: PendingMessages | None,
        horizon_s: float,
        acked: deque[int],
        counters: TargetCounters,
    ) -> None:
        self.spec = spec
        self.outbox = outbox
        self.horizon_s = horizon_s
        self.acked = acked
        self.counters = counters
        self.connected = False
        # Reports at or below this were given up by the relay's loop: not sent again.
        self.cut_seq = -1
        self.loop = asyncio.new_event_loop()
        self._incoming: asyncio.Queue[list[_Publication]] | None = None
        self._stopping = False
        # Set when the client started again: what was in flight is lost, and the
        # relay's loop submits every owed report anew.
        self.restarted = threading.Event()
        self._check_stream = False
        # Whether the log has said that NATS cannot be reached (once until it can).
        self._said_unreachable = False
        # Published and not yet acknowledged, by token, in the order (last) sent.
        self._inflight: dict[str, _Publication] = {}
        self._outbox_done: list[Any] = []
        self._inbox = ""
        self._thread = threading.Thread(target=self._run, name="nats-client", daemon=True)
        self.outbox_published = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, batch: list[_Publication]) -> None:
        """From the relay's loop thread: publish these (in this order)."""
        self.loop.call_soon_threadsafe(self._put, batch)

    def _put(self, batch: list[_Publication]) -> None:
        if self._incoming is not None:
            self._incoming.put_nowait(batch)

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self._stopping = True
        self.loop.call_soon_threadsafe(lambda: None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._incoming = asyncio.Queue()
        try:
            while not self._stopping:
                try:
                    self.loop.run_until_complete(self._main())
                except Exception:
                    # A bug or a client failure must not end publication for good: start
                    # again, and have the relay's loop hand over what is still owed.
                    log.exception("NATS publication failed; starting it again")
                    self.connected = False
                    self.counters.down = True
                    self.restarted.set()
                    time.sleep(1.0)
        finally:
            self.connected = False
            self.loop.close()

    async def _connect(self) -> Any:
        import nats

        spec = self.spec
        credentials = spec.credentials
        options: dict[str, Any] = {
            "servers": list(spec.urls),
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            # During an outage, what is published waits in the client (bounded): past
            # it a publication fails and is published again after ack_timeout_s.
            "pending_size": 8 << 20,
            "name": "callsentry",
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if credentials.token:
            options["token"] = credentials.token
        if credentials.user:
            options["user"] = credentials.user
            options["password"] = credentials.password
        if credentials.creds_file:
            options["user_credentials"] = credentials.creds_file
        return await nats.connect(**options)

    async def _on_error(self, error: Exception) -> None:
        if not self.connected:
            # Not reachable at the start (a server down, a wrong URL): nats-py's connect
            # tries again for ever and tells only this callback, never _main.
            self._say_unreachable(error)
        log.debug("NATS: %s", shown(str(error)))

    def _say_unreachable(self, error: Exception) -> None:
        if self._said_unreachable:
            return
        log.error(
            "NATS (%s) not reachable or not ready (%s); trying again every "
            "second, reports wait in the journal",
            self.spec.address,
            shown(str(error) or type(error).__name__),
        )
        self._said_unreachable = True

    async def _on_disconnected(self) -> None:
        if self.connected:
            log.warning(
                "NATS (%s) disconnected; publication waits, nothing is given up",
                self.spec.address,
            )
        self.connected = False
        self._said_unreachable = True  # the warning above says it
        self.counters.down = True

    async def _on_reconnected(self) -> None:
        log.warning("NATS (%s) reconnected; publishing from the cursor", self.spec.address)
        self.connected = True
        self._said_unreachable = False
        self.counters.down = False
        # A server that came back empty (a new machine, its store lost) has no stream.
        self._check_stream = True

    async def _ensure_stream(self, nc: Any) -> None:
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        spec = self.spec
        js = nc.jetstream()
        subjects = Subjects(spec.subject_prefix).all
        try:
            info = await js.stream_info(spec.stream)
        except NotFoundError:
            if not spec.create_stream:
                raise RuntimeError(
                    f"JetStream stream {spec.stream} does not exist (relay.nats.create_stream "
                    "is off)"
                ) from None
            await js.add_stream(
                StreamConfig(
                    name=spec.stream, subjects=subjects, duplicate_window=spec.duplicate_window_s
                )
            )
            log.info(
                "JetStream stream %s created: %s, duplicate window %g s",
                spec.stream,
                ", ".join(subjects),
                spec.duplicate_window_s,
            )
            return
        config = info.config
        window = float(config.duplicate_window or 0)
        missing = [s for s in subjects if s not in (config.subjects or [])]
        if missing and not spec.create_stream:
            # A publication no stream takes is never acknowledged, and would hold up
            # every one after it: refuse to start instead.
            raise RuntimeError(
                f"JetStream stream {spec.stream} does not take {', '.join(missing)} "
                "(relay.nats.create_stream is off): add those subjects to it"
            )
        if missing:
            config.subjects = [*(config.subjects or []), *missing]
            await js.update_stream(config)
            log.warning("JetStream stream %s: subjects %s added", spec.stream, ", ".join(missing))
        if window < spec.duplicate_window_s:
            if spec.create_stream:
                config.duplicate_window = spec.duplicate_window_s
                await js.update_stream(config)
                log.warning(
                    "JetStream stream %s: duplicate window widened from %g s to %g s "
                    "(relay.horizon_s)",
                    spec.stream,
                    window,
                    spec.duplicate_window_s,
                )
            else:
                log.warning(
                    "JetStream stream %s keeps Nats-Msg-Id %g s, less than the relay's "
                    "horizon (%g s): a consumer must de-duplicate by the id itself",
                    spec.stream,
                    window,
                    spec.duplicate_window_s,
                )

    async def _main(self) -> None:
        nc: Any = None
        while not self._stopping:
            try:
                nc = await self._connect()
                await self._ensure_stream(nc)
                break
            except Exception as error:  # nats-py raises many kinds; all mean "not yet"
                self._say_unreachable(error)
                self.counters.down = True
                if nc is not None:
                    await _close_quietly(nc)
                    nc = None
                await self._sleep(1.0)
        if self._stopping:
            if nc is not None:
                await _close_quietly(nc)
            return
        try:
            await self._publish(nc)
        finally:
            await _close_quietly(nc)

    async def _publish(self, nc: Any) -> None:
        log.info("publishing to NATS JetStream %s, stream %s", self.spec.address, self.spec.stream)
        # Acks come to one wildcard subscription, each to its publication's reply subject;
        # nats-py subscribes it again after a reconnect.
        self._inbox = nc.new_inbox()
        await nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self.connected = True
        self._said_unreachable = False
        self.counters.down = False
        tasks = [
            asyncio.create_task(self._reports(nc)),
            asyncio.create_task(self._retries(nc)),
        ]
        if self.outbox is not None:
            tasks.append(asyncio.create_task(self._outbox(nc)))
        try:
            while not self._stopping:
                await self._sleep(0.1)
                if self._check_stream:
                    self._check_stream = False
                    try:
                        await self._ensure_stream(nc)
                    except Exception as error:
                        log.error(
                            "NATS: stream %s not ready after a reconnect (%s); trying again",
                            self.spec.stream,
                            shown(str(error) or type(error).__name__),
                        )
                        self._check_stream = True
                        await self._sleep(1.0)
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.05, seconds))

    async def _send(self, nc: Any, publication: _Publication) -> None:
        """Publish with a reply subject of its own (JetStream answers there); a failure
        (the client's buffer full during an outage, the connection closed) is a
        publication not acknowledged: sent again after ack_timeout_s."""
        publication.sent_at = time.monotonic()
        if not self.connected:
            # Disconnected: kept, and published once the client is back (its timeout
            # has passed by then), rather than piled up in the client's buffer.
            return
        try:
            await nc.publish(
                publication.subject,
                publication.body,
                reply=f"{self._inbox}.{publication.token}",
                headers={MSG_ID: publication.msg_id},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            pass

    async def _on_ack(self, msg: Any) -> None:
        token = str(msg.subject).rpartition(".")[2]
        publication = self._inflight.get(token)
        if publication is None or not _acknowledged(msg.data or b""):
            # A late second ack, or a refusal: the publication waits for its timeout.
            return
        del self._inflight[token]
        if publication.delivery is None:
            self.acked.append(int(token[1:]))
        else:
            self._outbox_done.append(publication.delivery)

    async def _reports(self, nc: Any) -> None:
        assert self._incoming is not None
        incoming = self._incoming
        inflight = self._inflight
        while True:
            batch = await incoming.get()
            for publication in batch:
                inflight[publication.token] = publication
                await self._send(nc, publication)

    async def _retries(self, nc: Any) -> None:
        """Publications not acknowledged within ack_timeout_s go again (same Nats-Msg-Id),
        oldest first; reports the relay gave up (past the horizon) are dropped."""
        inflight = self._inflight
        timeout = self.spec.ack_timeout_s
        while True:
            await asyncio.sleep(min(0.25, timeout / 2))
            if not self.connected:
                continue
            now = time.monotonic()
            # In the order sent: one sent again moves to the end.
            due: list[_Publication] = []
            for publication in inflight.values():
                if now - publication.sent_at < timeout:
                    break
                due.append(publication)
            for publication in due:
                token = publication.token
                if inflight.pop(token, None) is None:
                    continue  # acknowledged meanwhile
                if publication.delivery is None and int(token[1:]) <= self.cut_seq:
                    continue
                inflight[token] = publication
                self.counters.retried += 1
                await self._send(nc, publication)

    async def _outbox(self, nc: Any) -> None:
        """Calls, alerts and reviews: a batch of the outbox at a time, marked delivered
        (one transaction) as JetStream acknowledges them."""
        outbox = self.outbox
        assert outbox is not None
        forget_at = 0.0
        in_flight: list[_Publication] = []
        while True:
            now = time.time()
            if now >= forget_at:
                forget_at = now + 60.0
                await asyncio.to_thread(
                    outbox.forget_done_before, now - OUTBOX_KEEP_S, OUTBOX_DESTINATION
                )
                given = await asyncio.to_thread(
                    outbox.give_up_older_than,
                    OUTBOX_DESTINATION,
                    now - self.horizon_s,
                    "not published within relay.horizon_s",
                )
                if given:
                    # Given up: no longer waited for, so later ones are not held up.
                    for delivery in given:
                        self._inflight.pop(f"o{delivery.id}", None)
                    log.error(
                        "NATS: %d calls, alerts or reviews given up after relay.horizon_s "
                        "(%g s) unpublished",
                        len(given),
                        self.horizon_s,
                    )
            if self._outbox_done:
                done, self._outbox_done = self._outbox_done, []
                await asyncio.to_thread(outbox.mark_delivered_many, done)
                self.outbox_published += len(done)
            in_flight = [p for p in in_flight if p.token in self._inflight]
            if in_flight:
                await asyncio.sleep(0.02)
                continue
            due = await asyncio.to_thread(outbox.due, OUTBOX_DESTINATION, now, _OUTBOX_BATCH)
            if not due:
                await asyncio.sleep(0.25)
                continue
            for delivery in due:
                subject, body = unpack(delivery.payload)
                publication = _Publication(f"o{delivery.id}", subject, delivery.key, body, delivery)
                self._inflight[publication.token] = publication
                in_flight.append(publication)
                await self._send(nc, publication)


async def _close_quietly(nc: Any) -> None:
    try:
        await asyncio.wait_for(nc.drain(), 5.0)
    except Exception:
        with contextlib.suppress(Exception):
            await nc.close()


# -- the relay loop's side ------------------------------------------------------------


class NatsTarget:
    """Reports from the journal to JetStream, driven by the relay's loop like a UDP
    target; calls, alerts and reviews from the outbox, by the client's thread alone."""

    def __init__(
        self,
        spec: NatsSpec,
        reader: JournalReader,
        *,
        outbox: PendingMessages | None = None,
        horizon_s: float = 86_400.0,
        counters: TargetCounters | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.reader = reader
        self.counters = counters or TargetCounters()
        self.counters.down = True
        self.wall = wall
        self.subjects = Subjects(spec.subject_prefix)
        # Published, not yet acknowledged, in sequence order.
        self.owed: dict[int, RelayItem] = {}
        self._acked: deque[int] = deque()
        self._client = _Client(spec, outbox, horizon_s, self._acked, self.counters)
        self._client.start()

    @property
    def connected(self) -> bool:
        return self._client.connected

    def close(self) -> None:
        self._client.stop()
        self.reader.close()

    @property
    def cursor(self) -> int:
        if self.owed:
            return next(iter(self.owed)) - 1
        return self.reader.through

    @property
    def resume_at(self) -> Position:
        if self.owed:
            return self.owed[next(iter(self.owed))].at
        return self.reader.position

    def receive(self) -> int:
        settled = 0
        acked = self._acked
        owed = self.owed
        while acked:
            if owed.pop(acked.popleft(), None) is not None:
                settled += 1
        self.counters.answered += settled
        return settled

    def step(self) -> None:
        """Read up to the window and hand it to the client, which publishes each until
        it is acknowledged (also while NATS is down: the window bounds what waits)."""
        client = self._client
        if client.restarted.is_set():
            client.restarted.clear()
            if self.owed:
                client.submit([self._publication(item) for item in self.owed.values()])
        room = self.spec.window - len(self.owed)
        if room > 0:
            items = self.reader.read(room)
            if items:
                for item in items:
                    self.owed[item.seq] = item
                self.counters.sent += len(items)
                client.submit([self._publication(item) for item in items])
        self._update_lag()

    def _publication(self, item: RelayItem) -> _Publication:
        return _Publication(
            f"r{item.seq}",
            self.subjects.report(item.event.menu_id),
            report_key(item.event),
            report_body(item),
        )

    def finish(self, timeout_s: float = 5.0) -> None:
        """At stop: publish what is stored and wait for its acks, `timeout_s` at most
        (what is left is published from the cursor at the next start)."""
        deadline = time.monotonic() + timeout_s
        while self._client.connected and time.monotonic() < deadline:
            self.receive()
            self.step()
            if not self.owed:
                return
            time.sleep(0.02)

    def give_up_through(self, segment: int) -> int:
        gone = [seq for seq, item in self.owed.items() if item.at.segment <= segment]
        for seq in gone:
            del self.owed[seq]
        count = len(gone)
        while self.reader.position.segment <= segment:
            count += len(self.reader.skip_segment())
        if gone:
            self._client.cut_seq = max(self._client.cut_seq, gone[-1])
        self.counters.given_up += count
        self.counters.given_up_horizon += count
        return count

    def _update_lag(self) -> None:
        counters = self.counters
        counters.lag_reports = max(0, self.reader.mark.get().head - self.cursor)
        oldest = self.owed[next(iter(self.owed))].event.ts if self.owed else None
        counters.lag_seconds = max(0.0, self.wall() - oldest) if oldest is not None else 0.0
