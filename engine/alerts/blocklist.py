"""callsentry's own blocklist (`callsentry blocklist`): the entities block actions and
reviewers put on it, each until its expiry, for export to the switch or a SIP proxy.

It is a table of the actions' book (engine.alerts.actionbook makes it), in the
outbox's file, so that a block action's entry and its request recorded done are one
transaction:

    blocklist(entity_type, entity, added_at, expires_at, reason, added_by, action_id,
              alert_id)   one entry per (entity_type, entity); expires_at NULL: for
              good; action_id and alert_id: the action that added it ('' by hand)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.alerts.outbox import Outbox, OutboxError

SCHEMA = """CREATE TABLE IF NOT EXISTS blocklist (
        entity_type TEXT NOT NULL,
        entity TEXT NOT NULL,
        added_at REAL NOT NULL,
        expires_at REAL,
        reason TEXT NOT NULL DEFAULT '',
        added_by TEXT NOT NULL DEFAULT '',
        action_id TEXT NOT NULL DEFAULT '',
        alert_id TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (entity_type, entity)
    )"""


@dataclass(frozen=True)
class BlockEntry:
    entity_type: str
    entity: str
    added_at: float
    expires_at: float | None
    reason: str
    added_by: str
    action_id: str
    alert_id: str


class Blocklist:
    """The blocklist in an outbox file (see the module's description); the actions' book
    opens it as `ActionBook.blocklist`."""

    def __init__(self, outbox: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.clock = clock

    def block(
        self,
        entity_type: str,
        entity: str,
        expires_at: float | None,
        reason: str,
        added_by: str,
    ) -> tuple[bool, float | None]:
        """Block `entity` until `expires_at` (None: for good), replacing its entry if it
        has one: returns whether it had one in force, and that one's expiry."""
        now = self.clock()
        before: list[tuple[float | None]] = []

        def add(db: sqlite3.Connection) -> None:
            before.extend(
                db.execute(
                    "SELECT expires_at FROM blocklist WHERE entity_type = ? AND entity = ? "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (entity_type, entity, now),
                ).fetchall()
            )
            write_block(db, entity_type, entity, now, expires_at, reason, added_by, "", "")

        self.outbox.transaction(add)
        return (True, before[0][0]) if before else (False, None)

    def unblock(self, entity_type: str, entity: str) -> bool:
        removed: list[int] = []

        def remove(db: sqlite3.Connection) -> None:
            before = db.total_changes
            db.execute(
                "DELETE FROM blocklist WHERE entity_type = ? AND entity = ?", (entity_type, entity)
            )
            removed.append(db.total_changes - before)

        self.outbox.transaction(remove)
        return bool(removed[0])

    def entries(self, *, include_expired: bool = False) -> list[BlockEntry]:
        try:
            rows = self.outbox.read(
                "SELECT entity_type, entity, added_at, expires_at, reason, added_by, "
                "action_id, alert_id FROM blocklist WHERE ? OR expires_at IS NULL OR "
                "expires_at > ? ORDER BY entity_type, entity",
                (int(include_expired), self.clock()),
            )
        except OutboxError as error:
            if "no such table" in str(error):
                return []  # an outbox no action was ever decided in
            raise
        return [BlockEntry(*row) for row in rows]  # type: ignore[arg-type]


def write_block(
    db: sqlite3.Connection,
    entity_type: str,
    entity: str,
    now: float,
    expires_at: float | None,
    reason: str,
    added_by: str,
    action_id: str,
    alert_id: str,
) -> None:
    db.execute(
        "INSERT INTO blocklist (entity_type, entity, added_at, expires_at, reason, added_by, "
        "action_id, alert_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (entity_type, entity) DO UPDATE SET added_at = excluded.added_at, "
        "expires_at = excluded.expires_at, reason = excluded.reason, "
        "added_by = excluded.added_by, action_id = excluded.action_id, "
        "alert_id = excluded.alert_id",
        (entity_type, entity, now, expires_at, reason, added_by, action_id, alert_id),
    )


def lift_block(
    db: sqlite3.Connection, entity_type: str, entity: str, action_id: str, alert_id: str
) -> None:
    """Take off the entry the action `action_id` made on `alert_id` (its undo): only
    that one, so a later entry of the same entity (a manual add) stays."""
    db.execute(
        "DELETE FROM blocklist WHERE entity_type = ? AND entity = ? "
        "AND action_id = ? AND alert_id = ?",
        (entity_type, entity, action_id, alert_id),
    )
