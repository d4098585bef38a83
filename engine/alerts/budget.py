"""An action's budget: at most `budget.per_hour` of its requests are queued without a
reviewer (auto) in the hour before each decision; past that, what it would do waits
for approval (a pending request, hold `budget`), and the first such hold in an hour
is a warning in the log.

It is counted over the book's requests (engine.alerts.actionbook's `action_requests`:
`auto`, `hold` and `created_at`), inside the transaction that decides them.
"""

from __future__ import annotations

import json
import sqlite3

# The budget's period: the hour before each decision.
WINDOW_S = 3600.0

# The index the counting reads, on the book's table (made with it).
INDEX = "CREATE INDEX IF NOT EXISTS budget ON action_requests (action_id, auto, created_at)"


def spent(db: sqlite3.Connection, action_id: str, now: float) -> int:
    """How many requests of `action_id` were queued without a reviewer in the hour
    before `now`."""
    used = db.execute(
        "SELECT count(*) FROM action_requests WHERE action_id = ? AND auto = 1 AND created_at > ?",
        (action_id, now - WINDOW_S),
    ).fetchone()[0]
    return int(used)


def held_before(db: sqlite3.Connection, action_id: str, now: float) -> bool:
    """Whether a request of `action_id` was held by its budget in the hour before
    `now` (a hold after none is the one the log warns of)."""
    held = db.execute(
        "SELECT count(*) FROM action_requests WHERE action_id = ? "
        "AND hold = 'budget' AND created_at > ?",
        (action_id, now - WINDOW_S),
    ).fetchone()[0]
    return bool(held)


def per_hour(payload: bytes) -> int:
    """The budget per hour of the action a request's payload holds (the action as
    data, and the alert); 0 when it holds none."""
    try:
        return int(json.loads(payload)["action"]["budget"]["per_hour"])
    except (ValueError, KeyError, TypeError):
        return 0
