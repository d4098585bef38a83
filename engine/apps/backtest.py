"""Backtest: what a changed rule set would have raised on stored history, beside
what the rules in use raise on the same events.

Both rule sets run from a fresh start over the same stored reports (the `events`
table, a day at a time, in the order they were stored, which is the order live
detection saw them, taken in parts of PART_ROWS), through the same pipeline as
`serve` and `replay`, in memory: nothing is written to the data dir, so a backtest
is safe beside a running engine. The reports are read once for both: where
replay's detection process can be forked (engine.apps.detectfork), the change's
rules run in it, on the machine's other core, while the rules in use run here.
A warm-up feeds both the history just before the span first, its alerts not
counted: windows, baselines, first-seen numbers and models then start the span
as live detection did, rather than empty (cold, a baseline rule cannot fire for
its first hours and every forward number is new).
An incident of one run is the same incident in the other when the rule, the
entity and the windows overlap; the rest were added or removed by the change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.apps.detectfork import DetectionProcess
from engine.apps.detectfork import available as detectfork_available
from engine.apps.detectors import make_pipeline
from engine.apps.replay import Progress
from engine.apps.settings import DetectionSettings
from engine.core.events import CallEvent, Reject
from engine.detect.alerts import Alert
from engine.detect.exceptionfiles import EntityException
from engine.ingest.eventfiles import PART_ROWS, read_frame_items
from engine.ingest.records import pack_events
from engine.lake.parquet import Lake

# As the README's export of `events` for replay: the switch's code where it sent one.
_STORED_EVENTS = (
    "SELECT ts, call_id, serial, coalesce(CAST(code AS VARCHAR), state) AS state, caller, "
    "callee, forward, menu_id, menu_name, switch FROM events "
    "WHERE ts >= to_timestamp(?) AND ts < to_timestamp(?) ORDER BY seq"
)


def raised(alerts: list[Alert]) -> list[Alert]:
    """The alerts raised, without escalations (the same alerts reaching critical): a
    backtest compares which alerts each rule set raises."""
    return [alert for alert in alerts if not alert.escalation]


class BacktestError(Exception):
    """The data dir or the span cannot be backtested; the message says why."""


@dataclass
class RuleChange:
    rule_id: str
    current: int = 0
    candidate: int = 0
    added: list[Alert] = field(default_factory=list)
    removed: list[Alert] = field(default_factory=list)
    # Incidents both raise, at another moment: (the alert of the rules in use, the
    # change's); the change raises it earlier when the second is raised first.
    moved: list[tuple[Alert, Alert]] = field(default_factory=list)

    @property
    def earlier(self) -> list[tuple[Alert, Alert]]:
        return [(old, new) for old, new in self.moved if new.raised_at < old.raised_at]

    @property
    def later(self) -> list[tuple[Alert, Alert]]:
        return [(old, new) for old, new in self.moved if new.raised_at > old.raised_at]


@dataclass
class BacktestReport:
    since: float
    until: float
    events: int = 0
    warmup_s: float = 0.0
    # Stored reports fed before the span (their alerts are not counted).
    warmup_events: int = 0
    current: list[Alert] = field(default_factory=list)
    candidate: list[Alert] = field(default_factory=list)
    rules: list[RuleChange] = field(default_factory=list)
    # The team's latest verdict (alerts_current.status) on alerts of the rules in use
    # that the data dir holds (live detection raised them: the ids are the same).
    verdicts: dict[str, str] = field(default_factory=dict)
    # Removed alerts an exception file of the change holds back: alert id -> exception.
    excepted: dict[str, EntityException] = field(default_factory=dict)

    @property
    def added(self) -> list[Alert]:
        return [alert for change in self.rules for alert in change.added]

    @property
    def removed(self) -> list[Alert]:
        return [alert for change in self.rules for alert in change.removed]

    @property
    def moved(self) -> list[tuple[Alert, Alert]]:
        return [pair for change in self.rules for pair in change.moved]

    def removed_by_verdict(self) -> dict[str, int]:
        """How many of the removed alerts the team had reviewed, by verdict (`open`
        for those never reviewed, `not stored` for those the data dir does not hold)."""
        counts: dict[str, int] = defaultdict(int)
        for alert in self.removed:
            counts[self.verdicts.get(alert.alert_id, "not stored")] += 1
        return dict(counts)


def parse_time(text: str, option: str) -> float:
    """An ISO-8601 date or time (UTC unless it says otherwise) as epoch seconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BacktestError(
            f"{option} {text!r}: not an ISO-8601 date or time (e.g. 2026-11-30 or "
            "2026-11-30T08:00:00+08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def stored_span(data_dir: Path) -> tuple[float, float]:
    """Event times of the first and last stored report."""
    lake = _lake(data_dir)
    first, last = lake.query("SELECT epoch_us(min(ts)) / 1e6, epoch_us(max(ts)) / 1e6 FROM events")[
        0
    ]
    if first is None:
        raise BacktestError(f"{data_dir} holds no events to backtest on")
    return float(first), float(last)


def backtest(
    data_dir: Path,
    candidate_dir: Path,
    current_dir: Path,
    detection: DetectionSettings,
    since: float,
    until: float,
    warmup_s: float = 0.0,
    *,
    fork: bool | None = None,
    progress: Progress | None = None,
) -> BacktestReport:
    """Raises YamlFileError (either rule set invalid) or BacktestError. `warmup_s`:
    this much stored history before `since` is fed to both first, its alerts not
    counted (an incident alerted then stays suppressed into the span, as live).
    `fork`: run the change's rules in a forked process (default: where available);
    the alerts are the same either way. `progress`: told of the reports fed."""
    if until <= since:
        raise BacktestError("the span is empty: --until must be later than --since")
    if warmup_s < 0:
        raise BacktestError(f"the warm-up ({warmup_s:g} s) must not be negative")
    current = make_pipeline(detection, current_dir)
    candidate = make_pipeline(detection, candidate_dir)
    report = BacktestReport(since, until, warmup_s=warmup_s)
    lake = _lake(data_dir)
    if fork is None:
        fork = detectfork_available()
    # The change's rules, here or in a process of their own: a step (reports, or event
    # time moving on) and whether its alerts count; its alerts come back in order.
    forked = DetectionProcess(candidate, None) if fork else None
    # Steps handed to the forked process and not answered yet: whether each counts.
    counted: list[bool] = []
    fed = 0

    def answers(keep: int) -> None:
        assert forked is not None
        while len(counted) > keep:
            _, alerts = forked.result()
            if counted.pop(0):
                report.candidate.extend(raised(alerts))

    def both(items: list[CallEvent | Reject] | float, count: bool) -> None:
        nonlocal fed
        if forked is not None:
            forked.submit([(0, pack_events(items))] if isinstance(items, list) else [items])
            counted.append(count)
        if isinstance(items, list):
            current_alerts = current.feed(items).alerts
            fed += len(items)
            if progress is not None:
                progress.at(fed, len(report.current))
        else:
            current_alerts = current.advance(items).alerts
        if count:
            report.current.extend(raised(current_alerts))
        if forked is None:
            candidate_alerts = (
                candidate.feed(items) if isinstance(items, list) else candidate.advance(items)
            ).alerts
            if count:
                report.candidate.extend(raised(candidate_alerts))
        else:
            # One step answered behind: the other process works on the next meanwhile.
            answers(1)

    try:
        if warmup_s:
            for items in _stored_items(lake, since - warmup_s, since):
                report.warmup_events += len(items)
                both(items, False)
        for items in _stored_items(lake, since, until):
            report.events += len(items)
            both(items, True)
        # As at the end of a replay: event time past the span, so what ended in it is
        # judged.
        both(until + detection.settle_s, True)
        if forked is not None:
            forked.finish()
            answers(0)
    finally:
        if forked is not None:
            forked.close()
        if progress is not None:
            progress.close()
    report.rules = compare(report.current, report.candidate)
    report.verdicts = _verdicts(lake, [alert.alert_id for alert in report.current])
    for alert in report.removed:
        exception = candidate.rules.exception_for(alert.rule_id, alert.entity, alert.raised_at)
        if exception is not None:
            report.excepted[alert.alert_id] = exception
    return report


def _verdicts(lake: Lake, alert_ids: list[str]) -> dict[str, str]:
    if not alert_ids or not (lake.root / "alerts").is_dir():
        return {}
    with duckdb.connect() as con:
        lake.create_views(con)
        rows = con.execute(
            "SELECT alert_id, status FROM alerts_current WHERE list_contains(?, alert_id)",
            [alert_ids],
        ).fetchall()
    return {alert_id: status for alert_id, status in rows}


def compare(current: list[Alert], candidate: list[Alert]) -> list[RuleChange]:
    """Per rule: each candidate alert is the same incident as an unmatched current one
    of the same rule and entity whose window overlaps it, or else it was added; the
    current alerts left unmatched were removed."""
    changes: dict[str, RuleChange] = {}
    waiting: dict[tuple[str, str, str], list[Alert]] = defaultdict(list)
    for alert in sorted(current, key=lambda a: a.raised_at):
        changes.setdefault(alert.rule_id, RuleChange(alert.rule_id)).current += 1
        waiting[(alert.rule_id, alert.entity_type, alert.entity)].append(alert)
    for alert in sorted(candidate, key=lambda a: a.raised_at):
        change = changes.setdefault(alert.rule_id, RuleChange(alert.rule_id))
        change.candidate += 1
        same = waiting[(alert.rule_id, alert.entity_type, alert.entity)]
        match = next((old for old in same if _overlap(old, alert)), None)
        if match is None:
            change.added.append(alert)
        else:
            same.remove(match)
            if match.raised_at != alert.raised_at:
                change.moved.append((match, alert))
    for left in waiting.values():
        for alert in left:
            changes[alert.rule_id].removed.append(alert)
    return sorted(changes.values(), key=lambda change: change.rule_id)


def _overlap(a: Alert, b: Alert) -> bool:
    return a.window_start <= b.window_end and b.window_start <= a.window_end


def _lake(data_dir: Path) -> Lake:
    lake = Lake(data_dir)
    if not (lake.root / "events").is_dir():
        raise BacktestError(f"{data_dir} has no events table (is it callsentry's data dir?)")
    return lake


def stored_count(data_dir: Path, since: float, until: float) -> int:
    """How many reports are stored in [since, until) (for a progress bar)."""
    rows = _lake(data_dir).query(
        "SELECT count(*) FROM events WHERE ts >= to_timestamp(?) AND ts < to_timestamp(?)",
        [since, until],
    )
    return int(rows[0][0])


def _stored_items(lake: Lake, since: float, until: float) -> Iterator[list[CallEvent | Reject]]:
    """The stored reports in [since, until), a day at a time in the order they were
    stored, in parts of at most PART_ROWS: what is held is a part's rows (and DuckDB's
    columns of a day while it sorts them), however long the span. The days read are
    those from the first stored report in the span to the last: a span back to the
    year 1 reads no empty day, and starts from no time Python's dates cannot hold."""
    with duckdb.connect() as con:
        lake.create_views(con)
        first, last = con.sql(_STORED_SPAN, params=[since, until]).fetchall()[0]
        if first is None:
            return
        # From the midnight before the first (not the first itself: a time read back
        # through a float could fall a microsecond after it), as a span from then would.
        start = max(since, _midnight_before(float(first)))
        while start < until and start <= last:
            end = min(until, _next_midnight(start))
            # (duckdb's type stubs do not list a reader's batches as typed.)
            batches: Any = con.sql(_STORED_EVENTS, params=[start, end]).to_arrow_reader(PART_ROWS)
            for batch in batches:
                frame = pl.from_arrow(batch)
                assert isinstance(frame, pl.DataFrame)
                if len(frame):
                    yield read_frame_items(frame, "events")
            start = end


# The first and last stored report in [since, until), as epoch seconds.
_STORED_SPAN = (
    "SELECT epoch_us(min(ts)) / 1e6, epoch_us(max(ts)) / 1e6 FROM events "
    "WHERE ts >= to_timestamp(?) AND ts < to_timestamp(?)"
)


def _midnight_before(ts: float) -> float:
    day = datetime.fromtimestamp(ts, tz=UTC).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _next_midnight(ts: float) -> float:
    # A UTC day is 86,400 epoch seconds (epoch time has no leap seconds).
    return _midnight_before(ts) + 86_400.0
