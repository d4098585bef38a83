"""The feed-silence alert: the switch went quiet while traffic was expected.

Event time only: live, the receiver's ticks carry event time through a silence; a
replay of the stored events sees the same silence as a gap between rows and raises
the same alert (same id).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from engine.apps.detectors import feed_silence, make_pipeline
from engine.apps.replay import replay
from engine.apps.settings import ConfigError, load_settings
from engine.core.events import CallEvent, CallState
from engine.detect.alerts import Alert
from engine.detect.feed import RULE_ID, FeedSilence
from engine.detect.pipeline import Pipeline
from engine.detect.rules import RuleSet
from engine.ingest.codec import Vos3000TextCodec
from tests.conftest import RunningEngine, Switch, make_settings, wait_for

# 2026-12-05 (a Saturday) 00:00 UTC.
DAY = datetime(2026, 12, 5, tzinfo=UTC).timestamp()
HOUR = 3600.0


def report(ts: float, call_id: str, serial: int = 1) -> CallEvent:
    return CallEvent(
        ts, call_id, serial, CallState.RINGING, 180, "100", "200", "", "7", "Main", "t"
    )


def silences(pipeline: Pipeline, times: list[float], then: float | None = None) -> list[Alert]:
    """The feed-silence alerts of reports at `times`, each fed alone, then event time moved
    to `then` (a tick)."""
    alerts = []
    for n, ts in enumerate(times):
        alerts += pipeline.feed([report(ts, f"c{n}")]).alerts
    if then is not None:
        alerts += pipeline.advance(then).alerts
    return [a for a in alerts if a.rule_id == RULE_ID]


def business_hours(quiet_s: float = 1800.0) -> Pipeline:
    # 07:00-23:00 UTC: a quiet night is normal.
    return Pipeline(RuleSet([], {}), feed=FeedSilence(quiet_s, hours=((7 * 60, 23 * 60),)))


def test_a_gap_within_the_hours_raises_one_alert_at_its_deadline() -> None:
    # 10:00 report ... 10:30 deadline ... 11:00 next report: one alert at 10:30.
    pipeline = business_hours()
    alerts = silences(pipeline, [DAY + 10 * HOUR, DAY + 11 * HOUR])
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.raised_at == DAY + 10.5 * HOUR
    assert (alert.window_start, alert.window_end) == (DAY + 10 * HOUR, DAY + 10.5 * HOUR)
    assert (alert.detector, alert.entity_type, alert.severity) == ("system", "feed", "high")
    assert alert.value == alert.threshold == 1800.0
    assert "no report for 30 min" in alert.summary and "07:00-23:00 UTC" in alert.summary
    assert "last report at 2026-12-05T10:00:00+00:00" in alert.summary


def test_ticks_raise_it_during_the_silence_and_only_once() -> None:
    pipeline = business_hours()
    assert silences(pipeline, [DAY + 10 * HOUR], then=DAY + 10 * HOUR + 1799) == []
    assert len(silences(pipeline, [], then=DAY + 10.5 * HOUR)) == 1
    # Still quiet an hour later: the same silence, no second alert.
    assert silences(pipeline, [], then=DAY + 11.5 * HOUR) == []
    # Traffic again, then quiet again: a new silence, a new alert.
    again = silences(pipeline, [DAY + 12 * HOUR], then=DAY + 13 * HOUR)
    assert [a.raised_at for a in again] == [DAY + 12.5 * HOUR]


def test_a_shorter_gap_and_a_quiet_night_raise_nothing() -> None:
    # 10:00 and 10:29:59: a second short of the bound.
    assert silences(business_hours(), [DAY + 10 * HOUR, DAY + 10.5 * HOUR - 1]) == []
    # 22:50 and 07:10 the next morning: the night is not counted (10 min before 23:00,
    # 10 min after 07:00).
    assert silences(business_hours(), [DAY + 22 * HOUR + 3000, DAY + 31 * HOUR + 600]) == []


def test_a_morning_without_traffic_counts_from_the_start_of_the_hours() -> None:
    # Last report 22:50; still nothing at 07:30 the next day: alert at 07:30.
    pipeline = business_hours()
    alerts = silences(pipeline, [DAY + 22 * HOUR + 3000], then=DAY + 31.5 * HOUR)
    assert [a.raised_at for a in alerts] == [DAY + 31.5 * HOUR]


def test_hours_across_midnight_in_a_time_zone() -> None:
    from zoneinfo import ZoneInfo

    # 22:00-06:00 in Shanghai (UTC+8) is 14:00-22:00 UTC.
    check = FeedSilence(600.0, hours=((22 * 60, 6 * 60),), zone=ZoneInfo("Asia/Shanghai"))
    assert check.deadline(DAY + 13 * HOUR) == DAY + 14 * HOUR + 600
    assert check.deadline(DAY + 21 * HOUR + 3300) == DAY + 38 * HOUR + 600
    assert check.deadline(DAY + 21 * HOUR + 3000) == DAY + 22 * HOUR


def test_the_silence_survives_a_snapshot() -> None:
    pipeline = business_hours()
    silences(pipeline, [DAY + 10 * HOUR])
    restored = business_hours()
    restored.restore(pipeline.state())
    assert len(silences(restored, [], then=DAY + 11 * HOUR)) == 1
    # A snapshot written before the check existed has no such keys: it starts unknowing.
    old = pipeline.state()
    del old["feed_last"], old["feed_alerted"]
    cold = business_hours()
    cold.restore(old)
    assert silences(cold, [], then=DAY + 11 * HOUR) == []


def test_off_by_default_and_its_settings_are_checked() -> None:
    assert feed_silence(load_settings(environ={}).detection) is None
    settings = load_settings(
        overrides={
            "detection": {
                "feed_silence_s": 900,
                "feed_hours": ["07:00-12:00", "13:00-24:00"],
                "feed_timezone": "Europe/Berlin",
            }
        },
        environ={},
    )
    check = feed_silence(settings.detection)
    assert check is not None and check.hours == ((420, 720), (780, 1440))
    for bad, message in (
        ({"feed_hours": ["7-23"]}, "detection.feed_hours (from a flag): '7-23' is not a range"),
        ({"feed_hours": ["08:00-08:00"]}, "is empty (for the whole day, write 00:00-24:00)"),
        ({"feed_timezone": "Mars/Base"}, "'Mars/Base' is not a time zone name"),
        ({"feed_silence_s": -1}, "detection.feed_silence_s (from a flag): Input should be"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_settings(overrides={"detection": bad}, environ={})


def alerts_in(database: Path) -> list[tuple[str, str, float]]:
    if not database.exists():
        return []
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(
            "SELECT alert_id, rule_id, epoch(raised_at) FROM alerts ORDER BY raised_at"
        ).fetchall()
    return [(str(a), str(r), float(t)) for a, r, t in rows]


def test_a_live_engine_raises_it_from_ticks_and_a_replay_of_its_events_gives_the_same(
    engine_factory: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    # settle_s below the silence: the end of a replay moves event time on by settle_s.
    feed = {"feed_silence_s": 1.0, "tick_s": 0.2, "settle_s": 0.5, "alerts_jsonl": "off"}
    running = engine_factory(detection=feed)
    switch = Switch(running.address)
    codec = Vos3000TextCodec()
    try:
        now = datetime.now(UTC).timestamp()
        assert switch.ask(codec.encode(report(now, "before-silence"))) is not None
        database = tmp_path / "data" / "callsentry.duckdb"
        # No traffic: the receiver's ticks move event time past the deadline.
        wait_for(lambda: alerts_in(database) != [], 30, "the feed-silence alert")
        [(live_id, rule, raised_at)] = alerts_in(database)
        assert rule == RULE_ID
        assert switch.ask(codec.encode(report(raised_at + 5, "after-silence"))) is not None
        assert running.engine.operator is not None
        base = "http://{}:{}".format(*running.engine.operator.address)
        counted = (
            f'callsentry_rule_alerts_total{{mode="alert",rule="{RULE_ID}",severity="high"}} 1.0'
        )

        def scraped() -> str:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
                return str(response.read().decode())

        # The lake writer hands its counts over once per pass.
        wait_for(lambda: counted in scraped(), 30, "the alert counted by rule and severity")
    finally:
        switch.close()
        running.stop()
    exported = tmp_path / "stored.parquet"
    with duckdb.connect(str(database), read_only=True) as con:
        con.execute(
            "COPY (SELECT ts, call_id, serial, coalesce(CAST(code AS VARCHAR), state) AS state, "
            "caller, callee, forward, menu_id, menu_name FROM events ORDER BY seq) "
            f"TO '{exported}' (FORMAT parquet)"
        )
        stored = con.execute("SELECT call_id FROM events ORDER BY seq").fetchall()
    assert stored == [("before-silence",), ("after-silence",)]
    # Replay, however long it takes to read, raises it from the gap in event time only.
    result = replay([exported], make_settings(tmp_path / "again", detection=feed))
    assert [a.alert_id for a in result.alerts if a.rule_id == RULE_ID] == [live_id]
    quiet = replay([exported], make_settings(tmp_path / "off", detection={"alerts_jsonl": "off"}))
    assert [a for a in quiet.alerts if a.rule_id == RULE_ID] == []


def test_make_pipeline_puts_the_check_in_place() -> None:
    settings = make_settings(Path("unused"), detection={"feed_silence_s": 60})
    pipeline = make_pipeline(settings.detection)
    assert pipeline.feed_silence is not None and pipeline.feed_silence.quiet_s == 60
