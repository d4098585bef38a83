"""The security team's side: alerts with their latest review, one alert's evidence,
and new reviews, written as files of their own (append-only: nothing is overwritten)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.lake.parquet import ASSIGNMENT_SCHEMA, REVIEW_SCHEMA, Lake, write_atomic
from engine.lake.review_status import status_named


class ReviewError(Exception):
    """The alert or the data dir is not what the command needs; the message says why."""


class ReviewValueError(ReviewError):
    """A review's status or note cannot be taken as given, whatever the alerts."""


def _lake(data_dir: Path) -> Lake:
    lake = Lake(data_dir)
    if not (lake.root / "alerts").is_dir():
        raise ReviewError(f"{data_dir} has no alerts yet (is it callsentry's data dir?)")
    return lake


def _query(lake: Lake, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """The lake's answer, or a ReviewError saying which data dir could not be read."""
    try:
        return lake.query(sql, params)
    except duckdb.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReviewError(
            f"cannot read the lake in {lake.data_dir} (is it callsentry's data dir?): {first}"
        ) from None


# The columns `list_alerts` gives, in order (the CLI's JSON and CSV keep it): every
# column of `alerts_current` but its partition (`day`).
LISTED = (
    "alert_id",
    "raised_at",
    "status",
    "severity",
    # The current level (critical once escalated), the level raised at, and the
    # escalation's event time and value (None: not escalated).
    "level",
    "raised_level",
    "escalated_at",
    "escalated_value",
    "rule_id",
    "rule_version",
    "detector",
    "entity_type",
    "entity",
    "window_start",
    "window_end",
    "value",
    "threshold",
    "summary",
    "evidence",
    "reviewer",
    "reviewed_at",
    "review_note",
    "assignee",
)


def list_alerts(
    data_dir: Path,
    status: str = "open",
    limit: int = 50,
    *,
    severities: Sequence[str] = (),
    rules: Sequence[str] = (),
    entities: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    assignees: Sequence[str] = (),
    levels: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Alerts with their latest review status, newest first: those with `status` (a
    status, an alias, or "all"), any of `severities`, `levels` (current: an escalated
    alert is critical), `rules`, `entities`, `assignees` (each empty: any), raised at or
    after `since` and before `until`."""
    if status != "all":
        try:
            status = status_named(status)
        except ValueError as error:
            raise ReviewError(str(error)) from None
    lake = _lake(data_dir)
    where: list[str] = []
    params: list[Any] = []
    if status != "all":
        where.append("status = ?")
        params.append(status)
    for column, values in (
        ("severity", severities),
        ("level", levels),
        ("rule_id", rules),
        ("entity", entities),
        ("assignee", assignees),
    ):
        if values:
            where.append(f"list_contains(?, {column})")
            params.append(list(values))
    if since is not None:
        where.append("raised_at >= ?")
        params.append(since)
    if until is not None:
        where.append("raised_at < ?")
        params.append(until)
    rows = _query(
        lake,
        f"SELECT {', '.join(LISTED)} FROM alerts_current "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} "
        f"ORDER BY raised_at DESC, alert_id LIMIT {max(0, int(limit))}",
        params,
    )
    return [dict(zip(LISTED, row, strict=True)) for row in rows]


def _find(lake: Lake, alert_id: str, *, whole: bool = False) -> tuple[Any, ...]:
    """The alert `alert_id` names: its whole id, or (unless `whole`) an unambiguous
    start of it."""
    rows = _query(
        lake,
        "SELECT alert_id, rule_id, rule_version, severity, entity_type, entity, window_start, "
        "window_end, raised_at, value, threshold, summary, evidence, status, level, "
        "raised_level FROM alerts_current WHERE starts_with(alert_id, ?)",
        [alert_id],
    )
    if not rows or not alert_id:
        raise ReviewError(f"no alert {alert_id!r}")
    # An id is matched as text: `%` and `_` are characters here, not LIKE's wildcards.
    exact = [row for row in rows if row[0] == alert_id]
    if exact:
        return exact[0]
    if whole:
        raise ReviewError(f"no alert {alert_id!r} (give its whole id)")
    if len(rows) > 1:
        raise ReviewError(f"{alert_id!r} matches {len(rows)} alerts; give more of the id")
    return rows[0]


def alert_subject(data_dir: Path, alert_id: str) -> dict[str, Any]:
    """What an alert (its id, or an unambiguous start of it) is about: its id, rule_id,
    detector, entity_type, entity, raised_at and latest review status."""
    lake = _lake(data_dir)
    full_id = _find(lake, alert_id)[0]
    keys = ("alert_id", "rule_id", "detector", "entity_type", "entity", "raised_at", "status")
    rows = _query(
        lake, f"SELECT {', '.join(keys)} FROM alerts_current WHERE alert_id = ?", [full_id]
    )
    return dict(zip(keys, rows[0], strict=True))


def show_alert(data_dir: Path, alert_id: str) -> list[str]:
    lake = _lake(data_dir)
    (
        full_id,
        rule_id,
        version,
        severity,
        entity_type,
        entity,
        start,
        end,
        raised,
        value,
        threshold,
        summary,
        evidence,
        status,
        level,
        raised_level,
    ) = _find(lake, alert_id)
    lines = [
        f"alert     {full_id}",
        f"rule      {rule_id} (version {version}), severity {severity}, status {status}",
        f"level     {level}" + (f" (raised at {raised_level})" if raised_level != level else ""),
        f"entity    {entity_type} {entity}",
        f"window    {start:%Y-%m-%d %H:%M:%S} .. {end:%H:%M:%S} UTC, raised {raised:%H:%M:%S}",
        f"value     {value:g} (threshold {threshold:g})",
        f"summary   {summary}",
        "escalations:",
    ]
    escalations = _query(
        lake,
        "SELECT escalated_at, level, value, threshold, summary FROM alert_escalations "
        "WHERE alert_id = ? ORDER BY escalated_at",
        [full_id],
    )
    lines += [
        f"  {at:%Y-%m-%d %H:%M:%S} UTC to {to}: value {got:g} (threshold {bar:g}): {text}"
        for at, to, got, bar, text in escalations
    ] or ["  none"]
    lines.append("reviews:")
    reviews = _query(
        lake,
        "SELECT reviewed_at, reviewer, status, note FROM alert_reviews WHERE alert_id = ? "
        "ORDER BY reviewed_at",
        [full_id],
    )
    lines += [f"  {at:%Y-%m-%d %H:%M} {who}: {st}: {note}" for at, who, st, note in reviews] or [
        "  none"
    ]
    calls = _query(
        lake,
        "SELECT call_id, started_at, caller, callee, forward, menu_id, outcome, ring_s, talk_s "
        "FROM calls WHERE list_contains(?, call_id) ORDER BY started_at",
        [list(evidence)],
    )
    lines.append(f"evidence: {len(evidence)} calls")
    for call_id, started, caller, callee, forward, menu, outcome, ring, talk in calls:
        ring_text = "-" if ring is None else f"{ring:.1f}"
        talk_text = "-" if talk is None else f"{talk:.1f}"
        lines.append(
            f"  {started:%H:%M:%S} {call_id} {caller} -> {callee}"
            f"{' fwd ' + forward if forward else ''} menu {menu} {outcome} "
            f"ring {ring_text}s talk {talk_text}s"
        )
    missing = len(evidence) - len(calls)
    if missing:
        lines.append(f"  ({missing} of them still in progress or not yet in the lake)")
    return lines


def full_alert_ids(lake: Lake, alert_ids: Sequence[str], *, whole: bool = False) -> list[str]:
    """The alerts `alert_ids` (ids or, unless `whole`, unambiguous prefixes) name, each
    once, in order; a ReviewError listing every id that names none or several."""
    if not alert_ids:
        raise ReviewError("name at least one alert")
    full_ids: list[str] = []
    problems: list[str] = []
    for alert_id in alert_ids:
        try:
            full_id = _find(lake, alert_id, whole=whole)[0]
        except ReviewError as error:
            problems.append(str(error))
            continue
        if full_id not in full_ids:
            full_ids.append(full_id)
    if problems:
        raise ReviewError(
            "; ".join(problems) + ("; nothing was recorded" if len(alert_ids) > 1 else "")
        )
    return full_ids


# A review's note: what was checked and found, in a few lines (every view of the alert
# shows it; the lake keeps every review).
MAX_NOTE_CHARS = 10_000


def add_review(data_dir: Path, alert_id: str, status: str, note: str, reviewer: str) -> str:
    return add_reviews(data_dir, [alert_id], status, note, reviewer)[0][1]


def add_reviews(
    data_dir: Path,
    alert_ids: Sequence[str],
    status: str,
    note: str,
    reviewer: str,
    *,
    whole: bool = False,
) -> list[tuple[str, str]]:
    """Record one verdict on several alerts (ids or, unless `whole`, unambiguous
    prefixes: a person types a start of an id, a program has the whole one) in one
    file: all of them or, when one id does not name an alert, none (the error lists
    each such id). Returns (alert_id, review_id) per alert, in the order given."""
    try:
        status = status_named(status)
    except ValueError as error:
        raise ReviewValueError(str(error)) from None
    if not note.strip():
        raise ReviewValueError("a review needs a note saying what was checked")
    if len(note.strip()) > MAX_NOTE_CHARS:
        raise ReviewValueError(
            f"the note has {len(note.strip()):,} characters; a review's note holds at most "
            f"{MAX_NOTE_CHARS:,} (put longer findings in a case and name it)"
        )
    lake = _lake(data_dir)
    full_ids = full_alert_ids(lake, alert_ids, whole=whole)
    now = datetime.now(tz=UTC)
    review_ids = [str(uuid.uuid4()) for _ in full_ids]
    frame = pl.DataFrame(
        {
            "review_id": review_ids,
            "alert_id": full_ids,
            "status": [status] * len(full_ids),
            "note": [note.strip()] * len(full_ids),
            "reviewer": [reviewer] * len(full_ids),
            "reviewed_at": [now] * len(full_ids),
        },
        schema=REVIEW_SCHEMA,
    )
    folder = lake.root / "alert_reviews" / f"day={now:%Y-%m-%d}"
    try:
        # One file for all of them: the reviews are recorded together or not at all.
        write_atomic(frame, folder / f"rev-{review_ids[0]}.parquet")
    except OSError as error:
        # A reviewer without write access to the lake, a full disk: nothing was recorded.
        reason = error.strerror or str(error)
        raise ReviewError(f"cannot record the review in {folder}: {reason}") from None
    return list(zip(full_ids, review_ids, strict=True))


def assign_alerts(
    data_dir: Path, alert_ids: Sequence[str], assignee: str, assigned_by: str
) -> list[str]:
    """Assign several alerts (whole ids: the console's) to `assignee` ("" hands them
    back to nobody) in one append-only file, all or none as `add_reviews`. Returns
    the alert ids."""
    lake = _lake(data_dir)
    full_ids = full_alert_ids(lake, alert_ids, whole=True)
    now = datetime.now(tz=UTC)
    ids = [str(uuid.uuid4()) for _ in full_ids]
    frame = pl.DataFrame(
        {
            "assignment_id": ids,
            "alert_id": full_ids,
            "assignee": [assignee] * len(full_ids),
            "assigned_by": [assigned_by] * len(full_ids),
            "assigned_at": [now] * len(full_ids),
        },
        schema=ASSIGNMENT_SCHEMA,
    )
    folder = lake.root / "alert_assignments" / f"day={now:%Y-%m-%d}"
    try:
        lake.prepare_table("alert_assignments")
        write_atomic(frame, folder / f"asg-{ids[0]}.parquet")
    except OSError as error:
        reason = error.strerror or str(error)
        raise ReviewError(f"cannot record the assignment in {folder}: {reason}") from None
    return full_ids
