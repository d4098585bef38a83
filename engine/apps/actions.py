"""`callsentry actions` (the requests actions made, their trail, approving them) and
`callsentry blocklist` (callsentry's own blocklist, for loading into the switch or a
SIP proxy). What they do is in engine.alerts.actions, their state in
engine.alerts.actionbook and engine.alerts.blocklist; this module only reads the
arguments and prints."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from engine.apps.commandline import (
    config_option,
    data_dir_option,
    existing_data_dir,
    fail,
    reviewer_or_fail,
    settings_or_fail,
)
from engine.core.text import csv_cell, shown, terminal_table

_STATES = ("pending", "queued", "done", "undo_queued", "undone", "rejected")


class RequestNumber(click.ParamType[int]):
    """An action request's number: the ID column of `actions list` (1, 2, ...)."""

    name = "request_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.isascii() and text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(
            f"'{shown(text)}' is not a request number (the ID column of `actions list`: 1, 2, ...)",
            param,
            ctx,
        )


REQUEST_ID = RequestNumber()


def _data_dir(data_dir: Path | None, config: Path | None, *, writes: bool = False) -> Path:
    """The data dir the options or settings name. `writes`: the command may make the
    outbox there, so a folder serve or replay has not made a lake in (a mistyped
    --data-dir, a checkout's data/) is refused: an engine would never see the entry."""
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    return existing_data_dir(settings, with_lake=writes)


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC).isoformat()


def _table(rows: Sequence[Sequence[str]], titles: Sequence[str]) -> None:
    for line in terminal_table([[str(cell) for cell in row] for row in rows], titles):
        click.echo(line)


@click.group()
def actions() -> None:
    """Actions on alerts (rules/actions/*.yaml): what they requested, their trail, and
    approving what waits for a reviewer."""


@actions.command("list")
@click.option(
    "--state",
    type=click.Choice([*_STATES, "all"]),
    default="all",
    show_default=True,
    help="pending: waiting for a reviewer (approve mode, or past the budget).",
)
@click.option("--action", "action_id", default=None, help="Only this action's requests.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--format", "file_format", type=click.Choice(["table", "json"]), default="table")
@data_dir_option
@config_option
def actions_list(
    state: str,
    action_id: str | None,
    limit: int,
    file_format: str,
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Action requests, newest first: one per action and alert."""
    from engine.alerts.actionbook import ActionError, NoActions, open_book
    from engine.alerts.outbox import OutboxError

    data = _data_dir(data_dir, config)
    try:
        book = open_book(data)
        try:
            requests = book.requests(() if state == "all" else (state,), action_id, limit)
        finally:
            book.close()
    except NoActions as error:
        click.echo(str(error))
        return
    except (ActionError, OutboxError) as error:
        fail(str(error))
    if file_format == "json":
        for r in requests:
            click.echo(
                json.dumps(
                    {
                        "id": r.id,
                        "action_id": r.action_id,
                        "state": r.state,
                        "hold": r.hold,
                        "mode": r.mode,
                        "dry_run": r.dry_run,
                        "kind": r.kind,
                        "entity_type": r.entity_type,
                        "entity": r.entity,
                        "alert_id": r.alert_id,
                        "rule_id": r.rule_id,
                        "created_at": _iso(r.created_at),
                        "approved_by": r.approved_by,
                        "done_at": _iso(r.done_at),
                        "undo_at": _iso(r.undo_at),
                        "last_error": r.last_error,
                    },
                    ensure_ascii=False,
                )
            )
        return
    if not requests:
        click.echo("no action requests" + ("" if state == "all" else f" {state}"))
        return
    _table(
        [
            (
                str(r.id),
                r.action_id,
                r.state + (f" ({r.hold})" if r.state == "pending" else ""),
                r.mode + (" dry-run" if r.dry_run else ""),
                f"{r.entity_type} {r.entity}",
                _time(r.created_at),
                r.approved_by or "-",
                r.alert_id,
                r.last_error or "-",
            )
            for r in requests
        ],
        (
            "ID",
            "ACTION",
            "STATE",
            "MODE",
            "ENTITY",
            "DECIDED (UTC)",
            "APPROVED BY",
            "ALERT",
            "LAST ERROR",
        ),
    )


@actions.command("show")
@click.argument("request_id", type=REQUEST_ID)
@data_dir_option
@config_option
def actions_show(request_id: int, data_dir: Path | None, config: Path | None) -> None:
    """One action request: what it is for, its state, and its trail."""
    from engine.alerts.actionbook import ActionError, open_book
    from engine.alerts.outbox import OutboxError

    data = _data_dir(data_dir, config)
    try:
        book = open_book(data)
        try:
            r = book.request(request_id)
            trail = book.trail(request_id)
        finally:
            book.close()
    except (ActionError, OutboxError) as error:
        fail(str(error))
    lines = [
        f"request   {r.id}  ({r.key})",
        f"action    {r.action_id}: {r.kind}, {r.mode}{', dry run' if r.dry_run else ''}",
        f"alert     {r.alert_id} (rule {r.rule_id}, {r.severity})",
        f"entity    {r.entity_type} {r.entity}",
        f"state     {r.state}" + (f" ({r.hold})" if r.state == "pending" else ""),
        f"decided   {_time(r.created_at)} UTC",
    ]
    if r.approved_by:
        lines.append(f"approved  {_time(r.approved_at)} UTC by {r.approved_by}")
    if r.done_at is not None:
        lines.append(f"done      {_time(r.done_at)} UTC")
    if r.undo_at is not None:
        # A dry run rehearses its undo too: logged then, nothing sent.
        lines.append(f"undo due  {_time(r.undo_at)} UTC" + (" (dry run)" if r.dry_run else ""))
    if r.undone_at is not None:
        lines.append(f"undone    {_time(r.undone_at)} UTC")
    if r.last_error:
        lines.append(f"error     {r.last_error}")
    if r.state == "pending":
        lines.append(f"approve:  callsentry actions approve {r.id} --reviewer NAME")
    lines.append("trail:")
    for row in trail:
        who = f" by {row['reviewer']}" if row["reviewer"] else ""
        said = " -> ".join(str(row[k]) for k in ("request", "status") if row[k])
        said = f": {said}" if said else ""
        lines.append(f"  {_time(row['recorded_at'])} {row['step']} {row['event']}{who}{said}")
    for line in lines:
        click.echo(shown(line))


def _decision(
    verb: str, request_id: int, reviewer: str, data_dir: Path | None, config: Path | None
) -> None:
    from engine.alerts import actionbook as acting

    data = _data_dir(data_dir, config)
    do = {"approve": acting.approve, "reject": acting.reject, "lift": acting.lift}[verb]
    try:
        request = do(data, request_id, reviewer_or_fail(reviewer))
    except acting.ActionError as error:
        fail(str(error))
    said = {
        "approve": "approved: queued, a running serve does it",
        "reject": "rejected: it will not be done",
        "lift": _lifted(request),
    }[verb]
    click.echo(
        shown(
            f"request {request.id} ({request.action_id} on {request.entity_type} "
            f"{request.entity}) {said}"
        )
    )


def _lifted(request: Any) -> str:
    if request.kind == "block":
        return "lifted: a running serve takes it off the blocklist now"
    if request.undo_at is None and not _has_undo(request.payload):
        return "lifted: the action has no undo, so nothing is undone (the trail says so)"
    return "lifted: its undo is queued, a running serve makes it"


def _has_undo(payload: bytes) -> bool:
    try:
        return bool(json.loads(payload)["action"].get("undo"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return True  # say what is usual rather than guess from an unreadable payload


reviewer_option = click.option("--reviewer", required=True, help="Who decides (recorded).")


@actions.command("approve")
@click.argument("request_id", type=REQUEST_ID)
@reviewer_option
@data_dir_option
@config_option
def actions_approve(
    request_id: int, reviewer: str, data_dir: Path | None, config: Path | None
) -> None:
    """Approve a pending request (approve mode, or held by its budget): it is queued."""
    _decision("approve", request_id, reviewer, data_dir, config)


@actions.command("reject")
@click.argument("request_id", type=REQUEST_ID)
@reviewer_option
@data_dir_option
@config_option
def actions_reject(
    request_id: int, reviewer: str, data_dir: Path | None, config: Path | None
) -> None:
    """Reject a pending request: it is never done."""
    _decision("reject", request_id, reviewer, data_dir, config)


@actions.command("lift")
@click.argument("request_id", type=REQUEST_ID)
@reviewer_option
@data_dir_option
@config_option
def actions_lift(
    request_id: int, reviewer: str, data_dir: Path | None, config: Path | None
) -> None:
    """Undo a done action now (a block lifted early) instead of when it expires."""
    _decision("lift", request_id, reviewer, data_dir, config)


# -- the blocklist --------------------------------------------------------------------

_ENTITY_TYPES = ("caller", "callee", "forward", "menu")
_BLOCK_COLUMNS = ("entity_type", "entity", "added_at", "expires_at", "reason", "added_by",
                  "action_id", "alert_id")  # fmt: skip


@click.group()
def blocklist() -> None:
    """callsentry's own blocklist (block actions put entities on it, with an expiry);
    export it for the switch or a SIP proxy."""


def _entries(data: Path, include_expired: bool) -> list[dict[str, Any]]:
    from engine.alerts.actionbook import ActionError, NoActions, open_book
    from engine.alerts.outbox import OutboxError

    try:
        book = open_book(data)
    except NoActions:
        return []  # nothing was ever blocked here
    except ActionError as error:
        fail(str(error))
    try:
        entries = book.blocklist.entries(include_expired=include_expired)
    except OutboxError as error:
        fail(str(error))
    finally:
        book.close()
    return [
        {
            "entity_type": e.entity_type,
            "entity": e.entity,
            "added_at": _iso(e.added_at),
            "expires_at": _iso(e.expires_at),
            "reason": e.reason,
            "added_by": e.added_by,
            "action_id": e.action_id,
            "alert_id": e.alert_id,
        }
        for e in entries
    ]


def _write(entries: list[dict[str, Any]], file_format: str, out: Any) -> None:
    if file_format == "json":
        for entry in entries:
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_BLOCK_COLUMNS)
    for entry in entries:
        writer.writerow([csv_cell(str(entry[k] or "")) for k in _BLOCK_COLUMNS])


@blocklist.command("list")
@click.option("--all", "include_expired", is_flag=True, help="Expired entries too.")
@data_dir_option
@config_option
def blocklist_list(include_expired: bool, data_dir: Path | None, config: Path | None) -> None:
    """What is blocked now."""
    entries = _entries(_data_dir(data_dir, config), include_expired)
    if not entries:
        click.echo("the blocklist is empty")
        return
    _table(
        [
            (
                e["entity_type"],
                e["entity"],
                (e["expires_at"] or "never")[:19].replace("T", " "),
                e["added_by"],
                e["reason"],
            )
            for e in entries
        ],
        ("TYPE", "ENTITY", "EXPIRES (UTC)", "ADDED BY", "REASON"),
    )


@blocklist.command("add")
@click.argument("entity")
@click.option("--type", "entity_type", type=click.Choice(_ENTITY_TYPES), required=True)
@click.option("--expire", default="24h", show_default=True, help="How long (e.g. 2h, 7d; never).")
@click.option("--reason", default="", help="Why (kept with the entry).")
@click.option("--reviewer", required=True, help="Who adds it (recorded).")
@data_dir_option
@config_option
def blocklist_add(
    entity: str,
    entity_type: str,
    expire: str,
    reason: str,
    reviewer: str,
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Put ENTITY on the blocklist by hand."""
    import time

    from engine.alerts.actionbook import ActionBook
    from engine.alerts.outbox import OutboxError
    from engine.core.durations import parse_duration

    if not entity.strip():
        fail("ENTITY is empty: give a number or menu id", 2)
    if any(ord(c) < 32 for c in entity):
        fail("ENTITY: give a number or menu id without control characters", 2)
    expires_at = None
    if expire.strip().lower() != "never":
        try:
            seconds = parse_duration(expire)
        except ValueError as error:
            fail(f"--expire: {error}", 2)
        if seconds <= 0:
            fail("--expire: give a duration longer than 0 (or never)", 2)
        expires_at = time.time() + seconds
    data = _data_dir(data_dir, config, writes=True)
    try:
        book = ActionBook.of(data)
        try:
            was, previous = book.blocklist.block(
                entity_type, entity, expires_at, reason, reviewer_or_fail(reviewer)
            )
        finally:
            book.close()
    except OutboxError as error:
        fail(str(error))
    until = "for good" if expires_at is None else f"until {_time(expires_at)} UTC"
    if was:
        # The entry is replaced whole, a shorter block too: said, not silent.
        before = "for good" if previous is None else f"until {_time(previous)} UTC"
        until += f" (it was blocked {before}; that entry is replaced)"
    click.echo(shown(f"{entity_type} {entity} blocked {until}"))


@blocklist.command("remove")
@click.argument("entity")
@click.option("--type", "entity_type", type=click.Choice(_ENTITY_TYPES), required=True)
@data_dir_option
@config_option
def blocklist_remove(
    entity: str, entity_type: str, data_dir: Path | None, config: Path | None
) -> None:
    """Take ENTITY off the blocklist."""
    from engine.alerts.actionbook import ActionError, NoActions, open_book
    from engine.alerts.outbox import OutboxError

    data = _data_dir(data_dir, config)
    try:
        book = open_book(data, read_only=False)
        try:
            removed = book.blocklist.unblock(entity_type, entity)
        finally:
            book.close()
    except NoActions:
        removed = False
    except (ActionError, OutboxError) as error:
        fail(str(error))
    if not removed:
        fail(shown(f"{entity_type} {entity} is not on the blocklist"))
    click.echo(shown(f"{entity_type} {entity} removed from the blocklist"))


@blocklist.command("export")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["csv", "json"]),
    default="csv",
    show_default=True,
    help="csv (spreadsheet-safe cells) or json (one per line).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write here (default: standard output).",
)
@data_dir_option
@config_option
def blocklist_export(
    file_format: str, output: Path | None, data_dir: Path | None, config: Path | None
) -> None:
    """What is blocked now, for loading into the switch or a SIP proxy."""
    entries = _entries(_data_dir(data_dir, config), False)
    if output is None:
        _write(entries, file_format, sys.stdout)
        return
    text = io.StringIO()
    _write(entries, file_format, text)
    try:
        output.write_text(text.getvalue(), encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    click.echo(f"{len(entries)} entries written to {output}", err=True)
