"""Alerts after detection: suppression, the review trail, the sinks."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from engine.alerts.sinks import JsonLinesSink
from engine.apps.replay import replay
from engine.detect.alerts import Alert, AlertManager
from engine.detect.evaluate import Finding
from engine.detect.rules import load_rules
from engine.lake.reviews import ReviewError, add_review, list_alerts
from tests.conftest import make_settings, wait_for


def finding(raised_at: float, entity: str = "8613900000001") -> Finding:
    rule = load_rules(Path("rules/short-calls-caller.yaml")).rules.rules[0]
    return Finding(rule, entity, raised_at, raised_at - 100, raised_at, 20.0, ["a", "b"])


def test_one_alert_per_incident_then_quiet_for_the_suppression() -> None:
    manager = AlertManager()
    first = manager.offer(finding(1000.0))
    assert first is not None and first.evidence == ["a", "b"]
    assert manager.offer(finding(1000.0 + 1799)) is None  # suppression: 30 min
    assert manager.offer(finding(1005.0, entity="other")) is not None
    assert manager.offer(finding(1000.0 + 1800)) is not None
    assert manager.suppressed == 1


@pytest.fixture(scope="module")
def reviewed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    from engine.simulator.scenario import generate, load_scenario, write_files

    events, _ = write_files(generate(load_scenario(Path("data/scenarios/demo.yaml"))), tmp / "sc")
    replay([events], make_settings(tmp / "data", detection={"alerts_jsonl": "off"}))
    return tmp / "data"


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
