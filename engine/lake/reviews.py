"""The security team's side: alerts with their latest review, one alert's evidence,
and new reviews, written as files of their own (append-only: nothing is overwritten)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.lake.parquet import REVIEW_SCHEMA, Lake, write_atomic


class ReviewError(Exception):
    """The alert or the data dir is not what the command needs; the message says why."""


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


def list_alerts(data_dir: Path, status: str, limit: int) -> list[dict[str, Any]]:
    lake = _lake(data_dir)
    where = "" if status == "all" else "WHERE status = ?"
    params: list[Any] = [] if status == "all" else [status]
    rows = _query(
        lake,
        "SELECT alert_id, raised_at, status, severity, rule_id, summary FROM alerts_current "
        f"{where} ORDER BY raised_at DESC LIMIT {int(limit)}",
        params,
    )
    keys = ("alert_id", "raised_at", "status", "severity", "rule_id", "summary")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _find(lake: Lake, alert_id: str) -> tuple[Any, ...]:
    rows = _query(
        lake,
        "SELECT alert_id, rule_id, rule_version, severity, entity_type, entity, window_start, "
        "window_end, raised_at, value, threshold, summary, evidence, status "
        "FROM alerts_current WHERE alert_id = ? OR alert_id LIKE ? || '%'",
        [alert_id, alert_id],
    )
    if not rows:
        raise ReviewError(f"no alert {alert_id!r}")
    if len(rows) > 1:
        raise ReviewError(f"{alert_id!r} matches {len(rows)} alerts; give more of the id")
    return rows[0]


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
    ) = _find(lake, alert_id)
    lines = [
        f"alert     {full_id}",
        f"rule      {rule_id} (version {version}), severity {severity}, status {status}",
        f"entity    {entity_type} {entity}",
        f"window    {start:%Y-%m-%d %H:%M:%S} .. {end:%H:%M:%S} UTC, raised {raised:%H:%M:%S}",
        f"value     {value:g} (threshold {threshold:g})",
        f"summary   {summary}",
        "reviews:",
    ]
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


def add_review(data_dir: Path, alert_id: str, status: str, note: str, reviewer: str) -> str:
    lake = _lake(data_dir)
    full_id = _find(lake, alert_id)[0]
    if not note.strip():
        raise ReviewError("a review needs a note saying what was checked")
    now = datetime.now(tz=UTC)
    review_id = str(uuid.uuid4())
    frame = pl.DataFrame(
        {
            "review_id": [review_id],
            "alert_id": [full_id],
            "status": [status],
            "note": [note.strip()],
            "reviewer": [reviewer],
            "reviewed_at": [now],
        },
        schema=REVIEW_SCHEMA,
    )
    folder = lake.root / "alert_reviews" / f"day={now:%Y-%m-%d}"
    try:
        write_atomic(frame, folder / f"rev-{review_id}.parquet")
    except OSError as error:
        # A reviewer without write access to the lake, a full disk: nothing was recorded.
        reason = error.strerror or str(error)
        raise ReviewError(f"cannot record the review in {folder}: {reason}") from None
    return review_id
