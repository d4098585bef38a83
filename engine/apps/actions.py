"""`callsentry actions`: the requests actions made, their trail, approving them. What
they do is in engine.alerts.actions, their state in engine.alerts.actionbook; this
module only reads the arguments and prints (`callsentry blocklist` is
engine.apps.blocklist_commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from engine.apps.commandline import (
    config_option,
    data_dir_option,
    data_dir_or_fail,
    echo_table,
    fail,
    reviewer_or_fail,
    utc_iso,
    utc_time,
)
from engine.core.text import shown

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

    data = data_dir_or_fail(data_dir, config)
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
                        "created_at": utc_iso(r.created_at),
                        "approved_by": r.approved_by,
                        "done_at": utc_iso(r.done_at),
                        "undo_at": utc_iso(r.undo_at),
                        "last_error": r.last_error,
                    },
                    ensure_ascii=False,
                )
            )
        return
    if not requests:
        click.echo("no action requests" + ("" if state == "all" else f" {state}"))
        return
    echo_table(
        [
            (
                str(r.id),
                r.action_id,
                r.state + (f" ({r.hold})" if r.state == "pending" else ""),
                r.mode + (" dry-run" if r.dry_run else ""),
                f"{r.entity_type} {r.entity}",
                utc_time(r.created_at),
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

    data = data_dir_or_fail(data_dir, config)
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
        f"decided   {utc_time(r.created_at)} UTC",
    ]
    if r.approved_by:
        lines.append(f"approved  {utc_time(r.approved_at)} UTC by {r.approved_by}")
    if r.done_at is not None:
        lines.append(f"done      {utc_time(r.done_at)} UTC")
    if r.undo_at is not None:
        # A dry run rehearses its undo too: logged then, nothing sent.
        lines.append(f"undo due  {utc_time(r.undo_at)} UTC" + (" (dry run)" if r.dry_run else ""))
    if r.undone_at is not None:
        lines.append(f"undone    {utc_time(r.undone_at)} UTC")
    if r.last_error:
        lines.append(f"error     {r.last_error}")
    if r.state == "pending":
        lines.append(f"approve:  callsentry actions approve {r.id} --reviewer NAME")
    lines.append("trail:")
    for row in trail:
        who = f" by {row['reviewer']}" if row["reviewer"] else ""
        said = " -> ".join(str(row[k]) for k in ("request", "status") if row[k])
        said = f": {said}" if said else ""
        lines.append(f"  {utc_time(row['recorded_at'])} {row['step']} {row['event']}{who}{said}")
    for line in lines:
        click.echo(shown(line))


def _decision(
    verb: str, request_id: int, reviewer: str, data_dir: Path | None, config: Path | None
) -> None:
    from engine.alerts import actionbook as acting

    data = data_dir_or_fail(data_dir, config)
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
