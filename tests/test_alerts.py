"""Alerts after detection: suppression, the review trail, the sinks."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pytest

from engine.alerts.sinks import JsonLinesSink
from engine.apps.replay import replay
from engine.core.text import csv_cell
from engine.detect.alerts import Alert, AlertManager
from engine.detect.calls import CallTracker
from engine.detect.evaluate import Finding
from engine.detect.pipeline import Pipeline
from engine.detect.rules import load_rules
from engine.detect.ruletest import TEST_EPOCH, expand
from engine.detect.schema import TestCalls as Series
from engine.lake.reviews import LISTED, ReviewError, add_review, list_alerts
from tests.conftest import make_settings, wait_for


def finding(
    raised_at: float,
    entity: str = "8613900000001",
    rule_file: str = "short-calls-caller.yaml",
    since: float | None = None,
) -> Finding:
    """A finding of a shipped rule at `raised_at`, its window from `since` (100 s
    before by default)."""
    rule = load_rules(Path("rules") / rule_file).rules.rules[0]
    start = raised_at - 100 if since is None else since
    return Finding(rule, entity, raised_at, start, raised_at, 20.0, ["a", "b"])


def test_one_alert_per_incident_then_quiet_for_the_suppression() -> None:
    manager = AlertManager()
    first = manager.offer(finding(1000.0))
    assert first is not None and first.evidence == ["a", "b"]
    assert manager.offer(finding(1000.0 + 1799)) is None  # suppression: 30 min
    assert manager.offer(finding(1005.0, entity="other")) is not None
    assert manager.offer(finding(1000.0 + 1800)) is not None
    assert manager.suppressed == 1


@pytest.mark.parametrize(
    ("rule_file", "expected"),
    [
        ("short-calls-menu.yaml", [1000.0, 2000.0, 3800.0]),
        ("short-calls-caller.yaml", [1000.0, 3800.0]),
    ],
    ids=["new_incident_after 10 min", "none"],
)
def test_a_new_incident_within_the_suppression_raises_its_own_alert(
    rule_file: str, expected: list[float]
) -> None:
    manager = AlertManager()
    rule = load_rules(Path("rules") / rule_file).rules.rules[0]
    entity = "1"

    def offer(ts: float, since: float) -> bool:
        # As the rule asks: whether it is quiet, then the finding (if not quiet).
        quiet = manager.quiet(rule.id, entity, ts, True, rule.incident_since(since, ts))
        alert = manager.offer(finding(ts, entity, rule_file, since))
        assert quiet == (alert is None)
        return alert is not None

    raised = [
        ts
        for ts, since in [
            (1000.0, 900.0),  # the first incident
            (1060.0, 960.0),  # a minute on: its calls still in the window
            (1200.0, 1150.0),  # the rule reloaded, its window anew: within 10 min, the same
            (2000.0, 1900.0),  # 13 min after the last finding, the window clear of it
            (2060.0, 1960.0),  # its own suppression from then on
            (3800.0, 3700.0),  # past the suppression
        ]
        if offer(ts, since)
    ]
    assert raised == expected


@pytest.fixture(scope="module")
def reviewed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    from engine.simulator.scenario import generate, load_scenario, write_files

    events, _ = write_files(generate(load_scenario(Path("data/scenarios/demo.yaml"))), tmp / "sc")
    replay([events], make_settings(tmp / "data", detection={"alerts_jsonl": "off"}))
    return tmp / "data"


def test_a_review_needs_a_note_of_a_few_lines(reviewed_data: Path, tmp_path: Path) -> None:
    shutil.copytree(reviewed_data, tmp_path / "data")
    data = tmp_path / "data"
    alert_id = list_alerts(data, "all", 1)[0]["alert_id"]
    with pytest.raises(ReviewError, match="needs a note"):
        add_review(data, alert_id, "closed", "  ", "ana")
    with pytest.raises(ReviewError, match="holds at most 10,000"):
        add_review(data, alert_id, "closed", "x" * 10_001, "ana")
    # What is stored is the note stripped: that is what is measured.
    add_review(data, alert_id, "closed", "x" * 10_000 + " " * 20, "ana")
    assert list_alerts(data, "closed", 1)[0]["review_note"] == "x" * 10_000


def test_reviews_append_and_the_latest_one_counts(reviewed_data: Path) -> None:
    alert_id = list_alerts(reviewed_data, "open", 1)[0]["alert_id"]
    add_review(reviewed_data, alert_id[:8], "investigating", "looking at the CDRs", "ana")
    # The trail is ordered by the time of each review: the second is made once the
    # clock has moved past the first (on a coarse clock two could share an instant).
    first_done = datetime.now(tz=UTC)
    wait_for(lambda: datetime.now(tz=UTC) > first_done)
    add_review(reviewed_data, alert_id, "false_positive", "a test campaign we ran", "bo")
    assert alert_id not in {a["alert_id"] for a in list_alerts(reviewed_data, "open", 100)}
    assert [a["alert_id"] for a in list_alerts(reviewed_data, "false_positive", 10)] == [alert_id]
    with duckdb.connect(str(reviewed_data / "callsentry.duckdb"), read_only=True) as con:
        trail = con.execute(
            "SELECT reviewer, status FROM alert_reviews WHERE alert_id = ? ORDER BY reviewed_at",
            [alert_id],
        ).fetchall()
    assert trail == [("ana", "investigating"), ("bo", "false_positive")]


def test_review_errors(reviewed_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ReviewError, match="no alert 'nope'"):
        add_review(reviewed_data, "nope", "confirmed", "x", "me")
    with pytest.raises(ReviewError, match="has no alerts yet"):
        list_alerts(tmp_path, "open", 10)


def test_alerts_cli_show_lists_the_calls_behind_an_alert(reviewed_data: Path) -> None:
    alert_id = list_alerts(reviewed_data, "all", 1)[0]["alert_id"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "alerts",
            "show",
            alert_id,
            "--data-dir",
            str(reviewed_data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "evidence:" in result.stdout and "@10.0.0.5" in result.stdout


def test_a_review_the_lake_cannot_take_is_one_line_and_records_nothing(
    reviewed_data: Path, tmp_path: Path
) -> None:
    # A reviewer who cannot write to the lake: root ignores permissions, so the folder
    # the review goes in (today's; tomorrow's too, should the day turn) is made a
    # regular file, and the write fails as it would without permission.
    import shutil
    from datetime import timedelta

    data = tmp_path / "data"
    shutil.copytree(reviewed_data, data)
    alert = list_alerts(data, "all", 1)[0]
    alert_id = alert["alert_id"]
    today = datetime.now(tz=UTC)
    reviews = data / "lake" / "alert_reviews"
    for day in (today, today + timedelta(days=1)):
        folder = reviews / f"day={day:%Y-%m-%d}"
        if folder.is_dir():  # reviews of today, from the tests before: kept, on another day
            folder.rename(reviews / f"day={day - timedelta(days=3650):%Y-%m-%d}")
        folder.write_text("not a folder")
    argv = ["alerts", "review", alert_id, "--status", "confirmed", "--note", "checked"]
    result = subprocess.run(
        [sys.executable, "-m", "engine", *argv, "--reviewer", "ana", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("callsentry: cannot record the review in "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    after = [a for a in list_alerts(data, "all", 1000) if a["alert_id"] == alert_id]
    assert after == [alert]


def sample_alert(n: int) -> Alert:
    return Alert(
        f"id-{n}", "r", "rule", "high", "caller", "c", 0.0, 1.0, 1.0, 5.0, 3.0, "s", ["x"], "v"
    )


def test_json_lines_sink(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "a" / "alerts.jsonl")
    sink.deliver([sample_alert(1), sample_alert(2)])
    lines = (tmp_path / "a" / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["alert_id"] for line in lines] == ["id-1", "id-2"]
    assert json.loads(lines[0])["raised_at"] == "1970-01-01T00:00:01+00:00"


# -- reviewing from a terminal: filters, formats, one vocabulary, several ids ---------


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_alerts_list_filters_by_severity_rule_entity_and_time(reviewed_data: Path) -> None:
    everything = list_alerts(reviewed_data, "all", 10_000)
    assert len({a["severity"] for a in everything}) >= 2 and len(everything) >= 4
    high = list_alerts(reviewed_data, "all", 10_000, severities=["high"])
    assert high == [a for a in everything if a["severity"] == "high"] and high
    some = everything[1]
    by_rule = list_alerts(reviewed_data, "all", 10_000, rules=[some["rule_id"]])
    assert by_rule == [a for a in everything if a["rule_id"] == some["rule_id"]]
    by_entity = list_alerts(reviewed_data, "all", 10_000, entities=[some["entity"]])
    assert by_entity == [a for a in everything if a["entity"] == some["entity"]]
    at = some["raised_at"]
    since = list_alerts(reviewed_data, "all", 10_000, since=at)
    until = list_alerts(reviewed_data, "all", 10_000, until=at)
    assert since == [a for a in everything if a["raised_at"] >= at] and some in since
    assert until == [a for a in everything if a["raised_at"] < at] and some not in until
    assert len(since) + len(until) == len(everything)


def test_alerts_list_as_a_table_with_a_header_and_zoned_times(reviewed_data: Path) -> None:
    utc = cli("alerts", "list", "--status", "all", "--limit", "3", "--data-dir", str(reviewed_data))
    assert utc.returncode == 0, utc.stderr
    header, *rows = utc.stdout.splitlines()
    assert header.split()[:4] == ["ALERT", "RAISED", "(UTC)", "STATUS"]
    assert len(rows) == 3 and all(" UTC " in row for row in rows)
    shanghai = cli(
        "alerts", "list", "--status", "all", "--limit", "3", "--tz", "Asia/Shanghai",
        "--data-dir", str(reviewed_data),
    )  # fmt: skip
    assert shanghai.returncode == 0, shanghai.stderr
    assert shanghai.stdout.splitlines()[0].split()[1:3] == ["RAISED", "(CST)"]
    first = list_alerts(reviewed_data, "all", 1)[0]
    local = first["raised_at"].astimezone(ZoneInfo("Asia/Shanghai"))
    assert f"{local:%Y-%m-%d %H:%M:%S} CST" in shanghai.stdout.splitlines()[1]


def test_alerts_list_as_json_and_as_spreadsheet_safe_csv(
    reviewed_data: Path, tmp_path: Path
) -> None:
    shutil.copytree(reviewed_data, tmp_path / "data")
    reviewed_data = tmp_path / "data"
    argv = ["alerts", "list", "--status", "all", "--severity", "high", "--severity", "critical"]
    first = list_alerts(reviewed_data, "all", 1, severities=["high", "critical"])[0]
    add_review(reviewed_data, first["alert_id"], "investigating", "called the customer", "ana")
    as_json = cli(*argv, "--format", "json", "--data-dir", str(reviewed_data))
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    expected = list_alerts(reviewed_data, "all", 50, severities=["high", "critical"])
    assert [r["alert_id"] for r in rows] == [a["alert_id"] for a in expected]
    assert all(datetime.fromisoformat(r["raised_at"]).utcoffset() is not None for r in rows)
    as_csv = cli(*argv, "--format", "csv", "--data-dir", str(reviewed_data))
    assert as_csv.returncode == 0, as_csv.stderr
    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert table[0] == list(LISTED) and len(table) == len(rows) + 1
    for cells, row in zip(table[1:], expected, strict=True):
        assert cells[0] == row["alert_id"]
        assert cells[LISTED.index("summary")] == csv_cell(row["summary"])
        assert cells[LISTED.index("entity")] == csv_cell(row["entity"])
        assert json.loads(cells[LISTED.index("evidence")]) == list(row["evidence"])
    # Every column of alerts_current (its partition apart): the review's note too.
    with duckdb.connect(str(reviewed_data / "callsentry.duckdb"), read_only=True) as con:
        columns = [row[0] for row in con.execute("DESCRIBE alerts_current").fetchall()]
    assert sorted(LISTED) == sorted(name for name in columns if name != "day")
    assert all(list(row) == list(LISTED) for row in rows)
    assert [r["review_note"] for r in rows] == [a["review_note"] for a in expected]
    assert rows[0]["review_note"] == "called the customer"
    assert [r["evidence"] for r in rows] == [list(a["evidence"]) for a in expected]


def test_a_crafted_entity_is_no_formula_in_csv(tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_text(
        "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
        '2026-11-30T10:00:00Z,c1,1,RINGING,861380001,"+870771\x1b[2J",,12,Main\n'
    )
    settings = make_settings(tmp_path / "data", detection={"alerts_jsonl": "off"})
    replay([events], settings)
    done = cli("alerts", "list", "--format", "csv", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    _, row = list(csv.reader(io.StringIO(done.stdout)))
    assert row[LISTED.index("entity")] == "'+870771\\x1b[2J"
    table = cli("alerts", "list", "--data-dir", str(tmp_path / "data"))
    assert "\x1b" not in table.stdout and "+870771\\x1b[2J" in table.stdout


def test_fp_is_an_alias_everywhere_and_an_unknown_status_is_refused(
    reviewed_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(reviewed_data, data)
    alert_id = list_alerts(data, "open", 1)[0]["alert_id"]
    done = cli(
        "alerts", "review", alert_id, "--status", "fp", "--note", "a test", "--data-dir", str(data)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"{alert_id} is false_positive")
    by_alias = cli("alerts", "list", "--status", "fp", "--format", "json", "--data-dir", str(data))
    by_name = cli(
        "alerts", "list", "--status", "false_positive", "--format", "json", "--data-dir", str(data)
    )  # fmt: skip
    assert by_alias.stdout == by_name.stdout and alert_id in by_alias.stdout
    for argv in (
        ["alerts", "list", "--status", "dismissed"],
        ["alerts", "review", alert_id, "--status", "dismissed", "--note", "x"],
    ):
        refused = cli(*argv, "--data-dir", str(data))
        assert refused.returncode == 2
        assert (
            refused.stderr.startswith("callsentry: alerts ") and "unknown status" in refused.stderr
        )
        assert refused.stderr.count("\n") == 1


def test_one_review_of_several_alerts_is_all_or_nothing(
    reviewed_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(reviewed_data, data)
    first, second = (a["alert_id"] for a in list_alerts(data, "open", 2))
    refused = cli(
        "alerts", "review", first[:8], "nope", "--status", "confirmed", "--note", "x",
        "--data-dir", str(data),
    )  # fmt: skip
    assert refused.returncode == 1 and "no alert 'nope'" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "nothing was recorded" in refused.stderr
    assert {a["alert_id"] for a in list_alerts(data, "confirmed", 100)} == set()
    done = cli(
        "alerts", "review", first[:8], second, "--status", "confirmed", "--note", "both",
        "--reviewer", "ana", "--data-dir", str(data),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {a["alert_id"] for a in list_alerts(data, "confirmed", 100)} == {first, second}


def test_reviews_stored_under_older_status_names_still_read(
    reviewed_data: Path, tmp_path: Path
) -> None:
    import polars as pl

    from engine.lake.parquet import REVIEW_SCHEMA, write_atomic

    data = tmp_path / "data"
    shutil.copytree(reviewed_data, data)
    ids = [a["alert_id"] for a in list_alerts(data, "open", 3)]
    # As an older release or another tool may have written them.
    frame = pl.DataFrame(
        {
            "review_id": ["r1", "r2", "r3"],
            "alert_id": ids,
            "status": ["fp", "False-Positive", "Investigating"],
            "note": ["old"] * 3,
            "reviewer": ["old"] * 3,
            "reviewed_at": [datetime(2026, 11, 1, tzinfo=UTC)] * 3,
        },
        schema=REVIEW_SCHEMA,
    )
    write_atomic(frame, data / "lake" / "alert_reviews" / "day=2026-11-01" / "old.parquet")
    false_positives = {a["alert_id"] for a in list_alerts(data, "false_positive", 100)}
    assert set(ids[:2]) <= false_positives
    assert ids[2] in {a["alert_id"] for a in list_alerts(data, "investigating", 100)}
    shown_alert = cli("alerts", "show", ids[0], "--data-dir", str(data))
    assert "status false_positive" in shown_alert.stdout


def test_an_alert_id_is_matched_as_text_not_as_a_pattern(
    reviewed_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(reviewed_data, data)
    first = list_alerts(data, "open", 1)[0]["alert_id"]
    # `_` and `%` were LIKE wildcards: "x_..." named an alert whose id starts otherwise.
    for pattern in ("_" + first[1:8], first[:4] + "%", "%", ""):
        refused = cli(
            "alerts", "review", pattern, "--status", "confirmed", "--note", "x",
            "--data-dir", str(data),
        )  # fmt: skip
        assert refused.returncode == 1, (pattern, refused.stdout)
        assert "no alert" in refused.stderr and refused.stderr.count("\n") == 1
    assert list_alerts(data, "confirmed", 100) == []


def _raised(series: list[Series]) -> list[float]:
    """When the menu short-call rule raised its alerts for menu 1 (seconds from the
    first call)."""
    events = sorted(
        (e for i, s in enumerate(series) for e in expand(s, "bursts", i)),
        key=lambda e: (e.ts, e.call_id, e.serial),
    )
    pipeline = Pipeline(load_rules(Path("rules/short-calls-menu.yaml")).rules, CallTracker())
    output = pipeline.feed(events)
    output.extend(pipeline.advance(events[-1].ts + 3600))
    return [a.raised_at - TEST_EPOCH for a in output.alerts if not a.escalation]


def test_a_second_burst_after_the_first_ended_is_a_second_alert() -> None:
    # Three quarters of an hour of a menu, 5 % of its calls short; thirty short calls
    # 15 min in, and thirty more 20 min later, within the first alert's suppression
    # (30 min). Before, the second burst was hidden in the first one's alert.
    raised = _raised(
        [
            Series(caller="8613800000009", menu_id="1", repeat=2700, every=1.0, talk=60.0),
            Series(caller="8613800000008", menu_id="1", repeat=135, every=20.0, talk=2.0, at=0.5),
            Series(caller="8613900000001", menu_id="1", repeat=30, every=3.0, talk=2.0, at=900),
            Series(caller="8613900000002", menu_id="1", repeat=30, every=3.0, talk=2.0, at=2100),
        ]
    )
    assert len(raised) == 2 and 900 < raised[0] < 1000 and 2100 < raised[1] < 2200
