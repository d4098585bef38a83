"""The feed-silence check: the switch stopped reporting while traffic was expected.

A system alert, rule id `system.feed-silence`, raised through the same alert path as
the rules' (the alerts table, the sinks, the metrics by rule), when no report came
for `quiet_s` seconds of *event time* within the hours traffic is expected.

Event time, not the wall clock, for the same reason as everything in detection:
live, the receiver journals a tick whenever it has been quiet for `detection.tick_s`,
so event time moves on through a silence and the alert is raised during it, at the
event time `quiet_s` into it; a replay of the stored events sees the same silence as
a gap between two rows and raises the same alert (same id, same `raised_at`) when
the row after the gap arrives. A replay is never judged by how long it takes to read
its files: that would raise the alert on any slow disk and miss every real gap.

Only silence inside the expected hours counts, and it counts from the later of the
last report and the start of those hours, so a quiet night is no incident and a
morning without traffic is one, `quiet_s` after the hours begin:

    hours 07:00-23:00, quiet_s 30 min, last report 22:50
    22:50 ......... 23:00 (night, not counted) 07:00 ........ 07:30 -> alert, if still quiet

One alert per silence: the next one needs a report first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from engine.detect.alerts import Alert, alert_id

RULE_ID = "system.feed-silence"
ENTITY_TYPE = "feed"
ENTITY = "switch"
# How far ahead a deadline is looked for: a week of days with no expected hours left
# means the configured hours never hold (they always do: one range at least).
_DAYS_AHEAD = 8


@dataclass(frozen=True)
class FeedSilence:
    """The check's settings as plain values: `hours` as (start, end) minutes of the
    day in `zone` (an end at or before its start is the next day's)."""

    quiet_s: float
    hours: tuple[tuple[int, int], ...] = ((0, 24 * 60),)
    zone: tzinfo = UTC
    zone_name: str = "UTC"
    severity: str = "high"

    def __post_init__(self) -> None:
        if not self.quiet_s > 0:
            raise ValueError(f"quiet_s must be more than 0, not {self.quiet_s!r}")
        if not self.hours:
            raise ValueError("hours: at least one range of hours")

    def expected(self, start_day: date, days: int) -> list[tuple[float, float]]:
        """The expected spans (Unix seconds) of `days` days from `start_day`, merged
        where they touch (`00:00-24:00` every day is one span)."""
        spans: list[tuple[float, float]] = []
        for offset in range(days):
            day = start_day + timedelta(days=offset)
            for start, end in self.hours:
                begin = self._at(day, start)
                finish = self._at(day if end > start else day + timedelta(days=1), end)
                spans.append((begin, finish))
        spans.sort()
        merged: list[tuple[float, float]] = []
        for begin, finish in spans:
            if merged and begin <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
            else:
                merged.append((begin, finish))
        return merged

    def _at(self, day: date, minute: int) -> float:
        # Minutes of the local day (24:00: the next day's midnight), then Unix time; a
        # local time that a DST change skips or repeats is taken as zoneinfo takes it.
        local = datetime.combine(day, time(0)) + timedelta(minutes=minute)
        return local.replace(tzinfo=self.zone).timestamp()

    def deadline(self, last: float) -> float:
        """When silence since the report at `last` becomes an incident: the first moment
        with `quiet_s` of expected hours since the later of `last` and their start.

        >>> check = FeedSilence(1800.0, hours=((7 * 60, 23 * 60),))
        >>> at = datetime(2026, 12, 5, 22, 50, tzinfo=UTC).timestamp()
        >>> datetime.fromtimestamp(check.deadline(at), UTC).isoformat()
        '2026-12-06T07:30:00+00:00'
        >>> datetime.fromtimestamp(FeedSilence(1800.0).deadline(at), UTC).isoformat()
        '2026-12-05T23:20:00+00:00'
        """
        day = datetime.fromtimestamp(last, self.zone).date() - timedelta(days=1)
        for begin, finish in self.expected(day, _DAYS_AHEAD + 1):
            if finish <= last:
                continue
            start = max(begin, last)
            if start + self.quiet_s <= finish:
                return start + self.quiet_s
        return float("inf")

    def alert(self, last: float, deadline: float) -> Alert:
        """The alert for the silence after the report at `last`, raised at `deadline`."""
        hours = ", ".join(f"{_hhmm(start)}-{_hhmm(end)}" for start, end in self.hours)
        when = datetime.fromtimestamp(last, UTC).isoformat()
        summary = (
            f"the switch's feed went quiet: no report for {_span(self.quiet_s)} "
            f"within the hours traffic is expected ({hours} {self.zone_name}); "
            f"last report at {when}"
        )
        return Alert(
            alert_id=alert_id(RULE_ID, ENTITY, deadline),
            rule_id=RULE_ID,
            detector="system",
            severity=self.severity,
            entity_type=ENTITY_TYPE,
            entity=ENTITY,
            window_start=last,
            window_end=deadline,
            raised_at=deadline,
            value=deadline - last,
            threshold=self.quiet_s,
            summary=summary,
            evidence=[],
            rule_version="builtin",
        )


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _span(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
