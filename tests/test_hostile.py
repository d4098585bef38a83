"""Hostile input: rule files that try to exhaust the engine, templates that would crash
it, and text from the network that would rewrite a reviewer's terminal or a log."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.alerts.sinks import LogSink
from engine.core.text import check_template, csv_cell, shown
from engine.core.yamlfile import YamlFileError
from engine.detect.alerts import Alert
from engine.detect.rules import load_rules
from engine.detect.schema import SUMMARY_FIELDS

RULES = Path(__file__).resolve().parent.parent / "rules"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120
    )


def rules_folder_with(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_an_alias_bomb_in_the_rules_folder_is_refused_with_its_line(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x]"] + [
        f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)
    ]
    folder = rules_folder_with(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    done = run_cli("rules", "validate", str(folder))
    assert done.returncode == 1
    assert f"{folder}/bomb.yaml:2: aliases (*a0) are not accepted" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("placeholder", "reason"),
    [
        ("{entity.nope}", "only plain names are accepted"),
        ("{entitty}", "unknown placeholder {entitty}"),
        ("{entity[0]}", "only plain names are accepted"),
        ("{0}", "name a field"),
        ("{value!r}", "conversions (!r) are not accepted"),
        ("{value:.2f}", "does not apply to text"),
        ("{entity", "write a literal brace as {{ or }}"),
    ],
)
def test_a_summary_naming_what_an_alert_lacks_is_refused_at_validation(
    tmp_path: Path, placeholder: str, reason: str
) -> None:
    text = (RULES / "short-calls-caller.yaml").read_text(encoding="utf-8")
    summary_line = next(
        n for n, line in enumerate(text.splitlines(), 1) if line.startswith("summary:")
    )
    text = text.replace("caller {entity} made", f"caller {placeholder} made")
    folder = rules_folder_with(tmp_path, "short-calls-caller.yaml", text)
    with pytest.raises(YamlFileError) as caught:
        load_rules(folder)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{folder}/short-calls-caller.yaml:{summary_line}: summary: ")
    assert reason in problem


def test_every_shipped_summary_names_known_fields_only() -> None:
    for rule in load_rules(RULES).rules.rules:
        if rule.spec.summary is not None:
            check_template(rule.spec.summary, SUMMARY_FIELDS)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("threshold: 8", "threshold: .nan", "finite number"),
        ("threshold: 8", "threshold: .inf", "finite number"),
        ("threshold: 8", "threshold: -1e308", "greater than or equal to -1000000000"),
        ("window: 5m", "window: .nan", "not a finite duration"),
        ("window: 5m", "window: .inf", "not a finite duration"),
        ("window: 5m", "window: 100000000d", "longer than 3650 days"),
    ],
)
def test_numbers_in_a_rule_are_finite_and_in_range(
    tmp_path: Path, old: str, new: str, reason: str
) -> None:
    text = (RULES / "short-calls-caller.yaml").read_text(encoding="utf-8")
    assert old in text
    folder = rules_folder_with(tmp_path, "short-calls-caller.yaml", text.replace(old, new))
    with pytest.raises(YamlFileError) as caught:
        load_rules(folder)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{folder}/short-calls-caller.yaml:")
    assert reason in problem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
        ("\x07\x00\x7f\x9b", "\\x07\\x00\\x7f\\x9b"),
        ("\u202eevil", "\\u202eevil"),
        ("\u200f\u061c\ufeff", "\\u200f\\u061c\\ufeff"),
        ("\x1b]8;;http://x\x1b\\link", "\\x1b]8;;http://x\\x1b\\link"),
        ("主菜单 Menú", "主菜单 Menú"),
    ],
)
def test_control_and_reordering_characters_are_shown_escaped(raw: str, expected: str) -> None:
    assert shown(raw) == expected


@pytest.mark.parametrize("lead", ["=", "+", "-", "@"])
def test_a_csv_cell_never_starts_a_formula(lead: str) -> None:
    assert csv_cell(f"{lead}1+1") == f"'{lead}1+1"
    assert csv_cell("8613800000001") == "8613800000001"


def test_the_alert_log_line_cannot_be_forged(caplog: pytest.LogCaptureFixture) -> None:
    alert = Alert(
        alert_id="a1",
        rule_id="short-calls-caller",
        detector="rule",
        severity="high",
        entity_type="caller",
        entity="861\nALERT forged [critical] all clear",
        window_start=0.0,
        window_end=1.0,
        raised_at=1.0,
        value=15.0,
        threshold=15.0,
        summary="caller 861\nALERT forged [critical] all clear\x1b[2J made 15 calls",
        evidence=["c1"],
        rule_version="v",
    )
    with caplog.at_level(logging.WARNING, logger="engine.alerts.sinks"):
        LogSink().deliver([alert])
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "\x1b" not in message
    assert "861\\x0aALERT forged" in message


def test_network_text_reaches_the_reviewers_terminal_escaped(tmp_path: Path) -> None:
    caller = "8613900000001\x1b[2J\x1b]0;owned\x07"
    events = tmp_path / "events.jsonl"
    with events.open("w", encoding="utf-8") as out:
        # Ordinary callers first: the short-call rule compares a caller with them.
        for n in range(60):
            for serial, state, at in (
                (1, "180", n * 2),
                (2, "OK", n * 2 + 3),
                (3, "BYE", n * 2 + 60),
            ):
                row = {"ts": 1_789_999_000 + at, "call_id": f"calm-{n}", "serial": serial,
                       "state": state, "caller": f"86138{n:08d}", "callee": "4008001000",
                       "forward": "", "menu_id": "1", "menu_name": "Main"}  # fmt: skip
                out.write(json.dumps(row) + "\n")
        for n in range(20):
            start = 1_790_000_000 + n * 5
            for serial, state, at in (
                (1, "180", start),
                (2, "OK", start + 3),
                (3, "BYE", start + 5),
            ):
                row = {
                    "ts": at,
                    "call_id": f"hostile-{n}",
                    "serial": serial,
                    "state": state,
                    "caller": caller,
                    "callee": "4008001000",
                    "forward": "",
                    "menu_id": "1",
                    "menu_name": "Main\x1b[31m menu\nALERT forged",
                }
                out.write(json.dumps(row) + "\n")
    data = tmp_path / "data"
    replayed = run_cli("replay", str(events), "--data-dir", str(data))
    assert replayed.returncode == 0, replayed.stderr
    assert "short-calls-caller" in replayed.stdout
    listed = run_cli("alerts", "list", "--data-dir", str(data))
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if "short-calls-caller" in line)
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "8613900000001\\x1b[2J\\x1b]0;owned\\x07" in line
    alert_id = line.split()[0]
    show = run_cli("alerts", "show", alert_id, "--data-dir", str(data))
    assert show.returncode == 0, show.stderr
    assert "\x1b" not in show.stdout and "\x07" not in show.stdout
    assert "8613900000001\\x1b[2J\\x1b]0;owned\\x07 -> 4008001000" in show.stdout
    for output in (replayed.stdout, replayed.stderr):
        assert "\x1b" not in output


# -- event files: one bad row costs that row ---------------------------------------------

CSV_HEADER = "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"


def csv_row(n: int, menu_name: str = "Main") -> str:
    return f"2026-11-28T10:00:{n % 60:02d}+00:00,c{n},1,180,100{n},200,,7,{menu_name}\n"


def events_and_rejects(path: Path) -> tuple[int, list[tuple[str, str, str]]]:
    from engine.core.events import CallEvent
    from engine.ingest.eventfiles import read_event_file

    items = read_event_file(path)
    events = sum(1 for item in items if isinstance(item, CallEvent))
    rejects = [
        (item.source, item.reason.value, item.detail)
        for item in items
        if not isinstance(item, CallEvent)
    ]
    return events, rejects


@pytest.mark.parametrize(
    ("bad", "reason", "detail"),
    [
        ("2026-11-28T10:00:00+00:00,x,1,180,1,2,,7,Main,extra\n", "bad_field", "10 fields"),
        ("2026-11-28T10:00:00+00:00,x,1,180\n", "missing_fields", "4 fields"),
    ],
)
def test_a_row_with_the_wrong_number_of_fields_costs_that_row_alone(
    tmp_path: Path, bad: str, reason: str, detail: str
) -> None:
    path = tmp_path / "events.csv"
    rows = [csv_row(n) for n in range(1000)]
    rows[500] = bad
    path.write_text(CSV_HEADER + "".join(rows), encoding="utf-8")
    events, rejects = events_and_rejects(path)
    assert events == 999
    ((source, got_reason, got_detail),) = rejects
    assert (source, got_reason) == ("events.csv:502", reason)
    assert detail in got_detail


def test_a_line_that_is_not_utf8_costs_that_line_alone(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = [csv_row(n).encode() for n in range(1000)]
    rows[10] = rows[10].replace(b"Main", b"M\xffin")
    path.write_bytes(CSV_HEADER.encode() + b"".join(rows))
    events, rejects = events_and_rejects(path)
    assert events == 999
    assert [(s, r) for s, r, _ in rejects] == [("events.csv:12", "undecodable")]


def test_rows_after_a_quoted_field_across_lines_keep_their_true_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = [csv_row(n) for n in range(20)]
    rows[3] = csv_row(3, '"Main\nmenu, second line"')
    rows[10] = "2026-11-28T10:00:10+00:00,c10,1,RINGRING,1,2,,7,Main\n"
    path.write_text(CSV_HEADER + "".join(rows), encoding="utf-8")
    events, rejects = events_and_rejects(path)
    assert events == 19
    # Row 10 starts on line 13: the header, ten rows before it, one of them two lines.
    assert [(s, r) for s, r, _ in rejects] == [("events.csv:13", "bad_state")]


def test_an_unclosed_quote_swallows_no_more_than_one_report(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = [csv_row(n) for n in range(100)]
    rows[40] = csv_row(40, '"Main')
    path.write_text(CSV_HEADER + "".join(rows), encoding="utf-8")
    events, rejects = events_and_rejects(path)
    assert events == 99
    assert rejects == [("events.csv:42", "bad_field", "a quoted field is never closed")]


def test_a_parquet_column_of_lists_or_bytes_is_refused_by_name(tmp_path: Path) -> None:
    import polars as pl

    from engine.ingest.eventfiles import EventFileError, read_event_file

    row = {
        "ts": ["2026-11-28T10:00:00+00:00"],
        "call_id": ["c1"],
        "serial": [1],
        "state": ["180"],
        "callee": ["200"],
        "forward": [""],
        "menu_id": ["7"],
        "menu_name": ["Main"],
    }
    for name, values in (("caller", [[1, 2]]), ("caller", [b"\x1b[2J"])):
        path = tmp_path / "events.parquet"
        pl.DataFrame({**row, name: values}).write_parquet(path)
        with pytest.raises(EventFileError, match=rf"{path}: column {name} holds"):
            read_event_file(path)


def test_empty_csv_and_jsonl_files_are_alike_no_rows(tmp_path: Path) -> None:
    for name in ("empty.csv", "empty.jsonl"):
        path = tmp_path / name
        path.write_bytes(b"")
        assert events_and_rejects(path) == (0, [])
        done = run_cli("replay", str(path), "--data-dir", str(tmp_path / f"data-{name}"))
        assert done.returncode == 0, (name, done.stderr)


def test_a_data_dir_whose_path_holds_a_quote_works(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV_HEADER + "".join(csv_row(n) for n in range(5)), encoding="utf-8")
    data = tmp_path / "it's data"
    done = run_cli("replay", str(path), "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    import duckdb

    with duckdb.connect(str(data / "callsentry.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events").fetchone() == (5,)
