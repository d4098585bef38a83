"""Actions on alerts: deciding them and doing (and undoing) them through the outbox.
Their state, approvals and trail are the book's (engine.alerts.actionbook).

Who does what:
- the lake writer decides (`ActionSink`, an alert sink beside the OutboxSink): for
  each alert and each action that matches it, a request, queued at once (auto, within
  the budget) or pending; a segment detected again after a crash decides nothing new
  (the key is unique), and counts nothing twice;
- a reviewer approves a pending request (`actionbook.approve`: the CLI, the console);
- serve's couriers do what is queued (`ActionDestination`, one per kind, so a dead
  HTTP endpoint never holds up the blocklist); delivery is at least once, with the
  key as `Idempotency-Key`; a request recorded done is not done again;
- serve's housekeeping queues the undo of what is due (`queue_due_undos`), with its
  own key "ACTION:ALERT:undo".
Replay and backtest make no ActionSink: they never act.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.alerts.actionbook import (
    DESTINATIONS,
    ActionBook,
)
from engine.alerts.actionrender import alert_values, render, render_command, render_http
from engine.alerts.actionspec import ActionSet, ActionSetupError, ActionSpec, ActionSpecError
from engine.alerts.blocklist import lift_block, write_block
from engine.alerts.couriers import DeliveryError
from engine.alerts.outbox import Delivery
from engine.alerts.webhook import NoRedirect, send_http
from engine.core.text import shown

if TYPE_CHECKING:
    from engine.detect.alerts import Alert

log = logging.getLogger(__name__)

# -- deciding in the lake writer ------------------------------------------------------


class ActionSink:
    """An alert sink (durable, beside the OutboxSink): each alert's matching actions
    decided and, where they may go at once, queued; returns once that is on disk.
    The book is opened when the first action is decided (no action, no file)."""

    def __init__(
        self,
        open_book: Callable[[], ActionBook],
        actions: ActionSet,
        tags_of: Callable[[str], Sequence[str]] = lambda rule_id: (),
    ) -> None:
        self.open_book = open_book
        self.book: ActionBook | None = None
        self.actions = actions
        self.tags_of = tags_of

    def deliver(self, alerts: Sequence[Alert]) -> None:
        pairs = []
        actions = self.actions  # one set per call, however a reload swaps it meanwhile
        for alert in alerts:
            if alert.mode != "alert":
                continue
            data = alert.as_json()
            for action in actions.matching(data, self.tags_of(alert.rule_id)):
                pairs.append((action, data))
        if pairs:
            if self.book is None:
                self.book = self.open_book()
            self.book.decide(pairs)

    def close(self) -> None:
        if self.book is not None:
            self.book.close()


# -- doing, in serve's couriers -------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    request_id: int
    step: str
    action: ActionSpec
    alert: dict[str, Any]


class ActionDestination:
    """An outbox destination that does one kind of action (http, command or block)."""

    def __init__(
        self,
        book: ActionBook,
        kind: str,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.book = book
        self.kind = kind
        self.name = DESTINATIONS[kind]
        self.environ = environ
        self._opener = urllib.request.build_opener(NoRedirect)

    def send(self, key: str, payload: bytes) -> None:
        try:
            data = json.loads(payload)
            step = _Step(
                int(data["request_id"]),
                str(data["step"]),
                ActionSpec.model_validate(data["action"]),
                dict(data["alert"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise DeliveryError(f"not an action: {shown(str(error))[:200]}", final=True) from None
        if self.book.step_done(step.request_id, step.step):
            return  # recorded done before a crash kept the delivery from being marked
        values = alert_values(step.alert, step.action.id)
        summary = ""
        try:
            if step.action.kind == "block":
                self._block(step, values)
                return
            if step.action.kind == "http":
                summary, status = self._http(step, values, key)
            else:
                summary, status = self._command(step, values)
        except ActionSpecError as error:
            self.book.record_failure(step.request_id, step.step, summary, str(error),
                                     answered=True)  # fmt: skip
            # The same alert makes the same request every time: no attempt can succeed,
            # unless what is missing is this machine's (a variable set at the next start).
            setup = isinstance(error, ActionSetupError)
            raise DeliveryError(str(error), refused=setup, final=not setup) from None
        except DeliveryError as error:
            self.book.record_failure(
                step.request_id, step.step, summary, str(error), answered=error.refused
            )
            raise
        self.book.record_done(step.request_id, step.step, summary, status, step.action.undo_after())

    def given_up(self, deliveries: Sequence[Delivery]) -> None:
        """The outbox gave up on these (see ActionBook.record_given_up)."""
        for delivery in deliveries:
            try:
                data = json.loads(delivery.payload)
                request_id, step = int(data["request_id"]), str(data["step"])
            except (ValueError, KeyError, TypeError):
                continue  # not a step of ours: nothing to record
            self.book.record_given_up(
                request_id, step, delivery.last_error or "given up: never delivered"
            )

    def _section(self, step: _Step) -> Any:
        action = step.action
        if step.step == "undo":
            return None if action.undo is None else (action.undo.http or action.undo.command)
        return action.http or action.command

    def _http(self, step: _Step, values: Mapping[str, str], key: str) -> tuple[str, str]:
        section = self._section(step)
        if section is None:
            return "nothing to undo", "done"
        request = render_http(section, values, self.environ)
        if step.action.dry_run:
            return request.summary, "dry run: not sent"
        status = send_http(
            self._opener,
            request.method,
            request.url,
            request.body,
            request.headers,
            key,
            request.timeout_s,
        )
        return request.summary, f"HTTP {status}"

    def _command(self, step: _Step, values: Mapping[str, str]) -> tuple[str, str]:
        section = self._section(step)
        if section is None:
            return "nothing to undo", "done"
        command = render_command(section, values, self.environ)
        if step.action.dry_run:
            return command.summary, "dry run: not run"
        stdin = json.dumps({**step.alert, "action_id": step.action.id, "step": step.step})
        try:
            finished = subprocess.run(
                command.argv,
                input=stdin.encode("utf-8"),
                capture_output=True,
                timeout=command.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"timed out after {command.timeout_s:g} s", refused=True) from None
        except OSError as error:
            raise DeliveryError(shown(error.strerror or str(error)), refused=True) from None
        if finished.returncode != 0:
            said = shown(finished.stderr.decode("utf-8", "replace").strip()[-200:])
            raise DeliveryError(f"exit {finished.returncode}: {said}", refused=True)
        return command.summary, "exit 0"

    def _block(self, step: _Step, values: Mapping[str, str]) -> None:
        action = step.action
        assert action.block is not None
        entity = render(action.block.entity, values, str)
        if not entity.strip() or any(ord(c) < 32 or ord(c) == 127 for c in entity):
            # As `blocklist add` refuses it: no switch's list holds such an entry, and
            # its export could only write it escaped, as another value.
            raise ActionSpecError(
                f"a block needs a number or menu id without control characters, not "
                f"'{shown(entity)}'"
            )
        entity_type = str(step.alert.get("entity_type", ""))
        reason = render(action.block.reason, values, str)
        if step.step == "do":
            summary = f"block {entity_type} {entity} for {_duration(action.block.expire_after)}"
        else:
            summary = f"lift the block of {entity_type} {entity}"
        if action.dry_run:
            self.book.record_done(
                step.request_id, step.step, summary, "dry run: blocklist unchanged",
                action.undo_after(),
            )  # fmt: skip
            return

        expire_after = action.block.expire_after

        def change(db: sqlite3.Connection, now: float) -> None:
            if step.step == "do":
                write_block(db, entity_type, entity, now, now + expire_after, reason,
                       f"action {action.id}", action.id, str(step.alert["alert_id"]))  # fmt: skip
            else:
                # Only the entry this action made: a later one (a manual add) stays.
                lift_block(db, entity_type, entity, action.id, str(step.alert["alert_id"]))

        status = "blocked" if step.step == "do" else "lifted"
        self.book.record_done(step.request_id, step.step, summary, status, action.undo_after(),
                              also=change)  # fmt: skip


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def action_destinations(book: ActionBook) -> list[ActionDestination]:
    return [ActionDestination(book, kind) for kind in DESTINATIONS]
