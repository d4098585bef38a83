"""Notifications that reach people: each channel (an Apprise URL: e-mail, Slack, Teams,
Telegram, JSON...; or a syslog receiver) takes the alerts its route matches, through
the outbox (engine.alerts.outbox), so a channel is one more destination: at least
once, never in detection's way, counted with the others.

The path of an alert:

    lake writer: NotifySink.deliver -> route -> Outbox row (notify.NAME, alert_id, payload)
    serve:       Courier(notify.NAME) -> NotifyDestination.send -> rate limit ->
                 a message now, or held for the channel's digest

Rate limit and digest. A channel sends at most `limit` messages in any `period_s`
(sliding, wall clock: it protects the people reading). An alert that finds the limit
reached, or finds alerts already held, is held in `DATA_DIR/outbox/notify.sqlite3`
and a digest delivery is enqueued for the channel, due when the limit lets one
message through again (the oldest send of the period, plus the period). The digest
is keyed by that time, so every alert held in one burst names the same digest (the
outbox keeps one row per key), and it sends all that is held when it goes, as one
message, then releases them. Each step is on disk before the one after it:

- an alert is held (committed) and its digest enqueued (committed) before `send`
  returns, so the courier marks the alert delivered only once both hold; a crash in
  between delivers the alert again, which finds itself held and enqueues the same
  digest key again: a no-op.
- the held alerts are released (committed) only after the digest was sent; a crash
  in between sends the digest again (at least once, as every delivery).

What a message says is engine.alerts.messages' (text from the network escaped for the
format the channel reads); how it leaves (Apprise, syslog) is engine.alerts.transports'.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.alerts.couriers import DeliveryError
from engine.alerts.outbox import Outbox, OutboxError
from engine.alerts.transports import Transport

if TYPE_CHECKING:
    from engine.detect.alerts import Alert

log = logging.getLogger(__name__)

# A digest's key in the outbox; an alert's key is its alert_id (a UUID), never this.
DIGEST_PREFIX = "digest:"


def alert_level(alert: Alert) -> str:
    """An alert's level: `warning` or `critical` (an escalation's is `critical`: a route
    for critical takes the escalation of an alert raised at warning). An alert that
    carries none was raised at its rule's one (main) threshold, the critical one."""
    return str(getattr(alert, "level", "") or "critical")


# -- routing (in the lake writer) -----------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Which alerts a channel takes: every non-empty condition must hold."""

    severities: frozenset[str] = frozenset()
    levels: frozenset[str] = frozenset()
    # Rule or model ids, shell-style patterns.
    rules: tuple[str, ...] = ()
    # The alert's rule has at least one of these.
    tags: frozenset[str] = frozenset()

    def takes(self, alert: Alert, tags: Collection[str]) -> bool:
        if self.severities and alert.severity not in self.severities:
            return False
        if self.levels and alert_level(alert) not in self.levels:
            return False
        if self.rules and not any(fnmatch.fnmatchcase(alert.rule_id, p) for p in self.rules):
            return False
        return not self.tags or not self.tags.isdisjoint(tags)


class NotifySink:
    """An alert sink (in the lake writer) that enqueues each alert (not shadow ones) for
    every channel whose route takes it; `deliver` returns once they are durable.
    `tags_of(rule_id)`: the tags of the rule that raised an alert (none for a model)."""

    def __init__(
        self,
        outbox: Outbox,
        routes: Sequence[tuple[str, Route]],
        tags_of: Callable[[str], Collection[str]] = lambda rule_id: (),
    ) -> None:
        self.outbox = outbox
        self.routes = list(routes)
        self.tags_of = tags_of

    def deliver(self, alerts: Sequence[Alert]) -> None:
        items: list[tuple[str, str, bytes]] = []
        for alert in alerts:
            if alert.mode != "alert":
                continue
            tags = sorted(self.tags_of(alert.rule_id))
            payload = b""
            for destination, route in self.routes:
                if route.takes(alert, tags):
                    payload = payload or notification_payload(alert, tags)
                    items.append((destination, alert.delivery_key, payload))
        self.outbox.enqueue_many(items)

    def close(self) -> None:
        self.outbox.close()


def notification_payload(alert: Alert, tags: Sequence[str]) -> bytes:
    data = {**alert.as_json(), "level": alert_level(alert), "tags": list(tags)}
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


# -- the channel's rate limit and digest -----------------------------------------------


def notify_state_path(data_dir: Path) -> Path:
    return data_dir / "outbox" / "notify.sqlite3"


_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (channel TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sent_at ON sent (channel, at);
CREATE TABLE IF NOT EXISTS held (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    held_at REAL NOT NULL,
    PRIMARY KEY (channel, key)
);
"""


class ChannelState:
    """Each channel's recent sends and held alerts (SQLite, WAL, every commit on disk):
    the memory of the rate limit across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, check_same_thread=False, timeout=10, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_STATE_SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise OutboxError(f"notification state {path}: {error}") from None

    def _run(self, statements: Callable[[sqlite3.Connection], list[Any]]) -> list[Any]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = statements(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                raise OutboxError(f"notification state {self.path}: {error}") from None

    def sent_since(self, channel: str, since: float) -> list[float]:
        return self._run(
            lambda db: [
                float(at)
                for (at,) in db.execute(
                    "SELECT at FROM sent WHERE channel = ? AND at > ? ORDER BY at",
                    (channel, since),
                )
            ]
        )

    def record_sent(self, channel: str, at: float, forget_before: float) -> None:
        def record(db: sqlite3.Connection) -> list[Any]:
            db.execute("INSERT INTO sent (channel, at) VALUES (?, ?)", (channel, at))
            db.execute("DELETE FROM sent WHERE channel = ? AND at <= ?", (channel, forget_before))
            return []

        self._run(record)

    def hold(self, channel: str, key: str, payload: bytes, at: float) -> None:
        self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO held (channel, key, payload, held_at) VALUES (?, ?, ?, ?)",
                (channel, key, payload, at),
            ).fetchall()
        )

    def holds(self, channel: str) -> bool:
        return bool(
            self._run(
                lambda db: db.execute(
                    "SELECT 1 FROM held WHERE channel = ? LIMIT 1", (channel,)
                ).fetchall()
            )
        )

    def held(self, channel: str) -> list[tuple[str, bytes]]:
        return self._run(
            lambda db: db.execute(
                "SELECT key, payload FROM held WHERE channel = ? ORDER BY held_at, key",
                (channel,),
            ).fetchall()
        )

    def release(self, channel: str, keys: Sequence[str], at: float, forget_before: float) -> None:
        """The held `keys` went out in a digest at `at` (one send of the rate limit)."""

        def release(db: sqlite3.Connection) -> list[Any]:
            db.executemany(
                "DELETE FROM held WHERE channel = ? AND key = ?", [(channel, k) for k in keys]
            )
            db.execute("INSERT INTO sent (channel, at) VALUES (?, ?)", (channel, at))
            db.execute("DELETE FROM sent WHERE channel = ? AND at <= ?", (channel, forget_before))
            return []

        self._run(release)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NotifyDestination:
    """A notification channel as an outbox destination (`notify.NAME`): sends each alert
    delivered to it, within the channel's rate limit, and its digests (see the module's
    description)."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        data_dir: Path,
        *,
        limit: int = 0,
        period_s: float = 3600.0,
        public_url: str = "",
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.transport = transport
        self.data_dir = data_dir
        self.limit = limit
        self.period_s = period_s
        self.public_url = public_url
        self.clock = clock
        self._outbox = outbox
        self._state: ChannelState | None = None

    def _ready(self) -> tuple[ChannelState, Outbox]:
        if self._state is None:
            self._state = ChannelState(notify_state_path(self.data_dir))
        if self._outbox is None:
            self._outbox = Outbox.of(self.data_dir)
        return self._state, self._outbox

    def send(self, key: str, payload: bytes) -> None:
        if key.startswith(DIGEST_PREFIX):
            self._send_digest()
            return
        alert = _alert_of(payload)
        if self.limit <= 0:
            self.transport.send_alert(alert, self.public_url)
            return
        state, outbox = self._ready()
        now = self.clock()
        recent = state.sent_since(self.name, now - self.period_s)
        if len(recent) >= self.limit or state.holds(self.name):
            state.hold(self.name, key, payload, now)
            # While alerts are held no message but the digest goes out, so `recent` is
            # the same for every alert of the burst, and so is the digest's key.
            due = max(recent[0] + self.period_s, now) if recent else now
            outbox.enqueue_later(self.name, f"{DIGEST_PREFIX}{due:.6f}", b"", due)
            return
        self.transport.send_alert(alert, self.public_url)
        state.record_sent(self.name, now, now - self.period_s)

    def _send_digest(self) -> None:
        state, _ = self._ready()
        held = state.held(self.name)
        if not held:
            return  # sent before a crash, released, and delivered again: nothing to do
        alerts = [_alert_of(payload) for _, payload in held]
        self.transport.send_digest(alerts, self.public_url, self.limit, self.period_s)
        now = self.clock()
        state.release(self.name, [key for key, _ in held], now, now - self.period_s)
        log.info("%s: a digest of %d alerts went out", self.name, len(held))

    def close(self) -> None:
        if self._state is not None:
            self._state.close()


def _alert_of(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise DeliveryError("not an alert (unreadable payload)", final=True) from None
    if not isinstance(data, dict):
        raise DeliveryError("not an alert (payload is no JSON object)", final=True)
    return data
