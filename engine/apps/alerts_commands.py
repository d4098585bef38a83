"""`callsentry alerts`: list alerts, show one with its calls, record verdicts (append-only),
and list the outbox's deliveries."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.apps.commandline import (
    config_option,
    data_dir_option,
    existing_data_dir,
    fail,
    reviewer_or_fail,
    settings_or_fail,
)
from engine.core.text import shown, terminal_table

# Each command imports what it needs when it runs: `--help` and the small commands
# start without pydantic's models, asyncio or the store.
if TYPE_CHECKING:
    pass

log = logging.getLogger("callsentry")


@click.group()
def alerts() -> None:
    """Review alerts: list them, open one with its calls, record a verdict (append-only)."""


def _moment(text: str, option: str) -> datetime:
    """--since/--until: ISO-8601 (UTC unless it has an offset; a date alone is its
    midnight) or a duration before now (24h, 7d)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        from engine.core.durations import parse_duration

        try:
            return datetime.now(tz=UTC) - timedelta(seconds=parse_duration(text))
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is neither an ISO-8601 time (2026-12-05T10:00, UTC unless an "
                "offset is given) nor a duration before now (24h, 7d)",
                param_hint=option,
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _zone(text: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if text.strip().upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(
            f"{text!r} is not a time zone (an IANA name such as Asia/Shanghai, or UTC)",
            param_hint="--tz",
        ) from None


def _status_option(value: str, option: str, *, allow_all: bool) -> str:
    from engine.lake.review_status import status_named

    if allow_all and value.strip().lower() == "all":
        return "all"
    try:
        return status_named(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _cell_text(value: Any, zone: tzinfo) -> str:
    """A value as text for CSV and the table: times in `zone` with their zone's name."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)  # the evidence's ids
    return str(value)


def _json_value(value: Any, zone: tzinfo) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(zone).isoformat()
    return value


def _emit(
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    columns: list[tuple[str, str]],
    file_format: str,
    zone: tzinfo,
) -> None:
    """Rows as a table (engine.core.text.terminal_table: columns as wide as their widest
    cell, every cell through shown()),
    JSON lines (every key, times ISO-8601 with their offset) or CSV (a header row, every
    cell through csv_cell(): no spreadsheet formulas)."""
    if file_format == "json":
        for row in rows:
            data = {key: _json_value(row[key], zone) for key in keys}
            click.echo(json.dumps(data, ensure_ascii=False, default=str))
        return
    if file_format == "csv":
        import csv
        import io

        from engine.core.text import csv_cell

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(keys)
        for row in rows:
            writer.writerow(
                [
                    row[key]
                    if isinstance(row[key], int | float)
                    else csv_cell(_cell_text(row[key], zone))
                    for key in keys
                ]
            )
        click.echo(buffer.getvalue(), nl=False)
        return
    titles = [title for _, title in columns]
    cells = [[_cell_text(row[key], zone) for key, _ in columns] for row in rows]
    for line in terminal_table(cells, titles):
        click.echo(line)


format_option = click.option(
    "--format",
    "file_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table for people; json (one object per line) or csv (spreadsheet-safe) for tools.",
)
tz_option = click.option(
    "--tz",
    "zone_name",
    default="UTC",
    show_default=True,
    help="Time zone the times are shown in (an IANA name, e.g. Asia/Shanghai).",
)


@alerts.command("list")
@data_dir_option
@config_option
@click.option(
    "--status",
    default="open",
    show_default=True,
    help="open, investigating, confirmed, false_positive (or fp), closed, or all.",
)
@click.option(
    "--severity",
    "severities",
    multiple=True,
    type=click.Choice(["low", "medium", "high", "critical"]),
    help="Only this severity (repeatable).",
)
@click.option(
    "--level",
    "levels",
    multiple=True,
    type=click.Choice(["warning", "critical"]),
    help="Only alerts now at this level (an escalated alert is critical; repeatable).",
)
@click.option("--rule", "rules", multiple=True, help="Only this rule or model id (repeatable).")
@click.option(
    "--entity", "entities", multiple=True, help="Only this caller, menu, number (repeatable)."
)
@click.option(
    "--since",
    default=None,
    help="Raised at or after: ISO-8601 (UTC unless an offset is given) or a duration "
    "before now (24h, 7d).",
)
@click.option("--until", default=None, help="Raised before: as --since.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@format_option
@tz_option
def alerts_list(
    data_dir: Path | None,
    config: Path | None,
    status: str,
    severities: tuple[str, ...],
    levels: tuple[str, ...],
    rules: tuple[str, ...],
    entities: tuple[str, ...],
    since: str | None,
    until: str | None,
    limit: int,
    file_format: str,
    zone_name: str,
) -> None:
    """Alerts with their latest review status, newest first."""
    from engine.lake.reviews import LISTED, ReviewError, list_alerts

    status = _status_option(status, "--status", allow_all=True)
    start = _moment(since, "--since") if since else None
    end = _moment(until, "--until") if until else None
    if start is not None and end is not None and start >= end:
        # "No alerts match" answered a span that holds no time at all.
        fail("the span is empty: --until must be later than --since", 2)
    zone = _zone(zone_name)
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    existing_data_dir(settings)
    try:
        rows = list_alerts(
            settings.store.data_dir,
            status,
            limit,
            severities=severities,
            levels=levels,
            rules=rules,
            entities=entities,
            since=start,
            until=end,
        )
    except ReviewError as error:
        fail(str(error))
    if not rows and file_format == "table":
        filtered = severities or levels or rules or entities or since or until
        click.echo(
            (f"no {status} alerts" if status != "all" else "no alerts")
            + (" match" if filtered else "")
        )
        return
    zone_title = datetime.now(tz=zone).strftime("%Z")
    columns = [
        ("alert_id", "ALERT"),
        ("raised_at", f"RAISED ({zone_title})"),
        ("status", "STATUS"),
        ("severity", "SEVERITY"),
        ("level_shown", "LEVEL"),
        ("rule_id", "RULE"),
        ("entity", "ENTITY"),
        ("summary", "SUMMARY"),
    ]
    for row in rows:
        # In the table only: `escalated` is raised at warning, critical since.
        row["level_shown"] = "escalated" if row["escalated_at"] is not None else row["level"]
    _emit(rows, LISTED, columns, file_format, zone)
    if len(rows) == limit and file_format == "table":
        click.echo(f"(the newest {limit}; --limit shows more)", err=True)


@alerts.command("show")
@click.argument("alert_id")
@data_dir_option
@config_option
def alerts_show(alert_id: str, data_dir: Path | None, config: Path | None) -> None:
    """One alert, its review trail and the calls behind it."""
    from engine.lake.reviews import ReviewError, show_alert

    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    try:
        for line in show_alert(settings.store.data_dir, alert_id):
            click.echo(shown(line))
    except ReviewError as error:
        fail(str(error))


@alerts.command("review")
@click.argument("alert_ids", metavar="ALERT_ID...", nargs=-1, required=True)
@click.option(
    "--status",
    required=True,
    help="open, investigating, confirmed, false_positive (or fp), closed.",
)
@click.option("--note", required=True, help="Why: what was checked, what was found.")
@click.option("--reviewer", default=None, help="Who (default: the login name).")
@data_dir_option
@config_option
def alerts_review(
    alert_ids: tuple[str, ...],
    status: str,
    note: str,
    reviewer: str | None,
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Record a verdict on one or more alerts (ids, or unambiguous starts of them): all
    of them, or none when one is not found. Earlier reviews are kept; the latest counts."""
    from engine.lake.reviews import ReviewError, ReviewValueError, add_reviews

    status = _status_option(status, "--status", allow_all=False)
    who = reviewer_or_fail(reviewer)
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    try:
        recorded = add_reviews(settings.store.data_dir, alert_ids, status, note, who)
    except ReviewError as error:
        fail(str(error), 2 if isinstance(error, ReviewValueError) else 1)
    for alert_id, review_id in recorded:
        click.echo(f"review {review_id} recorded: {alert_id} is {status}")
    if settings.relay.nats.enabled:
        _publish_reviews(settings, recorded, status, note, who)


def _publish_reviews(
    settings: Any, recorded: list[tuple[str, str]], status: str, note: str, reviewer: str
) -> None:
    from engine.alerts.outbox import OutboxError
    from engine.apps.relay import queue_reviews

    try:
        queue_reviews(settings, recorded, status, note, reviewer)
    except OutboxError as error:
        fail(f"the review is recorded, but not queued for NATS: {error}")


@alerts.command("deliveries")
@data_dir_option
@config_option
@click.option(
    "--state",
    type=click.Choice(["given_up", "pending", "delivered", "all"]),
    default="given_up",
    show_default=True,
    help="given_up: what the outbox stopped trying (outbox.give_up_after_s).",
)
@click.option("--destination", default=None, help="Only this destination (e.g. webhook).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--retry",
    is_flag=True,
    help="Put the given-up deliveries back in the queue (a running serve sends them).",
)
@format_option
@tz_option
def alerts_deliveries(
    data_dir: Path | None,
    config: Path | None,
    state: str,
    destination: str | None,
    limit: int,
    retry: bool,
    file_format: str,
    zone_name: str,
) -> None:
    """What the outbox delivers (the webhook): by default what it gave up on, newest
    first, with the last error, and per destination how many were delivered, given up
    and are waiting."""
    from engine.alerts.outbox import STATES, Outbox, OutboxError, outbox_path

    zone = _zone(zone_name)
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    data = existing_data_dir(settings)
    if not outbox_path(data).exists():
        click.echo(f"no deliveries: {data} has no outbox (nothing was ever sent from it)")
        return
    try:
        outbox = Outbox.of(data, read_only=not retry)
        if retry:
            click.echo(f"{outbox.retry_given_up(destination)} given-up deliveries queued again")
            return
        states = STATES if state == "all" else (state,)
        listed = outbox.listing(states, destination, limit)
        counts = outbox.counts()
    except OutboxError as error:
        fail(str(error))
    if destination is not None and destination not in counts:
        from engine.apps.delivery import destination_names

        known = sorted({*counts, *destination_names(settings)})
        if destination not in known:
            # A typo answered "no deliveries" and exit 0: it looked like all was well.
            fail(
                f"--destination {destination!r} is no destination here (known: "
                f"{', '.join(known) or 'none yet'})",
                2,
            )
    rows = [
        {
            "destination": d.destination,
            "key": d.key,
            "state": d.state,
            "enqueued_at": datetime.fromtimestamp(d.enqueued_at, tz=UTC),
            "attempts": d.attempts,
            "done_at": None if d.done_at is None else datetime.fromtimestamp(d.done_at, tz=UTC),
            "error": d.last_error,
        }
        for d in listed
    ]
    zone_title = datetime.now(tz=zone).strftime("%Z")
    columns = [
        ("destination", "DESTINATION"),
        ("key", "KEY"),
        ("state", "STATE"),
        ("enqueued_at", f"ENQUEUED ({zone_title})"),
        ("attempts", "ATTEMPTS"),
        ("error", "LAST ERROR"),
    ]
    keys = ["destination", "key", "state", "enqueued_at", "attempts", "done_at", "error"]
    if file_format != "table":
        _emit(rows, keys, columns, file_format, zone)
        return
    if rows:
        _emit(rows, keys, columns, file_format, zone)
    else:
        which = "" if state == "all" else state.replace("_", " ") + " "
        click.echo(f"no {which}deliveries")
    for name, count in counts.items():
        if destination is None or name == destination:
            click.echo(
                f"{shown(name)}: now {count.pending} waiting, {count.given_up_now} given up; "
                f"in all {count.delivered} delivered, {count.given_up} given up (a "
                f"delivery retried counts each time), {count.failed} failed attempts"
            )


@alerts.command("except")
@click.argument("alert_id")
@click.option("--reason", required=True, help="Why this entity is no incident for this rule.")
@click.option(
    "--expires",
    default="90d",
    show_default=True,
    help="A duration from now (30d), a date (2027-03-05: through that day, UTC), a time "
    "(2027-03-05T12:00:00Z) or never.",
)
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The rules folder the file goes in (default: detection.rules_dir, the rules in use).",
)
@click.option("--reviewer", default=None, help="Who (default: the login name).")
@data_dir_option
@config_option
def alerts_except(
    alert_id: str,
    reason: str,
    expires: str,
    rules_dir: Path | None,
    reviewer: str | None,
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Turn a false positive into an exception: the alert's rule (or model) raises nothing
    for its entity until the exception expires. Writes a YAML file in the rules folder
    (rules/exceptions/) to review and commit, and records a false_positive review."""
    from engine.apps.excepting import ExceptError, ExceptOptionError, except_alert

    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    folder = rules_dir if rules_dir is not None else settings.detection.rules_folder
    if (
        rules_dir is None
        and settings.detection.rules_dir is None
        and folder.name == "shipped_rules"
    ):
        # An installed package's own copy: a file there is lost at the next upgrade and
        # is in nothing the team reviews and commits.
        fail(
            f"the rules in use are the ones shipped inside the package ({folder}); give "
            "--rules DIR or set detection.rules_dir to the team's own rules folder"
        )
    who = reviewer_or_fail(reviewer)
    try:
        made = except_alert(settings.store.data_dir, folder, alert_id, reason, expires, who)
    except ExceptError as error:
        lines = str(error).splitlines()
        for line in lines[1:]:
            click.echo(shown(line), err=True)
        # 2: what was asked cannot be taken as given; 1: the data or the rules refused.
        fail(
            lines[0] if lines else "the exception was not made",
            2 if isinstance(error, ExceptOptionError) else 1,
        )
    click.echo(
        f"exception written: {made.path}\n"
        f"  {made.source}, {made.entity_type} {shown(made.entity)}, until {made.expires}"
    )
    if made.review_id is not None:
        click.echo(f"review {made.review_id} recorded: {made.alert_id} is false_positive")
    click.echo(
        "review the file and commit it with the rules; a running serve applies it at its "
        "next reload of the rules folder"
    )
    if made.review_problem is not None:
        fail(f"the exception is written, but no review was recorded: {made.review_problem}")
