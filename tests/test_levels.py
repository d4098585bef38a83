"""Warning and critical levels, escalations, and rules selected by hour and weekday in
the site's time zone: from the rule file through the pipeline, the lake, the sinks and
the commands people read them with."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from click.testing import CliRunner

from engine.alerts.actionspec import Match
from engine.alerts.notify import NotifySink, Route
from engine.alerts.outbox import Outbox, outbox_path
from engine.alerts.sinks import AlertTally
from engine.apps.cli import main
from engine.apps.replay import replay
from engine.core.events import CallEvent
from engine.core.yamlfile import YamlFileError
from engine.detect.alerts import Alert
from engine.detect.calls import CallTracker
from engine.detect.pipeline import Pipeline
from engine.detect.rules import load_rules
from engine.detect.ruletest import expand, run_rule_tests
from engine.detect.schema import TestCalls as CallSeries
from engine.lake.parquet import ALERT_SCHEMA, Lake, write_atomic
from engine.lake.writer import alert_frames
from tests.conftest import make_settings

# A burst of calls from one caller: warning at 5 in 10 minutes, critical at 10.
BURST_RULE = """\
id: burst
title: Call burst
severity: high
aggregate: {type: count, group_by: caller, window: 600}
condition: {op: ">=", threshold: 10, warning: 5}
suppression: {duration: 1800}
"""


def rule_folder(tmp_path: Path, text: str = BURST_RULE, name: str = "burst.yaml") -> Path:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder


def burst(calls: int, *, caller: str = "8613800000001", at: float = 0.0) -> list[CallEvent]:
    """`calls` short answered calls 20 s apart (each finished 8 s after it started)."""
    series = CallSeries(at=at, every=20, repeat=calls, caller=caller, ring=3, talk=5)
    return expand(series, f"b{int(at)}-{caller[-4:]}", 0)


def run(folder: Path, chunks: list[list[CallEvent]], zone: Any = UTC) -> list[Alert]:
    pipeline = Pipeline(load_rules(folder, zone=zone).rules, CallTracker())
    alerts: list[Alert] = []
    last = 0.0
    for chunk in chunks:
        alerts += pipeline.feed(sorted(chunk, key=lambda e: (e.ts, e.call_id, e.serial))).alerts
        last = max([last, *(e.ts for e in chunk)])
    alerts += pipeline.advance(last + 3600).alerts
    return alerts


def described(alerts: list[Alert]) -> list[tuple[Any, ...]]:
    return [
        (a.alert_id, a.kind, a.level, a.entity, a.raised_at, a.escalated_at, a.value, a.threshold)
        for a in alerts
    ]


# -- the rule file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('{op: ">=", threshold: 10, warning: 10}', "warning (10) must be below the threshold"),
        ('{op: ">", threshold: 10, warning: 12}', "warning (12) must be below the threshold"),
        ('{op: "<=", threshold: 0.2, warning: 0.1}', "warning (0.1) must be above the threshold"),
        ('{op: "<", threshold: 5, warning: 5}', "warning (5) must be above the threshold"),
        ('{op: ">=", threshold: 10, warning: .nan}', "finite number"),
    ],
)
def test_a_warning_on_the_wrong_side_is_refused_at_its_line(
    tmp_path: Path, condition: str, expected: str
) -> None:
    text = BURST_RULE.replace('{op: ">=", threshold: 10, warning: 5}', condition)
    folder = rule_folder(tmp_path, text)
    with pytest.raises(YamlFileError) as raised:
        load_rules(folder)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{folder / 'burst.yaml'}:5: condition.warning: ")
    assert expected in problem


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("{hour: 24}", "hour: 24 is not an hour of the day (0 to 23)"),
        ("{hour: {in: [1, 2.5]}}", "hour: 2.5 is not an hour of the day"),
        ("{hour: {between: [6, 6]}}", "hour: between [6, 6] is not a range of hours"),
        ("{hour: {between: [1, 2, 3]}}", "between"),
        ("{hour: {prefix: ['1']}}", "hour: prefix does not apply to hour"),
        ("{weekday: {in: [sat, sunday]}}", "weekday: 'sunday' is not a day of the week"),
        ("{weekday: {ge: 3}}", "weekday: ge does not apply to weekday"),
        ("{talk_s: {between: [0, 6]}}", "talk_s: `between` is for `hour` only"),
        # A value no call can have made the rule match nothing, and `rules validate`
        # said it was valid.
        ("{outcome: answerd}", "outcome: 'answerd' is not an outcome (answered, "),
        ("{outcome: {in: [answered, timedout]}}", "outcome: 'timedout' is not an outcome"),
        ("{caller_type: mobil}", "caller_type: 'mobil' is not a number type (fixed_line, "),
        ("{forward_country: ZZ}", "forward_country: 'ZZ' is not a region the numbering"),
        ("{forward_country: {in: [GB, gb]}}", "forward_country: 'gb' is not a region"),
        ("{answered: maybe}", "answered: 'maybe' is not true or false"),
        ("{caller_valid: {ne: nope}}", "caller_valid: 'nope' is not true or false"),
        ("{caller_abroad: 3}", "caller_abroad: 3 is not true or false"),
        ("{ring_code: 999}", "ring_code: 999 is not a SIP status code"),
        ("{talk_s: {in: [long]}}", "talk_s: 'long' is not a number"),
    ],
)
def test_a_selection_no_call_can_match_is_refused_naming_the_field(
    tmp_path: Path, selection: str, expected: str
) -> None:
    folder = rule_folder(tmp_path, BURST_RULE + f"selection: {selection}\n")
    with pytest.raises(YamlFileError) as raised:
        load_rules(folder)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{folder / 'burst.yaml'}:7: selection")
    assert expected in problem


@pytest.mark.parametrize(
    "selection",
    [
        '{forward_type: {ne: ""}}',  # "" is a call without a forward number's type
        '{forward_country: {in: ["001", ""]}}',
        "{answered: true, caller_valid: {ne: false}}",
        "{ring_code: {in: [180, 183]}, talk_s: {lt: 5}}",
        "{outcome: {in: [answered, timed_out]}}",
    ],
)
def test_every_value_a_call_can_have_is_taken(tmp_path: Path, selection: str) -> None:
    load_rules(rule_folder(tmp_path, BURST_RULE + f"selection: {selection}\n"))


# -- levels and escalation in the pipeline ---------------------------------------------


def test_a_warning_alert_escalates_once_with_the_same_alert_id(tmp_path: Path) -> None:
    alerts = run(rule_folder(tmp_path), [burst(14)])
    raised, escalation = alerts
    # The metrics' count by rule: one alert, as the lake writer's total has it.
    tally = AlertTally(None)
    tally.deliver(alerts)
    assert dict(tally.counts) == {(raised.rule_id, raised.severity, "alert"): 1}
    assert (raised.kind, raised.level, raised.value, raised.threshold) == (
        "alert",
        "warning",
        5.0,
        5.0,
    )
    assert "(warning; critical at >= 10)" in raised.summary
    assert escalation.kind == "escalation" and escalation.level == "critical"
    assert escalation.alert_id == raised.alert_id
    assert escalation.raised_at == raised.raised_at
    assert (escalation.value, escalation.threshold) == (10.0, 10.0)
    # The 10th call's end: the 5th ends 80 s after the first started, the 10th 100 s later.
    assert escalation.escalated_at == raised.raised_at + 100
    assert len(escalation.evidence) == 10
    json_shape = escalation.as_json()
    assert json_shape["kind"] == "escalation" and json_shape["level"] == "critical"
    assert (
        json_shape["escalated_at"]
        == datetime.fromtimestamp(raised.raised_at + 100, UTC).isoformat()
    )
    assert raised.as_json()["escalated_at"] is None


def test_a_first_crossing_at_the_critical_threshold_raises_a_critical_alert(
    tmp_path: Path,
) -> None:
    # Ten calls finishing within one report batch are still judged one by one: the
    # fifth raises the warning. A rule without a warning raises critical at once.
    plain = BURST_RULE.replace(", warning: 5", "")
    alerts = run(rule_folder(tmp_path, plain), [burst(14)])
    assert [(a.kind, a.level, a.value) for a in alerts] == [("alert", "critical", 10.0)]
    assert "critical" not in alerts[0].summary  # a rule without a warning reads as before


def test_no_escalation_once_the_suppression_is_over_a_new_alert_instead(
    tmp_path: Path,
) -> None:
    # A warning incident, then quiet past the suppression (30 min), then a full burst.
    alerts = run(rule_folder(tmp_path), [burst(6), burst(14, at=4000.0)])
    assert [(a.kind, a.level) for a in alerts] == [
        ("alert", "warning"),
        ("alert", "warning"),
        ("escalation", "critical"),
    ]
    assert alerts[0].alert_id != alerts[1].alert_id == alerts[2].alert_id


def test_a_warning_incident_that_never_reaches_critical_stays_a_warning(tmp_path: Path) -> None:
    alerts = run(rule_folder(tmp_path), [burst(9)])
    assert [(a.kind, a.level) for a in alerts] == [("alert", "warning")]


def test_levels_and_escalations_are_the_same_however_the_events_are_split(
    tmp_path: Path,
) -> None:
    folder = rule_folder(tmp_path)
    events = sorted(
        burst(14) + burst(7, caller="8613800000002", at=30.0) + burst(12, at=5000.0),
        key=lambda e: (e.ts, e.call_id, e.serial),
    )
    whole = described(run(folder, [events]))
    assert whole == described(run(folder, [events]))  # twice: the same
    for size in (1, 7, 40):
        split = [events[i : i + size] for i in range(0, len(events), size)]
        assert described(run(folder, split)) == whole
    kinds = [(row[1], row[2]) for row in whole]
    assert kinds.count(("escalation", "critical")) == 2 and ("alert", "warning") in kinds


def test_a_concurrent_rule_escalates_as_calls_in_progress_grow(tmp_path: Path) -> None:
    rule = """\
id: parallel
title: Many calls at once
severity: critical
on: call_start
aggregate: {type: concurrent, group_by: caller}
condition: {op: ">=", threshold: 6, warning: 3}
suppression: {duration: 1800}
"""
    # Eight long calls opened 10 s apart: 3 at once at the third, 6 at the sixth.
    series = CallSeries(every=10, repeat=8, talk=900)
    alerts = run(rule_folder(tmp_path, rule, "parallel.yaml"), [expand(series, "p", 0)])
    assert [(a.kind, a.level, a.value) for a in alerts] == [
        ("alert", "warning", 3.0),
        ("escalation", "critical", 6.0),
    ]


# -- hour and weekday in the site's time zone -------------------------------------------


NIGHT_RULE = BURST_RULE.replace(", warning: 5", "").replace("threshold: 10", "threshold: 3") + (
    "selection: {hour: {between: [22, 6]}, weekday: {in: [sat, sun]}}\n"
)
# Saturday 2026-12-05 15:00 UTC is 23:00 in Shanghai (UTC+8): a Saturday night there.
SATURDAY_15_UTC = datetime(2026, 12, 5, 15, 0, tzinfo=UTC).timestamp()


def at_utc(ts: float, calls: int = 4) -> list[CallEvent]:
    return [e._replace(ts=e.ts - 1_790_000_000.0 + ts) for e in burst(calls, caller=f"86{int(ts)}")]


def test_hour_and_weekday_are_read_in_the_site_time_zone(tmp_path: Path) -> None:
    folder = rule_folder(tmp_path, NIGHT_RULE, "night.yaml")
    shanghai = ZoneInfo("Asia/Shanghai")
    saturday_night = at_utc(SATURDAY_15_UTC)
    # 13:00 UTC: 21:00 in Shanghai, not yet night; and 23:00 UTC on a Friday (Saturday
    # 07:00 in Shanghai: day).
    evening = at_utc(SATURDAY_15_UTC - 2 * 3600)
    friday_late = at_utc(SATURDAY_15_UTC - 16 * 3600)
    alerts = run(folder, [friday_late + evening + saturday_night], zone=shanghai)
    assert [a.entity for a in alerts] == [f"86{int(SATURDAY_15_UTC)}"]
    # In UTC the same calls are a Friday 23:00 burst and Saturday afternoon ones: the
    # Friday one is at night, but not on a weekend; nothing is selected.
    assert run(folder, [friday_late + evening + saturday_night]) == []


def test_hour_between_wraps_midnight_and_takes_its_first_hour_not_its_last(
    tmp_path: Path,
) -> None:
    rule = BURST_RULE.replace(", warning: 5", "").replace("threshold: 10", "threshold: 1")
    folder = rule_folder(tmp_path, rule + "selection: {hour: {between: [22, 6]}}\n", "h.yaml")
    midnight = datetime(2026, 12, 7, 0, 0, tzinfo=UTC).timestamp()
    starts = {hour: midnight + hour * 3600 for hour in (-3, -2, 0, 5, 6)}
    events = sorted(
        (e for hour, ts in starts.items() for e in at_utc(ts, calls=1)), key=lambda e: e.ts
    )
    hours = sorted(datetime.fromtimestamp(a.raised_at, UTC).hour for a in run(folder, [events]))
    assert hours == [0, 5, 22]  # 21:00 and 06:00 are outside


def test_a_bad_time_zone_setting_names_the_setting() -> None:
    from engine.apps.settings import ConfigError

    with pytest.raises(ConfigError, match=r"detection\.timezone.*'Mars/Olympus'"):
        make_settings(Path("/nonexistent"), detection={"timezone": "Mars/Olympus"})


def test_replay_reads_the_hour_in_the_time_zone_the_settings_name(tmp_path: Path) -> None:
    folder = rule_folder(tmp_path, NIGHT_RULE, "night.yaml")
    rows = [
        {"ts": datetime.fromtimestamp(e.ts, UTC).isoformat(), "call_id": e.call_id,
         "serial": e.serial, "state": e.state.value, "caller": e.caller,
         "callee": e.callee, "menu_id": "1"}
        for e in at_utc(SATURDAY_15_UTC)
    ]  # fmt: skip
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    found = {}
    for zone in ("UTC", "Asia/Shanghai"):
        settings = make_settings(
            tmp_path / f"data-{zone.replace('/', '-')}",
            detection={"timezone": zone, "alerts_jsonl": "off", "models_enabled": False},
        )
        found[zone] = len(replay([events], settings, folder).alerts)
    assert found == {"UTC": 0, "Asia/Shanghai": 1}


# -- inline tests can expect a level ----------------------------------------------------


def test_an_inline_test_can_expect_a_level(tmp_path: Path) -> None:
    tests = """\
tests:
  - name: warning only
    calls: [{every: 20, repeat: 6}]
    expect: [{entity: "8613800000001", level: warning}]
  - name: escalated
    calls: [{every: 20, repeat: 12}]
    expect: [{entity: "8613800000001", level: critical}]
  - name: wrongly expected critical
    calls: [{every: 20, repeat: 6}]
    expect: [{entity: "8613800000001", level: critical}]
"""
    rules = load_rules(rule_folder(tmp_path, BURST_RULE + tests)).rules
    results = {r.test: r for r in run_rule_tests(rules)}
    assert results["warning only"].passed
    assert results["escalated"].passed
    assert results["escalated"].actual == {"8613800000001": 1}  # one alert, escalated
    wrong = results["wrongly expected critical"]
    assert not wrong.passed and wrong.actual_levels == {"8613800000001": "warning"}


# -- the lake -------------------------------------------------------------------------


def escalated_pair(tmp_path: Path) -> tuple[Alert, Alert]:
    raised, escalation = run(rule_folder(tmp_path), [burst(14)])
    return raised, escalation


def test_the_lake_keeps_levels_and_escalations_and_alerts_current_shows_them(
    tmp_path: Path,
) -> None:
    raised, escalation = escalated_pair(tmp_path)
    other = run(rule_folder(tmp_path), [burst(7, caller="8613800000009")])[0]
    lake = Lake(tmp_path / "data")
    lake.prepare()
    lake.write_segment(1, [], alert_frames([raised, other]))
    lake.write_segment(2, [], alert_frames([escalation]))
    rows = lake.query(
        "SELECT alert_id, level, raised_level, escalated_at, escalated_value "
        "FROM alerts_current ORDER BY entity"
    )
    at = datetime.fromtimestamp(escalation.escalated_at or 0, UTC)
    assert rows == [
        (raised.alert_id, "critical", "warning", at, 10.0),
        (other.alert_id, "warning", "warning", None, None),
    ]
    assert lake.query("SELECT count(*) FROM alerts") == [(2,)]
    stored = lake.query("SELECT alert_id, level, value, evidence FROM alert_escalations")
    assert stored == [(raised.alert_id, "critical", 10.0, escalation.evidence)]


def test_a_lake_written_before_levels_reads_its_alerts_as_critical(tmp_path: Path) -> None:
    raised, _ = escalated_pair(tmp_path)
    lake = Lake(tmp_path / "data")
    lake.prepare()
    old_schema = {k: v for k, v in ALERT_SCHEMA.items() if k != "level"}
    # As the release before levels left it: no level anywhere, no escalations table.
    write_atomic(
        pl.DataFrame(schema=old_schema),
        lake.root / "alerts" / "day=1970-01-01" / "empty.parquet",
    )
    for path in (lake.root / "alert_escalations").rglob("*.parquet"):
        path.unlink()
    (lake.root / "alert_escalations" / "day=1970-01-01").rmdir()
    old_rows = alert_frames([raised])["alerts"].drop("level")
    write_atomic(old_rows, lake.root / "alerts" / "day=2026-09-21" / "seg-000000000001.parquet")
    expected = [(raised.alert_id, "critical", "critical", None)]
    sql = "SELECT alert_id, level, raised_level, escalated_at FROM alerts_current"
    assert lake.query(sql) == expected
    # Prepared by this release (placeholders with the column), the old file still reads.
    lake.prepare()
    assert lake.query(sql) == expected
    lake.publish_views()


# -- sinks ------------------------------------------------------------------------------


def test_a_route_for_critical_takes_the_escalation_of_a_warning_alert(tmp_path: Path) -> None:
    raised, escalation = escalated_pair(tmp_path)
    outbox = Outbox(outbox_path(tmp_path))
    sink = NotifySink(
        outbox,
        [
            ("notify.pager", Route(levels=frozenset({"critical"}))),
            ("notify.soc", Route()),
        ],
    )
    sink.deliver([raised])
    sink.deliver([escalation])
    sink.deliver([escalation])  # a repeat after a crash: one delivery still
    rows = sorted((d.destination, d.key) for d in outbox.listing(("pending",)))
    assert rows == [
        ("notify.pager", f"{raised.alert_id}:escalation"),
        ("notify.soc", raised.alert_id),
        ("notify.soc", f"{raised.alert_id}:escalation"),
    ]
    payloads = {d.key: json.loads(d.payload) for d in outbox.listing(("pending",))}
    assert payloads[raised.alert_id]["level"] == "warning"
    assert payloads[f"{raised.alert_id}:escalation"]["kind"] == "escalation"


def test_an_action_can_select_on_the_level() -> None:
    critical_only = Match(levels=["critical"])
    assert critical_only.matches({"level": "critical"}, [])
    assert not critical_only.matches({"level": "warning"}, [])
    assert critical_only.matches({}, [])  # an alert without a level is critical
    assert Match().matches({"level": "warning"}, [])


# -- the commands ---------------------------------------------------------------------


def test_alerts_list_and_show_give_the_level_and_the_escalation(tmp_path: Path) -> None:
    raised, escalation = escalated_pair(tmp_path)
    other = run(rule_folder(tmp_path), [burst(7, caller="86<b>\x1b[2J")])[0]
    data = tmp_path / "data"
    lake = Lake(data)
    lake.prepare()
    lake.write_segment(1, [], alert_frames([raised, other, escalation]))
    runner = CliRunner()
    listed = runner.invoke(main, ["alerts", "list", "--data-dir", str(data)])
    assert listed.exit_code == 0, listed.output
    assert "LEVEL" in listed.output
    assert "escalated" in listed.output and "warning" in listed.output
    assert "\x1b" not in listed.output
    only = runner.invoke(
        main, ["alerts", "list", "--data-dir", str(data), "--level", "warning", "--format", "json"]
    )
    rows = [json.loads(line) for line in only.output.splitlines()]
    assert [(r["alert_id"], r["level"], r["escalated_at"]) for r in rows] == [
        (other.alert_id, "warning", None)
    ]
    shown_alert = runner.invoke(main, ["alerts", "show", raised.alert_id, "--data-dir", str(data)])
    assert shown_alert.exit_code == 0, shown_alert.output
    assert "level     critical (raised at warning)" in shown_alert.output
    assert "to critical: value 10 (threshold 10)" in shown_alert.output


def test_time_zones_load_without_the_system_database() -> None:
    # A Debian container may lack /usr/share/zoneinfo: the `tzdata` package holds them.
    import zoneinfo

    zoneinfo.reset_tzpath(to=[])
    try:
        zone = zoneinfo.ZoneInfo.no_cache("Asia/Shanghai")
        assert datetime.fromtimestamp(SATURDAY_15_UTC, zone).hour == 23
    finally:
        zoneinfo.reset_tzpath()


def test_inline_tests_read_the_hour_in_utc_whatever_the_site_zone(tmp_path: Path) -> None:
    # The tests start at 14:13:20 UTC, a Monday: 22:13 in Shanghai.
    rule = BURST_RULE + (
        "selection: {hour: 14, weekday: mon}\n"
        "tests:\n"
        "  - name: afternoon in UTC\n"
        "    calls: [{every: 20, repeat: 12}]\n"
        '    expect: [{entity: "8613800000001", level: critical}]\n'
    )
    rules = load_rules(rule_folder(tmp_path, rule), zone=ZoneInfo("Asia/Shanghai")).rules
    assert [r.passed for r in run_rule_tests(rules)] == [True]


def test_the_console_filters_by_level_and_shows_the_escalation(tmp_path: Path) -> None:
    from tests.console_data import console_data_dir
    from tests.test_console import signed_in

    data = console_data_dir(tmp_path / "console")
    raised, escalation = escalated_pair(tmp_path)
    other = run(rule_folder(tmp_path), [burst(7, caller="8613800000777")])[0]
    Lake(data).write_segment(999_999, [], alert_frames([raised, other, escalation]))
    client = signed_in(data)
    warnings = client.get("/", params={"level": "warning"}).text
    assert "8613800000777" in warnings and raised.entity not in warnings
    critical = client.get("/", params={"level": "critical", "status": "all"}).text
    assert raised.entity in critical and "escalated" in critical
    assert "8613800000777" not in critical
    page = client.get(f"/alerts/{raised.alert_id}").text
    assert "<h2>Escalations</h2>" in page and "raised at warning" in page
    api = client.get(f"/api/alerts/{raised.alert_id}").json()
    assert (api["level"], api["raised_level"]) == ("critical", "warning")
    assert [e["value"] for e in api["escalations"]] == [10.0]
    assert client.get("/", params={"level": "severe"}).status_code == 400
