"""`callsentry blocklist`: callsentry's own blocklist (block actions put entities on
it, with an expiry), listed, edited by hand and exported for loading into the switch
or a SIP proxy. Its state is engine.alerts.blocklist (in the actions' outbox file,
engine.alerts.actionbook); this module only reads the arguments and prints."""

from __future__ import annotations

import csv
import io
import json
import sys
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
from engine.core.text import csv_cell, shown

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
            "added_at": utc_iso(e.added_at),
            "expires_at": utc_iso(e.expires_at),
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
    entries = _entries(data_dir_or_fail(data_dir, config), include_expired)
    if not entries:
        click.echo("the blocklist is empty")
        return
    echo_table(
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
    data = data_dir_or_fail(data_dir, config, writes=True)
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
    until = "for good" if expires_at is None else f"until {utc_time(expires_at)} UTC"
    if was:
        # The entry is replaced whole, a shorter block too: said, not silent.
        before = "for good" if previous is None else f"until {utc_time(previous)} UTC"
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

    data = data_dir_or_fail(data_dir, config)
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
    entries = _entries(data_dir_or_fail(data_dir, config), False)
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
