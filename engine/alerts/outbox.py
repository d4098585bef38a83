"""The outbox: whatever leaves the machine (an alert to a webhook, a notification, an
action, a message for NATS) is written here, durably, before anything tries to send
it, and is delivered from here by one courier per destination (engine.alerts.couriers;
NATS: the relay's publisher).

The file is `DATA_DIR/outbox/deliveries.sqlite3` (SQLite in WAL mode, every commit
fsync'd). One row per delivery, unique by (destination, key):

    deliveries(id, destination, key, payload, enqueued_at, attempts, next_at,
               last_error, state, done_at)      state: pending | delivered | given_up
        last_error: the last failed attempt's error ('' once delivered)
    tallies(destination, delivered, failed, given_up)    counters, for the metrics

Guarantees:
- `enqueue` returns once the delivery is on disk: a crash or kill -9 after it loses
  nothing. Enqueuing the same (destination, key) again is a no-op, so whoever
  enqueues may repeat itself after a crash (the lake writer does).
- A delivery stays pending until a courier marks it delivered or gives it up; how
  they deliver (at least once, a failing destination paused, the horizon after which
  they give up) is said in engine.alerts.couriers.

Any process may enqueue (the lake writer does, for alerts); the couriers run in
`serve`'s main process and notice another process's enqueue within `poll_s`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only for types: serve's receiver process imports this module for its couriers
    # and need not load detection.
    from engine.detect.alerts import Alert

STATES = ("pending", "delivered", "given_up")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    done_at REAL,
    UNIQUE (destination, key)
);
CREATE INDEX IF NOT EXISTS due ON deliveries (destination, state, next_at, id);
CREATE TABLE IF NOT EXISTS tallies (
    destination TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    given_up INTEGER NOT NULL DEFAULT 0
);
"""


def outbox_path(data_dir: Path) -> Path:
    return data_dir / "outbox" / "deliveries.sqlite3"


class OutboxError(OSError):
    """The outbox file cannot be opened, read or written; the message names it and why.
    An OSError, so the lake writer treats it as the file system failing (a full disk):
    the segment whose alerts it holds stays in the journal and is tried again."""


@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    key: str
    payload: bytes
    enqueued_at: float
    attempts: int
    last_error: str
    state: str
    done_at: float | None


@dataclass(frozen=True)
class DestinationCounts:
    """One destination's state for the metrics: counters since the outbox was made,
    and what waits now."""

    delivered: int = 0
    failed: int = 0
    given_up: int = 0
    pending: int = 0
    oldest_pending_at: float | None = None
    # Given up and still listed now (the counter counts a delivery again each time it
    # is retried and given up; `forget_done_before` drops old rows, not the counter).
    given_up_now: int = 0


class Outbox:
    """The durable queue of deliveries (see the module's description)."""

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock
        # Courier threads, the metrics thread and the caller share one connection.
        self._lock = threading.Lock()
        try:
            if read_only:
                uri = f"file:{path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    path, check_same_thread=False, timeout=10, isolation_level=None
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                # Each commit is on disk before it returns (enqueue's promise).
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            self._db.execute("SELECT count(*) FROM deliveries WHERE 0").fetchall()
        except (sqlite3.Error, OSError) as error:
            raise OutboxError(f"outbox {path}: {_reason(error)}") from None

    @classmethod
    def of(cls, data_dir: Path, *, read_only: bool = False) -> Outbox:
        return cls(outbox_path(data_dir), read_only=read_only)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    statements(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                raise OutboxError(f"outbox {self.path}: {_reason(error)}") from None

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                raise OutboxError(f"outbox {self.path}: {_reason(error)}") from None

    def enqueue(self, destination: str, key: str, payload: bytes) -> bool:
        """Queue `payload` for `destination`, on disk before this returns; False if that
        (destination, key) was queued before (kept as it was)."""
        return self.enqueue_many([(destination, key, payload)]) == 1

    def enqueue_many(self, items: Iterable[tuple[str, str, bytes]]) -> int:
        """`enqueue` for many, in one transaction (one fsync); how many were new."""
        rows = [(d, k, p, self.clock()) for d, k, p in items]
        if not rows:
            return 0
        added: list[int] = []

        def insert(db: sqlite3.Connection) -> None:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (destination, key, payload, enqueued_at, "
                "next_at) VALUES (?, ?, ?, ?, ?4)",
                rows,
            )
            added.append(db.total_changes - before)

        self._write(insert)
        return added[0]

    def enqueue_later(self, destination: str, key: str, payload: bytes, not_before: float) -> bool:
        """`enqueue`, due no sooner than `not_before` (a notification channel's digest
        waits for the end of its rate limit's period)."""
        added: list[int] = []
        row = (destination, key, payload, self.clock(), not_before)

        def insert(db: sqlite3.Connection) -> None:
            before = db.total_changes
            db.execute(
                "INSERT OR IGNORE INTO deliveries (destination, key, payload, enqueued_at, "
                "next_at) VALUES (?, ?, ?, ?, max(?4, ?5))",
                row,
            )
            added.append(db.total_changes - before)

        self._write(insert)
        return added[0] == 1

    def transaction(self, statements: Callable[[sqlite3.Connection], None]) -> None:
        """Run `statements` in one write transaction of this file (fsync'd on commit):
        another module's tables kept here change together with deliveries it enqueues
        there (`enqueue_in`), so neither is on disk without the other."""
        self._write(statements)

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Rows of a query on this file (OutboxError when it cannot be read)."""
        return self._read(sql, params)

    def due(self, destination: str, now: float, limit: int = 100) -> list[Delivery]:
        """Pending deliveries of `destination` whose time has come, oldest first."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM deliveries WHERE destination = ? AND state = 'pending' "
            "AND next_at <= ? ORDER BY next_at, id LIMIT ?",
            (destination, now, limit),
        )
        return [_delivery(row) for row in rows]

    def mark_delivered(self, delivery: Delivery) -> None:
        """The endpoint took it: delivered, and an earlier attempt's error is cleared
        (a delivered row lists no error)."""
        now = self.clock()

        def mark(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET state = 'delivered', done_at = ?, attempts = attempts + 1, "
                "last_error = '' WHERE id = ? AND state = 'pending'",
                (now, delivery.id),
            )
            _tally(db, delivery.destination, "delivered", 1)

        self._write(mark)

    def mark_delivered_many(self, deliveries: Sequence[Delivery]) -> None:
        """`mark_delivered` for many, in one transaction (one fsync): a publisher that
        sends thousands a second (NATS) cannot afford a commit each."""
        if not deliveries:
            return
        now = self.clock()

        def mark(db: sqlite3.Connection) -> None:
            by_destination: dict[str, int] = {}
            for delivery in deliveries:
                cursor = db.execute(
                    "UPDATE deliveries SET state = 'delivered', done_at = ?, "
                    "attempts = attempts + 1, last_error = '' WHERE id = ? AND state = 'pending'",
                    (now, delivery.id),
                )
                if cursor.rowcount:
                    destination = delivery.destination
                    by_destination[destination] = by_destination.get(destination, 0) + 1
            for destination, count in by_destination.items():
                _tally(db, destination, "delivered", count)

        self._write(mark)

    def mark_failed(self, delivery: Delivery, error: str, retry_at: float | None = None) -> None:
        """An attempt failed: counted, the error kept; `retry_at` moves this delivery
        back (the endpoint refused this one), None leaves it first in line (the
        endpoint is down: the courier pauses the destination instead)."""

        def mark(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, "
                "next_at = coalesce(?, next_at) WHERE id = ? AND state = 'pending'",
                (error, retry_at, delivery.id),
            )
            _tally(db, delivery.destination, "failed", 1)

        self._write(mark)

    def give_up_now(self, delivery: Delivery, error: str) -> Delivery | None:
        """Give up on one pending delivery that no attempt can deliver (the attempt is
        counted as failed, `error` kept); the delivery as given up, or None when it was
        no longer pending."""
        now = self.clock()
        given: list[Delivery] = []

        def mark(db: sqlite3.Connection) -> None:
            changed = db.execute(
                "UPDATE deliveries SET state = 'given_up', done_at = ?, attempts = attempts + 1, "
                "last_error = ? WHERE id = ? AND state = 'pending'",
                (now, error, delivery.id),
            ).rowcount
            if changed:
                _tally(db, delivery.destination, "failed", 1)
                _tally(db, delivery.destination, "given_up", 1)
                given.append(
                    replace(
                        delivery,
                        state="given_up",
                        attempts=delivery.attempts + 1,
                        last_error=error,
                        done_at=now,
                    )
                )

        self._write(mark)
        return given[0] if given else None

    def give_up_older_than(
        self, destination: str, enqueued_before: float, reason: str = ""
    ) -> list[Delivery]:
        """Give up on the pending deliveries of `destination` enqueued before that time;
        `reason` is kept as the error of those never tried (the endpoint was paused)."""
        given: list[Delivery] = []
        now = self.clock()
        # Read first: a pass with nothing to give up writes (and fsyncs) nothing.
        if not self._read(
            "SELECT 1 FROM deliveries WHERE destination = ? AND state = 'pending' "
            "AND enqueued_at < ? LIMIT 1",
            (destination, enqueued_before),
        ):
            return given

        def mark(db: sqlite3.Connection) -> None:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE destination = ? AND "
                "state = 'pending' AND enqueued_at < ? ORDER BY id",
                (destination, enqueued_before),
            ).fetchall()
            given.extend(_delivery(row) for row in rows)
            db.executemany(
                "UPDATE deliveries SET state = 'given_up', done_at = ?, "
                "last_error = CASE WHEN last_error = '' THEN ? ELSE last_error END WHERE id = ?",
                [(now, reason, d.id) for d in given],
            )
            _tally(db, destination, "given_up", len(given))

        self._write(mark)
        return given

    def retry_given_up(self, destination: str | None = None) -> int:
        """Put given-up deliveries back in the queue (their horizon starts again)."""
        now = self.clock()
        changed: list[int] = []

        def mark(db: sqlite3.Connection) -> None:
            before = db.total_changes
            db.execute(
                "UPDATE deliveries SET state = 'pending', enqueued_at = ?, next_at = ?, "
                "done_at = NULL WHERE state = 'given_up' AND (?3 IS NULL OR destination = ?3)",
                (now, now, destination),
            )
            changed.append(db.total_changes - before)

        self._write(mark)
        return changed[0]

    def forget_done_before(self, before: float, destination: str | None = None) -> int:
        """Drop delivered and given-up rows (of `destination`, or all) finished before
        `before`; the counters stay. Keeps the file bounded; a key enqueued again after
        that is sent again."""
        removed: list[int] = []

        def drop(db: sqlite3.Connection) -> None:
            before_changes = db.total_changes
            db.execute(
                "DELETE FROM deliveries WHERE state <> 'pending' AND done_at < ? "
                "AND (?2 IS NULL OR destination = ?2)",
                (before, destination),
            )
            removed.append(db.total_changes - before_changes)

        self._write(drop)
        return removed[0]

    def listing(
        self, states: Sequence[str] = ("given_up",), destination: str | None = None, limit: int = 50
    ) -> list[Delivery]:
        """Deliveries in `states`, newest first."""
        marks = ", ".join("?" for _ in states)
        rows = self._read(
            f"SELECT {_COLUMNS} FROM deliveries WHERE state IN ({marks}) "
            "AND (? IS NULL OR destination = ?) ORDER BY enqueued_at DESC, id DESC LIMIT ?",
            (*states, destination, destination, limit),
        )
        return [_delivery(row) for row in rows]

    def counts(self) -> dict[str, DestinationCounts]:
        """Per destination: the counters and what is pending now."""
        tallies = {
            str(d): (int(a), int(b), int(c))  # type: ignore[call-overload]
            for d, a, b, c in self._read(
                "SELECT destination, delivered, failed, given_up FROM tallies"
            )
        }
        pending = {
            str(d): (int(n), float(t))  # type: ignore[call-overload, arg-type]
            for d, n, t in self._read(
                "SELECT destination, count(*), min(enqueued_at) FROM deliveries "
                "WHERE state = 'pending' GROUP BY destination"
            )
        }
        given_up_now = {
            str(d): int(n)  # type: ignore[call-overload]
            for d, n in self._read(
                "SELECT destination, count(*) FROM deliveries WHERE state = 'given_up' "
                "GROUP BY destination"
            )
        }
        result: dict[str, DestinationCounts] = {}
        for name in sorted({*tallies, *pending}):
            delivered, failed, given_up = tallies.get(name, (0, 0, 0))
            waiting, oldest = pending.get(name, (0, None))
            result[name] = DestinationCounts(
                delivered, failed, given_up, waiting, oldest, given_up_now.get(name, 0)
            )
        return result


_COLUMNS = "id, destination, key, payload, enqueued_at, attempts, last_error, state, done_at"


def _delivery(row: tuple[object, ...]) -> Delivery:
    return Delivery(*row)  # type: ignore[arg-type]


def enqueue_in(
    db: sqlite3.Connection, destination: str, key: str, payload: bytes, now: float
) -> bool:
    """`Outbox.enqueue` inside a transaction of `Outbox.transaction`; False if that
    (destination, key) was queued before."""
    before = db.total_changes
    db.execute(
        "INSERT OR IGNORE INTO deliveries (destination, key, payload, enqueued_at, next_at) "
        "VALUES (?, ?, ?, ?, ?4)",
        (destination, key, payload, now),
    )
    return db.total_changes > before


def requeue_in(
    db: sqlite3.Connection, destination: str, key: str, payload: bytes, now: float
) -> None:
    """`enqueue_in`, and a delivery of that key given up before is pending again (a
    reviewer asked for it once more)."""
    db.execute(
        "INSERT INTO deliveries (destination, key, payload, enqueued_at, next_at) "
        "VALUES (?, ?, ?, ?, ?4) ON CONFLICT (destination, key) DO UPDATE SET "
        "state = 'pending', payload = excluded.payload, enqueued_at = excluded.enqueued_at, "
        "next_at = excluded.next_at, attempts = 0, last_error = '', done_at = NULL "
        "WHERE state = 'given_up'",
        (destination, key, payload, now),
    )


def _tally(db: sqlite3.Connection, destination: str, column: str, count: int) -> None:
    if count:
        db.execute(
            f"INSERT INTO tallies (destination, {column}) VALUES (?, ?) ON CONFLICT (destination) "
            f"DO UPDATE SET {column} = {column} + excluded.{column}",
            (destination, count),
        )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    if isinstance(error, sqlite3.DatabaseError) and "not a database" in text:
        return "not an outbox (not an SQLite database)"
    return text or type(error).__name__


class OutboxSink:
    """An alert sink that enqueues each alert (not shadow ones) for every destination,
    keyed by its alert_id (an escalation by its own key, `Alert.delivery_key`);
    `deliver` returns once they are durable."""

    def __init__(self, outbox: Outbox, destinations: Sequence[str]) -> None:
        self.outbox = outbox
        self.destinations = list(destinations)

    def deliver(self, alerts: Sequence[Alert]) -> None:
        items = [
            (destination, alert.delivery_key, alert_payload(alert))
            for alert in alerts
            if alert.mode == "alert"
            for destination in self.destinations
        ]
        self.outbox.enqueue_many(items)

    def close(self) -> None:
        self.outbox.close()


def alert_payload(alert: Alert) -> bytes:
    return json.dumps(alert.as_json(), ensure_ascii=False).encode("utf-8")
