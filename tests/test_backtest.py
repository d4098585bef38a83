"""`callsentry rules backtest`: a changed rule set against the rules in use, on the
stored events, from a fresh start, writing nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.apps import backtest as backtest_module
from engine.apps import detectfork
from engine.apps.backtest import BacktestReport, backtest, parse_time, stored_span
from engine.apps.replay import ReplayReport, replay
from engine.detect.alerts import Alert
from engine.lake.reviews import add_review
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
SAMPLE = ROOT / "data" / "samples" / "events.csv"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120
    )


def short_calls(path: Path, callers: dict[str, int], start: float = 1_790_000_000.0) -> None:
    """Each caller makes this many 2-second answered calls, one every 6 s."""
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    for offset, (caller, count) in enumerate(callers.items()):
        for n in range(count):
            t = start + offset * 3600 + n * 6
            call = f"{caller}-{n}@10.0.0.5"
            for serial, (dt, state) in enumerate(((0, "180"), (1, "OK"), (3, "Bye")), 1):
                rows.append(f"{t + dt},{call},{serial},{state},{caller},4008001000,,1,Main")
    path.write_text("\n".join(rows) + "\n")


def burst_rules(folder: Path) -> Path:
    """The shipped rules with short-calls-caller as a plain count (15 in 3 min, no
    `behaviour:`): these tests are about backtest, on files of a few callers only,
    where the shipped rule's comparison with callers at large has nobody to go by."""
    shutil.copytree(RULES, folder)
    rule = folder / "short-calls-caller.yaml"
    text = rule.read_text(encoding="utf-8")
    text = re.sub(r"\nbehaviour:\n(?:  .*\n)+", "\n", text)
    text = text.replace("window: 5m}", "window: 3m}").replace("threshold: 8}", "threshold: 15}")
    rule.write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReplayReport]:
    data_dir = tmp_path_factory.mktemp("backtest") / "data"
    report = replay([SAMPLE], make_settings(data_dir))
    assert report.alerts, "the sample should raise alerts for this test to mean anything"
    return data_dir, report


def files_of(data_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(data_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in data_dir.rglob("*")
        if path.is_file()
    }


def test_the_rules_in_use_against_themselves_raise_what_replay_raised(
    sample: tuple[Path, ReplayReport],
) -> None:
    data_dir, replayed = sample
    settings = make_settings(data_dir)
    first, last = stored_span(data_dir)
    before = files_of(data_dir)
    report = backtest(data_dir, RULES, RULES, settings.detection, first, last + 1e-6)
    # The one principle: the stored events, read back in the order they were stored,
    # give the alerts the replay of the file gave, with the same ids.
    assert {a.alert_id for a in report.current} == {a.alert_id for a in replayed.alerts}
    assert {a.alert_id for a in report.candidate} == {a.alert_id for a in replayed.alerts}
    assert report.events == replayed.stored - len(replayed.rejects)
    assert report.rules and all(not c.added and not c.removed for c in report.rules)
    assert all(c.current == c.candidate for c in report.rules)
    assert files_of(data_dir) == before, "a backtest only reads the data dir"


def test_a_lowered_threshold_adds_an_incident_and_a_dropped_rule_removes_its_own(
    tmp_path: Path,
) -> None:
    events = tmp_path / "short.csv"
    # 20 short calls: over the shipped threshold (15 in 3 min), and all of the first
    # caller's answered calls (at least 20) are short (low and slow); 8: only over 6.
    short_calls(events, {"8613900000001": 20, "8613900000002": 8})
    data_dir = tmp_path / "data"
    in_use = burst_rules(tmp_path / "in-use")
    replayed = replay([events], make_settings(data_dir, detection={"rules_dir": str(in_use)}))
    candidate = tmp_path / "rules"
    shutil.copytree(in_use, candidate)
    rule = candidate / "short-calls-caller.yaml"
    text = rule.read_text()
    assert "threshold: 15}" in text
    rule.write_text(text.replace("threshold: 15}", "threshold: 6}"))
    (candidate / "short-calls-low-and-slow.yaml").unlink()

    # The team had marked the low-and-slow alert live detection raised a false positive.
    (slow_alert,) = [a for a in replayed.alerts if a.rule_id == "short-calls-low-and-slow"]
    add_review(data_dir, slow_alert.alert_id, "false_positive", "a test robot", "tester")

    first, last = stored_span(data_dir)
    report = backtest(
        data_dir, candidate, in_use, make_settings(data_dir).detection, first, last + 1
    )
    changes = {change.rule_id: change for change in report.rules}
    burst = changes["short-calls-caller"]
    assert (burst.current, burst.candidate) == (1, 2)
    assert [a.entity for a in burst.added] == ["8613900000002"] and not burst.removed
    # The first caller's burst is the same incident, raised at its 6th short call
    # rather than its 15th: 9 calls of 6 s earlier.
    ((old, new),) = burst.earlier
    assert old.entity == new.entity == "8613900000001" and not burst.later
    assert old.raised_at - new.raised_at == pytest.approx(54.0)
    assert report.removed_by_verdict() == {"false_positive": 1}
    # What the dropped rule raises now is gone with it.
    slow = changes["short-calls-low-and-slow"]
    assert (slow.current, slow.candidate) == (1, 0) and not slow.added
    assert [a.entity for a in slow.removed] == ["8613900000001"]
    assert {a.rule_id for a in report.added} == {"short-calls-caller"}
    assert {a.rule_id for a in report.removed} == {"short-calls-low-and-slow"}


def test_a_warm_up_starts_the_span_with_the_history_before_it(tmp_path: Path) -> None:
    events = tmp_path / "short.csv"
    # 20 short calls, one every 6 s: the shipped burst rule (15 in 3 min) fires at
    # the 15th. The span holds the last 10; the 10 before it are the warm-up's.
    short_calls(events, {"8613900000001": 20})
    data_dir = tmp_path / "data"
    in_use = burst_rules(tmp_path / "in-use")
    replay([events], make_settings(data_dir, detection={"rules_dir": str(in_use)}))
    first, last = stored_span(data_dir)
    since = first + 10 * 6 - 1
    detection = make_settings(data_dir).detection
    cold = backtest(data_dir, in_use, in_use, detection, since, last + 1)
    warm = backtest(data_dir, in_use, in_use, detection, since, last + 1, warmup_s=3600)

    def bursts(report: BacktestReport) -> list[Alert]:
        return [a for a in report.candidate if a.rule_id == "short-calls-caller"]

    assert bursts(cold) == []
    (alert,) = bursts(warm)
    assert alert.raised_at >= since
    assert (cold.warmup_events, warm.warmup_events) == (0, 30)
    assert warm.events == cold.events == 30
    assert [a.alert_id for a in warm.current] == [a.alert_id for a in warm.candidate]


def test_a_span_before_any_event_backtests_nothing(sample: tuple[Path, ReplayReport]) -> None:
    data_dir, _ = sample
    first, _ = stored_span(data_dir)
    detection = make_settings(data_dir).detection
    report = backtest(data_dir, RULES, RULES, detection, first - 86_400 * 3, first)
    assert report.events == 0 and report.current == [] and report.rules == []


def test_a_span_from_the_year_1_reads_only_the_stored_days(
    sample: tuple[Path, ReplayReport],
) -> None:
    # It read every empty day from the year 1 (minutes), and a warm-up reaching before
    # it ended in "year -8 is out of range".
    data_dir, replayed = sample
    detection = make_settings(data_dir).detection
    _, last = stored_span(data_dir)
    since = parse_time("0001-01-01", "--since")
    report = backtest(data_dir, RULES, RULES, detection, since, last + 1e-6)
    assert {a.alert_id for a in report.current} == {a.alert_id for a in replayed.alerts}
    assert report.events == replayed.stored - len(replayed.rejects)
    early = backtest(
        data_dir,
        RULES,
        RULES,
        detection,
        parse_time("0002-01-01", "--since"),
        parse_time("0002-02-01", "--until"),
        3650 * 86_400.0,
    )
    assert early.events == 0 and early.current == []


def test_the_command_prints_the_change_and_writes_every_alert(
    sample: tuple[Path, ReplayReport], tmp_path: Path
) -> None:
    data_dir, replayed = sample
    candidate = tmp_path / "rules"
    shutil.copytree(RULES, candidate)
    dropped = replayed.alerts[0].rule_id
    (candidate / f"{dropped}.yaml").unlink()
    out = tmp_path / "alerts.jsonl"
    done = run_cli(
        "rules", "backtest", str(candidate), "--against", str(RULES),
        "--data-dir", str(data_dir), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "both from a fresh start" in done.stdout
    assert f"removed ({sum(a.rule_id == dropped for a in replayed.alerts)}):" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["run"] for row in rows} == {"now", "with_change"}
    assert {row["change"] for row in rows if row["rule_id"] == dropped} == {"removed"}
    assert sum(row["run"] == "now" for row in rows) == len(replayed.alerts)


def test_the_command_says_what_is_wrong(sample: tuple[Path, ReplayReport], tmp_path: Path) -> None:
    data_dir, _ = sample
    broken = tmp_path / "broken"
    shutil.copytree(RULES, broken)
    (broken / "short-calls-caller.yaml").write_text("id: short-calls-caller\nseverity: huge\n")
    done = run_cli("rules", "backtest", str(broken), "--data-dir", str(data_dir))
    assert done.returncode == 2
    assert "short-calls-caller.yaml:" in done.stderr and "Traceback" not in done.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("rules", "backtest", "--data-dir", str(empty))
    assert done.returncode == 1
    assert "has no events table" in done.stderr and "Traceback" not in done.stderr

    # 2: a value the options cannot take, whatever the data; 1: the data refuses it.
    for option, value, says, code in (
        ("--since", "last tuesday", "--since 'last tuesday': not an ISO-8601", 2),
        ("--days", "0", "--days 0: must be more than 0", 2),
        ("--warmup", "soon", "--warmup: 'soon' is not a duration", 2),
        ("--until", "2020-01-01", "--until must be later than --since", 2),
        ("--since", "2099-01-01", "--since 2099-01-01 is after the last stored report (", 1),
    ):
        args = [option, value] + (["--since", "2021-01-01"] if option == "--until" else [])
        done = run_cli("rules", "backtest", "--data-dir", str(data_dir), *args)
        assert done.returncode == code, (option, done.stdout)
        assert says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("warmup_s", [0.0, 7200.0])
def test_the_change_run_in_a_process_of_its_own_raises_what_it_raises_here(
    warmup_s: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One read of the stored events for both rule sets: the change's rules in a forked
    # process, or here beside the rules in use; the same alerts, in parts of 1,000
    # stored reports over several days.
    events = tmp_path / "short.csv"
    short_calls(events, {f"86139000000{n:02d}": 20 + n for n in range(60)})
    data_dir = tmp_path / "data"
    in_use = burst_rules(tmp_path / "in-use")
    replay([events], make_settings(data_dir, detection={"rules_dir": str(in_use)}))
    monkeypatch.setattr(backtest_module, "PART_ROWS", 1000)
    candidate = tmp_path / "rules"
    shutil.copytree(in_use, candidate)
    rule = candidate / "short-calls-caller.yaml"
    rule.write_text(rule.read_text().replace("threshold: 15}", "threshold: 6}"))
    first, last = stored_span(data_dir)
    detection = make_settings(data_dir).detection
    since = first + 86400 * warmup_s / 7200 / 10

    def alerts(report: BacktestReport) -> tuple[list[str], list[str], int, int]:
        return (
            [a.alert_id for a in report.current],
            [a.alert_id for a in report.candidate],
            report.events,
            report.warmup_events,
        )

    runs = [
        alerts(backtest(data_dir, candidate, in_use, detection, since, last + 1, warmup_s, fork=f))
        for f in (False, *([True] if detectfork.available() else []))
    ]
    assert runs[0][0] and runs[0][1] != runs[0][0], "the change raises otherwise"
    assert all(run == runs[0] for run in runs)
