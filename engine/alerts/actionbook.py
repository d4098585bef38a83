"""The actions' book: their requests, approvals and the audit trail.

State lives in the outbox's own file (`DATA_DIR/outbox/deliveries.sqlite3`), so that
a decision and the delivery it enqueues are one transaction: neither is on disk
without the other, whatever is killed when.

    action_requests(id, key, action_id, alert_id, ..., state, hold, payload, ...)
        one per (action, alert); state: pending (waits for a reviewer: hold says
        whether the action asks for approval or its budget, engine.alerts.budget, ran out)
        -> queued -> done -> undo_queued -> undone. Unique by key = "ACTION:ALERT:do".
    actions(seq, at, request_id, action_id, alert_id, ..., event, reviewer, request,
            status, undo_at, key)
        the audit trail: append-only (triggers refuse UPDATE and DELETE); the lake
        writer copies it into the lake, so `callsentry.duckdb` shows it as `actions`.
    action_tallies(action_id, fired, approved, failed, budget_holds)   for the metrics
    blocklist(...)   callsentry's own blocklist (engine.alerts.blocklist), made here
        with the book's tables and opened as `ActionBook.blocklist`

`approve`, `reject` and `lift` are a reviewer's decisions (the CLI's `actions` and
the console call them); deciding and doing are in engine.alerts.actions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.alerts import budget
from engine.alerts.actionspec import (
    ActionSpec,
)
from engine.alerts.blocklist import SCHEMA as BLOCKLIST_SCHEMA
from engine.alerts.blocklist import Blocklist
from engine.alerts.outbox import (
    Outbox,
    OutboxError,
    enqueue_in,
    outbox_path,
    requeue_in,
)
from engine.core.text import shown

log = logging.getLogger(__name__)

# The outbox destinations of actions, one per kind.
DESTINATIONS = {"http": "actions-http", "command": "actions-command", "block": "actions-block"}
REQUEST_STATES = ("pending", "queued", "done", "undo_queued", "undone", "rejected")
# The audit trail's columns, in order (the lake's `actions` table has the same).
AUDIT_COLUMNS = (
    "seq",
    "recorded_at",
    "request_id",
    "action_id",
    "alert_id",
    "rule_id",
    "severity",
    "entity_type",
    "entity",
    "kind",
    "mode",
    "dry_run",
    "step",
    "event",
    "reviewer",
    "request",
    "status",
    "undo_at",
    "key",
)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS action_requests (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        action_id TEXT NOT NULL,
        alert_id TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        severity TEXT NOT NULL,
        entity_type TEXT NOT NULL,
        entity TEXT NOT NULL,
        kind TEXT NOT NULL,
        mode TEXT NOT NULL,
        dry_run INTEGER NOT NULL,
        auto INTEGER NOT NULL,
        state TEXT NOT NULL,
        hold TEXT NOT NULL DEFAULT '',
        payload BLOB NOT NULL,
        created_at REAL NOT NULL,
        approved_by TEXT NOT NULL DEFAULT '',
        approved_at REAL,
        done_at REAL,
        undo_at REAL,
        undone_at REAL,
        last_error TEXT NOT NULL DEFAULT ''
    )""",
    budget.INDEX,
    "CREATE INDEX IF NOT EXISTS undo_due ON action_requests (state, undo_at)",
    """CREATE TABLE IF NOT EXISTS actions (
        seq INTEGER PRIMARY KEY,
        recorded_at REAL NOT NULL,
        request_id INTEGER NOT NULL,
        action_id TEXT NOT NULL,
        alert_id TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        severity TEXT NOT NULL,
        entity_type TEXT NOT NULL,
        entity TEXT NOT NULL,
        kind TEXT NOT NULL,
        mode TEXT NOT NULL,
        dry_run INTEGER NOT NULL,
        step TEXT NOT NULL,
        event TEXT NOT NULL,
        reviewer TEXT NOT NULL DEFAULT '',
        request TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT '',
        undo_at REAL,
        key TEXT NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS actions_append_only_update BEFORE UPDATE ON actions
        BEGIN SELECT RAISE(ABORT, 'the actions trail is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS actions_append_only_delete BEFORE DELETE ON actions
        BEGIN SELECT RAISE(ABORT, 'the actions trail is append-only'); END""",
    """CREATE TABLE IF NOT EXISTS action_tallies (
        action_id TEXT PRIMARY KEY,
        fired INTEGER NOT NULL DEFAULT 0,
        approved INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        budget_holds INTEGER NOT NULL DEFAULT 0
    )""",
    BLOCKLIST_SCHEMA,
]

_REQUEST_COLUMNS = (
    "id, key, action_id, alert_id, rule_id, severity, entity_type, entity, kind, mode, "
    "dry_run, auto, state, hold, payload, created_at, approved_by, approved_at, done_at, "
    "undo_at, undone_at, last_error"
)


class ActionError(Exception):
    """What a command asked of the actions cannot be done; the message says why."""


class NoActions(ActionError):
    """The data dir has no outbox: no action was ever decided there."""


@dataclass(frozen=True)
class ActionRequest:
    id: int
    key: str
    action_id: str
    alert_id: str
    rule_id: str
    severity: str
    entity_type: str
    entity: str
    kind: str
    mode: str
    dry_run: bool
    auto: bool
    state: str
    hold: str
    payload: bytes
    created_at: float
    approved_by: str
    approved_at: float | None
    done_at: float | None
    undo_at: float | None
    undone_at: float | None
    last_error: str


@dataclass(frozen=True)
class ActionCounts:
    fired: int = 0
    approved: int = 0
    failed: int = 0
    budget_holds: int = 0
    pending: int = 0


def request_key(action_id: str, alert_id: str, step: str) -> str:
    """The idempotency key of an action on an alert: the action or its undo."""
    return f"{action_id}:{alert_id}:{step}"


def _audit(
    db: sqlite3.Connection,
    request: ActionRequest,
    step: str,
    event: str,
    now: float,
    *,
    reviewer: str = "",
    summary: str = "",
    status: str = "",
    undo_at: float | None = None,
) -> None:
    db.execute(
        "INSERT INTO actions (recorded_at, request_id, action_id, alert_id, rule_id, severity, "
        "entity_type, entity, kind, mode, dry_run, step, event, reviewer, request, status, "
        "undo_at, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            now,
            request.id,
            request.action_id,
            request.alert_id,
            request.rule_id,
            request.severity,
            request.entity_type,
            request.entity,
            request.kind,
            request.mode,
            int(request.dry_run),
            step,
            event,
            reviewer,
            summary,
            status,
            undo_at,
            request_key(request.action_id, request.alert_id, step),
        ),
    )


def _count(db: sqlite3.Connection, action_id: str, column: str) -> None:
    db.execute(
        f"INSERT INTO action_tallies (action_id, {column}) VALUES (?, 1) ON CONFLICT (action_id) "
        f"DO UPDATE SET {column} = {column} + 1",
        (action_id,),
    )


def _request(row: Sequence[object]) -> ActionRequest:
    values = list(row)
    values[10] = bool(values[10])
    values[11] = bool(values[11])
    return ActionRequest(*values)  # type: ignore[arg-type]


def _delivery_payload(request: ActionRequest, step: str) -> bytes:
    data = json.loads(request.payload)
    data.update(request_id=request.id, step=step)
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def _asked_id(request_id: int) -> int:
    """A request id as asked for: one past SQLite's integers (a typed or crafted number)
    names no request, rather than failing inside the query."""
    if not 0 < request_id < 2**63:
        raise ActionError(f"no action request {request_id}")
    return request_id


class ActionBook:
    """The actions' state in the outbox file (see the module's description)."""

    def __init__(self, outbox: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.clock = clock
        self.blocklist = Blocklist(outbox, clock=clock)

        def create(db: sqlite3.Connection) -> None:
            for statement in _SCHEMA:
                db.execute(statement)

        try:
            self.outbox.read("SELECT count(*) FROM action_requests WHERE 0")
        except OutboxError:
            # A new file, or one made before actions: add their tables (a read-only
            # opener cannot, and reads them as empty).
            with contextlib.suppress(OutboxError):
                self.outbox.transaction(create)

    @classmethod
    def of(cls, data_dir: Path, *, read_only: bool = False) -> ActionBook:
        return cls(Outbox.of(data_dir, read_only=read_only))

    def close(self) -> None:
        self.outbox.close()

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return self.outbox.read(sql, params)
        except OutboxError as error:
            if "no such table" in str(error):
                return []  # an outbox no action was ever decided in
            raise

    # -- deciding ---------------------------------------------------------------------

    def decide(self, pairs: Sequence[tuple[ActionSpec, Mapping[str, Any]]]) -> list[ActionRequest]:
        """A request for each (action, alert as JSON) not decided before, in one
        transaction with the deliveries it queues. Returns the new requests."""
        now = self.clock()
        made: list[ActionRequest] = []
        # Actions whose budget ran out with this call (none was held in the last hour).
        first_holds: set[str] = set()

        def decide(db: sqlite3.Connection) -> None:
            made.clear()
            first_holds.clear()
            for action, alert in pairs:
                key = request_key(action.id, str(alert["alert_id"]), "do")
                if db.execute("SELECT 1 FROM action_requests WHERE key = ?", (key,)).fetchone():
                    continue  # decided before (a segment detected again after a crash)
                state, hold, auto = "queued", "", True
                if action.mode == "approve":
                    state, hold, auto = "pending", "approval", False
                elif budget.spent(db, action.id, now) >= action.budget.per_hour:
                    state, hold, auto = "pending", "budget", False
                    if not budget.held_before(db, action.id, now):
                        first_holds.add(action.id)
                payload = json.dumps(
                    {"action": action.as_data(), "alert": dict(alert)}, ensure_ascii=False
                ).encode("utf-8")
                cursor = db.execute(
                    "INSERT INTO action_requests (key, action_id, alert_id, rule_id, severity, "
                    "entity_type, entity, kind, mode, dry_run, auto, state, hold, payload, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        action.id,
                        str(alert["alert_id"]),
                        str(alert.get("rule_id", "")),
                        str(alert.get("severity", "")),
                        str(alert.get("entity_type", "")),
                        str(alert.get("entity", "")),
                        action.kind,
                        action.mode,
                        int(action.dry_run),
                        int(auto),
                        state,
                        hold,
                        payload,
                        now,
                    ),
                )
                row = db.execute(
                    f"SELECT {_REQUEST_COLUMNS} FROM action_requests WHERE id = ?",
                    (cursor.lastrowid,),
                ).fetchone()
                request = _request(row)
                if state == "queued":
                    _audit(db, request, "do", "queued", now)
                    enqueue_in(
                        db, DESTINATIONS[action.kind], key, _delivery_payload(request, "do"), now
                    )
                elif hold == "approval":
                    _audit(db, request, "do", "awaiting_approval", now)
                else:
                    _audit(db, request, "do", "budget_hold", now)
                    _count(db, action.id, "budget_holds")
                made.append(request)

        self.outbox.transaction(decide)
        for request in made:
            if request.hold == "budget":
                # The actions' own notice (and metric), not a detection alert: a warning
                # when the budget runs out, then a line per action held.
                if request.action_id in first_holds:
                    first_holds.discard(request.action_id)
                    log.warning(
                        "action %s: budget of %d per hour used up; what it would do now "
                        "waits for approval (callsentry actions list --state pending)",
                        request.action_id,
                        budget.per_hour(request.payload),
                    )
                log.info(
                    "action %s on alert %s (%s %s) held by its budget: "
                    "callsentry actions approve %d",
                    request.action_id,
                    request.alert_id,
                    request.entity_type,
                    shown(request.entity),
                    request.id,
                )
            elif request.hold == "approval":
                log.info(
                    "action %s on alert %s (%s %s) waits for approval: "
                    "callsentry actions approve %d",
                    request.action_id,
                    request.alert_id,
                    request.entity_type,
                    shown(request.entity),
                    request.id,
                )
        return made

    def approve(self, request_id: int, reviewer: str) -> ActionRequest:
        """Queue a pending request, recording who approved it."""
        if not reviewer.strip():
            raise ActionError("an approval needs the reviewer's name (--reviewer)")
        now = self.clock()
        found: list[ActionRequest] = []

        def approve(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            if request.state != "pending":
                raise ActionError(
                    f"request {request_id} is {request.state}, not waiting for approval"
                )
            db.execute(
                "UPDATE action_requests SET state = 'queued', approved_by = ?, approved_at = ? "
                "WHERE id = ?",
                (reviewer.strip(), now, request_id),
            )
            _audit(db, request, "do", "approved", now, reviewer=reviewer.strip())
            _count(db, request.action_id, "approved")
            requeue_in(
                db, DESTINATIONS[request.kind], request.key, _delivery_payload(request, "do"), now
            )
            found.append(request)

        self.outbox.transaction(approve)
        return self.request(found[0].id)

    def reject(self, request_id: int, reviewer: str) -> ActionRequest:
        """Drop a pending request: it is never done (the trail says who decided)."""
        if not reviewer.strip():
            raise ActionError("a rejection needs the reviewer's name (--reviewer)")
        now = self.clock()

        def reject(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            if request.state != "pending":
                raise ActionError(
                    f"request {request_id} is {request.state}, not waiting for approval"
                )
            db.execute("UPDATE action_requests SET state = 'rejected' WHERE id = ?", (request_id,))
            _audit(db, request, "do", "rejected", now, reviewer=reviewer.strip())

        self.outbox.transaction(reject)
        return self.request(request_id)

    def lift(self, request_id: int, reviewer: str) -> ActionRequest:
        """Undo a done action now (a reviewer lifts it) instead of when it expires."""
        if not reviewer.strip():
            raise ActionError("lifting an action needs the reviewer's name (--reviewer)")
        now = self.clock()

        def lift(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            if request.state != "done":
                raise ActionError(f"request {request_id} is {request.state}, not done")
            self._queue_undo(db, request, now, reviewer.strip())

        self.outbox.transaction(lift)
        return self.request(request_id)

    def _one(self, db: sqlite3.Connection, request_id: int) -> ActionRequest:
        row = db.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM action_requests WHERE id = ?",
            (_asked_id(request_id),),
        ).fetchone()
        if row is None:
            raise ActionError(f"no action request {request_id}")
        return _request(row)

    def _queue_undo(
        self, db: sqlite3.Connection, request: ActionRequest, now: float, reviewer: str = ""
    ) -> None:
        db.execute(
            "UPDATE action_requests SET state = 'undo_queued' WHERE id = ? AND state = 'done'",
            (request.id,),
        )
        _audit(db, request, "undo", "undo_queued", now, reviewer=reviewer)
        key = request_key(request.action_id, request.alert_id, "undo")
        requeue_in(db, DESTINATIONS[request.kind], key, _delivery_payload(request, "undo"), now)

    def queue_due_undos(self) -> int:
        """Queue the undo of every done action whose time has come; how many."""
        now = self.clock()
        if not self._rows(
            "SELECT 1 FROM action_requests WHERE state = 'done' AND undo_at <= ? LIMIT 1", (now,)
        ):
            return 0  # nothing due: nothing written, nothing fsync'd
        queued: list[int] = []

        def queue(db: sqlite3.Connection) -> None:
            queued.clear()
            rows = db.execute(
                f"SELECT {_REQUEST_COLUMNS} FROM action_requests WHERE state = 'done' "
                "AND undo_at <= ? ORDER BY undo_at LIMIT 1000",
                (now,),
            ).fetchall()
            for row in rows:
                self._queue_undo(db, _request(row), now)
                queued.append(1)

        self.outbox.transaction(queue)
        return len(queued)

    # -- doing ------------------------------------------------------------------------

    def step_done(self, request_id: int, step: str) -> bool:
        rows = self._rows("SELECT state FROM action_requests WHERE id = ?", (request_id,))
        if not rows:
            return False
        state = str(rows[0][0])
        return state in (("done", "undo_queued", "undone") if step == "do" else ("undone",))

    def record_done(
        self,
        request_id: int,
        step: str,
        summary: str,
        status: str,
        undo_after_s: float | None,
        also: Callable[[sqlite3.Connection, float], None] | None = None,
    ) -> None:
        """The step was done (`also`: what changes with it, in the same transaction)."""
        now = self.clock()

        def done(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            if also is not None:
                also(db, now)
            if step == "do":
                undo_at = None if undo_after_s is None else now + undo_after_s
                db.execute(
                    "UPDATE action_requests SET state = 'done', done_at = ?, undo_at = ?, "
                    "last_error = '' WHERE id = ? AND state = 'queued'",
                    (now, undo_at, request_id),
                )
                event = "dry_run" if request.dry_run else "fired"
                _audit(db, request, "do", event, now, summary=summary, status=status,
                       undo_at=undo_at)  # fmt: skip
                _count(db, request.action_id, "fired")
            else:
                db.execute(
                    "UPDATE action_requests SET state = 'undone', undone_at = ?, last_error = '' "
                    "WHERE id = ?",
                    (now, request_id),
                )
                event = "undo_dry_run" if request.dry_run else "undone"
                _audit(db, request, "undo", event, now, summary=summary, status=status)

        self.outbox.transaction(done)

    def record_failure(
        self, request_id: int, step: str, summary: str, error: str, *, answered: bool
    ) -> None:
        """An attempt failed: counted, the error kept on the request; an answer that
        refused it (not an unreachable endpoint) goes into the trail too, once for each
        new reason (not once per retry)."""
        now = self.clock()

        def failed(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            db.execute(
                "UPDATE action_requests SET last_error = ? WHERE id = ?", (error, request_id)
            )
            _count(db, request.action_id, "failed")
            if answered and error != request.last_error:
                _audit(db, request, step, "failed", now, summary=summary, status=error)

        with contextlib.suppress(ActionError):
            self.outbox.transaction(failed)

    def record_given_up(self, request_id: int, step: str, error: str) -> None:
        """The outbox gave up delivering a step. A `do` waits for a reviewer again (hold
        `given_up`: approve tries once more, reject drops it); an `undo` is back to done,
        so `lift` can try it again. Either way the trail says so."""
        now = self.clock()

        def given_up(db: sqlite3.Connection) -> None:
            request = self._one(db, request_id)
            if step == "do" and request.state == "queued":
                db.execute(
                    "UPDATE action_requests SET state = 'pending', hold = 'given_up', "
                    "last_error = ? WHERE id = ?",
                    (error, request_id),
                )
            elif step == "undo" and request.state == "undo_queued":
                db.execute(
                    "UPDATE action_requests SET state = 'done', last_error = ? WHERE id = ?",
                    (error, request_id),
                )
            else:
                return
            _audit(db, request, step, "given_up", now, status=error)

        with contextlib.suppress(ActionError):
            self.outbox.transaction(given_up)

    # -- reading ----------------------------------------------------------------------

    def request(self, request_id: int) -> ActionRequest:
        rows = self._rows(
            f"SELECT {_REQUEST_COLUMNS} FROM action_requests WHERE id = ?",
            (_asked_id(request_id),),
        )
        if not rows:
            raise ActionError(f"no action request {request_id}")
        return _request(rows[0])

    def requests(
        self, states: Sequence[str] = (), action_id: str | None = None, limit: int = 50
    ) -> list[ActionRequest]:
        """Requests in `states` (empty: any), newest first."""
        where = ["(? IS NULL OR action_id = ?)"]
        params: list[object] = [action_id, action_id]
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        rows = self._rows(
            f"SELECT {_REQUEST_COLUMNS} FROM action_requests WHERE {' AND '.join(where)} "
            "ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [_request(row) for row in rows]

    def trail(self, request_id: int | None = None, after_seq: int = 0) -> list[dict[str, Any]]:
        """Rows of the audit trail (of one request, or all), oldest first."""
        if request_id is not None:
            _asked_id(request_id)
        rows = self._rows(
            f"SELECT {', '.join(AUDIT_COLUMNS)} FROM actions WHERE seq > ? "
            "AND (? IS NULL OR request_id = ?) ORDER BY seq LIMIT 100000",
            (after_seq, request_id, request_id),
        )
        return [dict(zip(AUDIT_COLUMNS, row, strict=True)) for row in rows]

    def counts(self) -> dict[str, ActionCounts]:
        tallies = {
            str(row[0]): [int(v) for v in row[1:]]  # type: ignore[call-overload]
            for row in self._rows(
                "SELECT action_id, fired, approved, failed, budget_holds FROM action_tallies"
            )
        }
        pending = {
            str(a): int(n)  # type: ignore[call-overload]
            for a, n in self._rows(
                "SELECT action_id, count(*) FROM action_requests WHERE state = 'pending' "
                "GROUP BY action_id"
            )
        }
        result = {}
        for name in sorted({*tallies, *pending}):
            fired, approved, failed, holds = tallies.get(name, [0, 0, 0, 0])
            result[name] = ActionCounts(fired, approved, failed, holds, pending.get(name, 0))
        return result


def _book(data_dir: Path, *, read_only: bool) -> ActionBook:
    if not outbox_path(data_dir).exists():
        raise NoActions(f"{data_dir} has no actions yet (no outbox: nothing was decided there)")
    try:
        return ActionBook.of(data_dir, read_only=read_only)
    except OutboxError as error:
        raise ActionError(str(error)) from None


def approve(data_dir: Path, request_id: int, reviewer: str) -> ActionRequest:
    """Approve a pending action request: it is queued (a running serve does it) and the
    trail records `reviewer`. The CLI's `actions approve` and the console call this."""
    return _decide(data_dir, lambda book: book.approve(request_id, reviewer))


def reject(data_dir: Path, request_id: int, reviewer: str) -> ActionRequest:
    """Reject a pending action request: it is never done."""
    return _decide(data_dir, lambda book: book.reject(request_id, reviewer))


def lift(data_dir: Path, request_id: int, reviewer: str) -> ActionRequest:
    """Undo a done action now (its undo is queued; a running serve makes it)."""
    return _decide(data_dir, lambda book: book.lift(request_id, reviewer))


def _decide(data_dir: Path, decision: Callable[[ActionBook], ActionRequest]) -> ActionRequest:
    """A reviewer's decision on the book in `data_dir`, which is closed after it."""
    book = _book(data_dir, read_only=False)
    try:
        return decision(book)
    except OutboxError as error:
        raise ActionError(str(error)) from None
    finally:
        book.close()


def open_book(data_dir: Path, *, read_only: bool = True) -> ActionBook:
    """The actions' state of a data dir, for reading (ActionError if there is none)."""
    return _book(data_dir, read_only=read_only)
