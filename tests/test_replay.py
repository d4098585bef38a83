"""Replay: event files through the same intake and store, bad rows quarantined with file:line."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.apps import detectfork
from engine.apps import replay as replay_module
from engine.apps.replay import replay
from engine.apps.settings import Settings
from engine.core.events import CallEvent, CallState, Reject, RejectReason
from engine.detect.calls import CallTracker
from engine.detect.pipeline import Pipeline
from engine.detect.rules import load_rules
from engine.ingest.codec import FieldError
from engine.ingest.eventfiles import (
    EventFileError,
    _epoch_seconds,
    parse_ts,
    read_event_file,
    read_event_files,
)
from engine.ingest.records import Item, pack_events, unpack_events
from engine.ingest.store import DataDirLock, StoreError
from engine.lake import parquet as lake_module
from engine.lake import writer as lakewriter_module
from engine.lake.views import ViewsFile
from engine.simulator.scenario import generate, load_scenario, write_files
from tests.conftest import make_settings

HEADER = "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"


def one_call(tmp_path: Path) -> Path:
    """A CSV of one call: it rings, and ends 5 s later."""
    csv = tmp_path / "a.csv"
    csv.write_text(
        HEADER
        + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n"
        + "2026-11-28T10:00:05+00:00,c1,3,bye,100,200,,7,Main\n"
    )
    return csv


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120
    )


def query(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_csv_jsonl_and_parquet_replay_in_event_time_order(tmp_path: Path) -> None:
    csv = tmp_path / "a.csv"
    csv.write_text(
        HEADER
        + "2026-11-28T10:00:05+00:00,c1,3,bye,100,200,,7,Main\n"
        + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n"
    )
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        json.dumps(
            {
                "ts": 1795860002.0,
                "call_id": "c1",
                "serial": 2,
                "state": "OK",
                "caller": "100",
                "callee": "200",
                "forward": None,
                "menu_id": "7",
                "menu_name": "Main",
            }
        )
        + "\n"
    )
    parquet = tmp_path / "c.parquet"
    pl.DataFrame(
        {
            "ts": ["2026-11-28T10:00:01+08:00"],
            "call_id": ["c2"],
            "serial": [1],
            "state": ["ringing"],
            "caller": ["300"],
            "callee": ["200"],
            "forward": [""],
            "menu_id": ["8"],
            "menu_name": ["客服"],
        }
    ).write_parquet(parquet)
    data_dir = tmp_path / "data"
    report = replay([csv, jsonl, parquet], make_settings(data_dir))
    assert report.clean and report.read == 4
    rows = query(
        data_dir, "SELECT call_id, serial, state, code, menu_name FROM events ORDER BY seq"
    )
    assert rows == [
        ("c2", 1, "RINGING", None, "客服"),
        ("c1", 1, "RINGING", 180, "Main"),
        ("c1", 2, "ANSWERED", None, "Main"),
        ("c1", 3, "HANGUP", None, "Main"),
    ]


def test_bad_rows_are_reported_with_file_and_line_and_quarantined(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text(
        HEADER
        + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n"
        + "2026-11-28T10:00:01,c1,2,OK,100,200,,7,Main\n"
        + "2026-11-28T10:00:02Z,c1,3,HUNGUP,100,200,,7,Main\n"
        + "yesterday,c1,4,bye,100,200,,7,Main\n"
        + "2026-11-28T10:00:03Z,,5,bye,100,200,,7,Main\n"
    )
    data_dir = tmp_path / "data"
    result = run_cli("replay", str(csv), "--data-dir", str(data_dir))
    assert result.returncode == 1, result.stderr
    assert "events.csv:3: bad_ts: ts '2026-11-28T10:00:01' has no UTC offset" in result.stderr
    assert "events.csv:4: bad_state: unknown state 'HUNGUP'" in result.stderr
    assert "events.csv:5: bad_ts:" in result.stderr
    assert "events.csv:6: bad_call_id: call_id is empty" in result.stderr
    assert "1 events stored, 4 rejected" in result.stdout
    rows = query(data_dir, "SELECT source, reason, epoch(ts) FROM rejects ORDER BY source")
    # A reject is at its own time when that parses; else at the last good row's.
    at = datetime(2026, 11, 28, 10, tzinfo=UTC).timestamp()
    assert rows == [
        ("events.csv:3", "bad_ts", at),
        ("events.csv:4", "bad_state", at + 2),
        ("events.csv:5", "bad_ts", at),
        ("events.csv:6", "bad_call_id", at + 3),
    ]


def test_replaying_the_same_file_twice_stores_each_report_once(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text(HEADER + "1795860000,c1,1,180,100,200,,7,Main\n1795860003,c1,2,ok,1,2,,7,M\n")
    data_dir = tmp_path / "data"
    first = run_cli("replay", str(csv), "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stderr
    second = run_cli("replay", str(csv), "--data-dir", str(data_dir))
    assert second.returncode == 0, second.stderr
    assert "0 events stored, 0 rejected, 2 duplicates skipped" in second.stdout
    assert query(data_dir, "SELECT count(*) FROM events") == [(2,)]


def test_a_second_replay_says_the_file_s_keyless_bad_rows_again(tmp_path: Path) -> None:
    # No call id and serial to know such a row by (README): quarantined and listed
    # again, so a second run shows what is still wrong with the file.
    csv = tmp_path / "events.csv"
    csv.write_text(HEADER + "1795860000,c1,1,180,100,200,,7,Main\nno fields here\n")
    data_dir = tmp_path / "data"
    for stored in (1, 0):
        done = run_cli("replay", str(csv), "--data-dir", str(data_dir))
        assert done.returncode == 1, done.stderr
        assert "events.csv:3: missing_fields: " in done.stderr
        assert f"{stored} events stored, 1 rejected" in done.stdout


def test_a_replay_stores_nothing_the_lake_holds_however_long_ago(tmp_path: Path) -> None:
    # The store remembers keys for the dedup horizon (here a minute) before its
    # latest report; a replay reaches back to the start of its files.
    rows = [f"{1795860000 + 20 * n},c{n},1,180,100,200,,7,Main\n" for n in range(30)]
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(HEADER + "".join(rows[:20]))
    second.write_text(HEADER + "".join(rows[10:]))  # ten stored ones, three minutes back
    settings = make_settings(
        tmp_path / "data", store={"dedup_horizon_s": 60}, detection={"alerts_jsonl": "off"}
    )
    assert replay([first], settings).stored == 20
    again = replay([first], settings)
    assert (again.stored, again.duplicates) == (0, 20)
    overlapping = replay([second], settings)
    assert (overlapping.stored, overlapping.duplicates) == (10, 10)
    assert query(tmp_path / "data", "SELECT count(*), count(DISTINCT call_id) FROM events") == [
        (30, 30)
    ]


def test_jsonl_lines_that_are_not_objects_are_rejected_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"ts": 1795860000, "call_id": "c1", "serial": 1, "state": "OK"}\n'
        "not json\n"
        "\n"
        "[1, 2]\n"
        '{"ts": true, "call_id": "c1", "serial": 2, "state": "OK"}\n'
    )
    items = read_event_file(path)
    assert isinstance(items[0], CallEvent)
    rejects = [item for item in items if isinstance(item, Reject)]
    assert [(r.source, r.reason) for r in rejects] == [
        ("e.jsonl:2", RejectReason.BAD_FIELD),
        ("e.jsonl:4", RejectReason.BAD_FIELD),
        ("e.jsonl:5", RejectReason.BAD_TS),
    ]
    assert rejects[2].key == ("c1", 2)


def test_a_lone_surrogate_escape_in_jsonl_is_quarantined_not_a_crash(tmp_path: Path) -> None:
    # "\\ud800" is valid JSON but half of a character: no UTF-8 store can hold it.
    path = tmp_path / "e.jsonl"
    row = {"ts": 1795860000, "call_id": "c1", "serial": 1, "state": "OK", "callee": "2"}
    lines = [
        json.dumps(row | {"caller": "8613800000001\ud800"}),
        json.dumps(row | {"call_id": "c2", "caller": "8613800000001", "menu_name": "主菜单"}),
        json.dumps(row | {"call_id": "c3", "caller": "1", "\udfff": "x"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    done = run_cli("replay", str(path), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "e.jsonl:1: bad_field: field 'caller' holds a lone surrogate \\ud800" in done.stderr
    assert "e.jsonl:3: bad_field: field '\\udfff' holds a lone surrogate" in done.stderr
    assert query(tmp_path / "data", "SELECT call_id, menu_name FROM events") == [("c2", "主菜单")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.txt", "whatever", "unknown event file type '.txt'"),
        ("x.csv", "a,b\n1,2\n", "missing columns ts, call_id, serial, state"),
        ("x.parquet", "not parquet", "cannot read as parquet"),
    ],
)
def test_unreadable_files_are_named_with_the_reason(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(EventFileError, match=message):
        read_event_file(path)


def test_cli_says_the_rejected_rows_in_the_order_of_the_file_s_lines(tmp_path: Path) -> None:
    # A bad row's time is the last good row's before it: in a file out of time order
    # the rejects are stored in another order than their lines.
    rows = [
        f"{1795860000 + 100 * (3 - n)},c{n},1,180,100,200,,7,Main\nbad row {n}\n" for n in range(3)
    ]
    csv = tmp_path / "events.csv"
    csv.write_text(HEADER + "".join(rows))
    result = run_cli("replay", str(csv), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    said = [line.split(":")[1] for line in result.stderr.splitlines() if "events.csv:" in line]
    assert said == ["3", "5", "7"]


def test_cli_reports_a_missing_file_and_exits_non_zero(tmp_path: Path) -> None:
    present = tmp_path / "a.csv"
    present.write_text(HEADER + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n")
    missing = tmp_path / "nope.csv"
    result = run_cli("replay", str(present), str(missing), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert result.stderr == f"callsentry: no such file: {missing}; nothing was replayed\n"
    assert not (tmp_path / "d").exists()
    # A name the system refuses to look up is the reader's to say, as any unreadable file.
    too_long = tmp_path / ("x" * 300 + ".csv")
    result = run_cli("replay", str(present), str(too_long), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert "1 of 2 files unreadable" in result.stderr and "a bug" not in result.stderr


def test_cli_says_when_the_files_hold_no_rows(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text(HEADER)
    result = run_cli("replay", str(empty), str(header), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert f"{empty}, {header}: no rows to replay (empty, or a header alone)" in result.stderr
    assert "replayed 0 rows" in result.stdout
    one = tmp_path / "one.csv"
    one.write_text(HEADER + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n")
    result = run_cli("replay", str(empty), str(one), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0 and "no rows to replay" not in result.stderr


def test_a_replay_stopped_by_its_rules_touches_no_data_dir(tmp_path: Path) -> None:
    # The views process is started before the rules are read: told nothing, it writes
    # nothing, and the data dir is not made.
    csv = tmp_path / "a.csv"
    csv.write_text(HEADER + "2026-11-28T10:00:00Z,c1,1,180,100,200,,7,Main\n")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("id: bad\nno_such_key: 1\n")
    data_dir = tmp_path / "d"
    result = run_cli("replay", str(csv), "--data-dir", str(data_dir), "--rules", str(rules))
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "Traceback" not in result.stderr
    assert not data_dir.exists()
    # ...as its help says, beside the exit codes of rows rejected and files unreadable.
    said = " ".join(run_cli("replay", "--help").stdout.split())
    assert "2: the rules or the settings are invalid (nothing was replayed)" in said


def test_a_views_file_that_cannot_be_written_is_said_after_the_rows_are_stored(
    tmp_path: Path,
) -> None:
    # The views file is written by a process of its own while replay stores the rows.
    csv = one_call(tmp_path)
    data_dir = tmp_path / "d"
    (data_dir / "callsentry.duckdb").mkdir(parents=True)
    (data_dir / "callsentry.duckdb" / "in-the-way").write_text("")
    result = run_cli("replay", str(csv), "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    assert f"views file {data_dir / 'callsentry.duckdb'}" in result.stderr
    assert "what was stored stays" in result.stderr
    events = pl.read_parquet(data_dir / "lake" / "events" / "day=*" / "*.parquet")
    assert sorted(events["serial"].to_list()) == [1, 3]
    # With the way clear, the same replay again stores nothing twice and publishes it.
    (data_dir / "callsentry.duckdb" / "in-the-way").unlink()
    (data_dir / "callsentry.duckdb").rmdir()
    again = run_cli("replay", str(csv), "--data-dir", str(data_dir))
    assert again.returncode == 0, again.stderr
    assert "2 duplicates skipped" in again.stdout
    assert query(data_dir, "SELECT count(*) FROM events") == [(2,)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1795860000, 1795860000.0),
        ("1795860000.5", 1795860000.5),
        ("2026-11-28T10:00:00+00:00", 1795860000.0),
        ("2026-11-28T18:00:00+08:00", 1795860000.0),
        ("2026-11-28T10:00:00Z", 1795860000.0),
    ],
)
def test_ts_forms(value: object, expected: float) -> None:
    assert parse_ts(value) == expected


@pytest.mark.parametrize("value", ["2026-11-28 10:00:00", "", "nan", "-5", None, True, "1e400"])
def test_bad_ts(value: object) -> None:
    with pytest.raises(FieldError):
        parse_ts(value)


MIXED_ROWS = [
    ("2026-11-03T08:00:00.123456+00:00", "a1", "1", "180", "8613800000001", "400800", "", "1", "M"),
    ("2026-11-03T08:00:01Z", "a1", "2", "OK", "8613800000001", "400800", "", "1", "M"),
    ("2026-11-03 09:00:02+01:00", "a1", "3", "Bye", "8613800000001", "400800", "", "1", "M"),
    ("1793692803.25", "a2", "1", "ANSWERED", "8613800000002", "400800", "+88213", "2", "菜单"),
    (" 1793692804 ", "a2", "2", " hangup ", "8613800000002", "400800", "+88213", "2", "菜单"),
    ("2026-11-03T08:00:05", "a3", "1", "180", "8613800000003", "400800", "", "1", "M"),
    ("yesterday", "a4", "1", "180", "8613800000004", "400800", "", "1", "M"),
    ("-5", "a5", "1", "180", "8613800000005", "400800", "", "1", "M"),
    ("2026-11-03T08:00:06+00:00", "", "1", "180", "8613800000006", "400800", "", "1", "M"),
    ("2026-11-03T08:00:07+00:00", "a7", "x", "180", "8613800000007", "400800", "", "1", "M"),
    ("2026-11-03T08:00:08+00:00", "a8", "1", "Busy", "8613800000008", "400800", "", "1", "M"),
    ("2026-11-03T08:00:09+00:00", "a9", "1", "183", None, None, None, None, None),
    ("1e30", "a10", "1", "180", "8613800000010", "400800", "", "1", "M"),
    ("nan", "a11", "1", "180", "8613800000011", "400800", "", "1", "M"),
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_column_wise_reading_agrees_with_row_by_row_validation(fmt: str, tmp_path: Path) -> None:
    # Files are read column-wise for speed; each row must come out exactly as the
    # row-by-row validator (the one datagrams and JSON lines go through) makes it.
    from engine.ingest.eventfiles import _items_of_rows

    columns = ["ts", "call_id", "serial", "state", "caller", "callee", "forward", "menu_id",
               "menu_name"]  # fmt: skip
    frame = pl.DataFrame(MIXED_ROWS, schema=columns, orient="row")
    path = tmp_path / f"mixed.{fmt}"
    frame.write_csv(path) if fmt == "csv" else frame.write_parquet(path)
    fast = read_event_file(path)
    first = 2 if fmt == "csv" else 1
    slow = _items_of_rows(
        ((n, dict(zip(columns, row, strict=True))) for n, row in enumerate(MIXED_ROWS, first)),
        path.name,
    )
    assert fast == slow
    kinds = [type(item).__name__ for item in fast]
    assert kinds.count("CallEvent") == 6 and kinds.count("Reject") == 8


# Times where polars' round(6) and Python's round(ts, 6) disagree by a microsecond:
# digits past the microsecond, and times past 2^32 s (found by the csv fuzz target, as
# a file read in parts that was not the file read whole).
_AWKWARD_TIMES: list[object] = [
    "2206-11-02T14:00:00.385+00:00",
    "1912923437.7565895",
    "3784870617.3633934",
    "92297589.8782645",
    "7473823200.385",
    "2026-11-03T08:00:00.123456+00:00",
    "1795860000",
]


@pytest.mark.parametrize(
    ("fmt", "times"),
    [
        ("csv", _AWKWARD_TIMES),
        ("parquet", _AWKWARD_TIMES),
        ("parquet", [1912923437.7565895, 92297589.8782645, 7473823200.385, 1795860000.25]),
    ],
)
def test_column_wise_times_are_the_row_by_row_parsers_to_the_microsecond(
    fmt: str, times: list[object], tmp_path: Path
) -> None:
    frame = pl.DataFrame(
        {
            "ts": times,
            "call_id": [f"c{n}" for n in range(len(times))],
            **{c: ["1"] * len(times) for c in ("serial", "menu_id")},
            "state": ["OK"] * len(times),
            **{c: ["100"] * len(times) for c in ("caller", "callee", "forward", "menu_name")},
        }
    )
    path = tmp_path / f"times.{fmt}"
    frame.write_csv(path) if fmt == "csv" else frame.write_parquet(path)
    items = read_event_file(path)
    assert [getattr(item, "ts", None) for item in items] == [parse_ts(t) for t in times]


def test_times_with_milliseconds_are_taken_column_wise_exactly() -> None:
    # A third of such times were a last bit off column-wise (divided by a reciprocal),
    # so the row-by-row parser remade them: right, but a Python call per row.
    texts = [f"2026-11-03T08:00:{n // 1000:02d}.{n % 1000:03d}+00:00" for n in range(0, 60_000, 7)]
    expected = [parse_ts(text) for text in texts]
    from_text = _epoch_seconds(pl.Series(texts))
    moments = pl.Series(texts).str.to_datetime(time_zone="UTC", time_unit="us")
    from_datetimes = _epoch_seconds(moments)
    assert from_text.null_count() == 0 and from_datetimes.null_count() == 0
    assert from_text.to_list() == expected and from_datetimes.to_list() == expected


def test_a_csv_reject_keeps_the_same_row_whichever_path_reads_it(tmp_path: Path) -> None:
    # Columns of its own and in its own order: read column-wise (every row one good
    # line) or row by row (a short row elsewhere in the file), a reject's raw row holds
    # the same columns in the same order (found by the csv fuzz target, as a file read in
    # parts that was not the file read whole).
    header = "menu_name,extra,ts,call_id,serial,state,caller,callee,forward,menu_id\n"
    bad = "M,x,2026-11-03T08:00:00+00:00,\x16a1,1,180,100,200,,7\n"
    short = "M,x,2026-11-03T08:00:01+00:00\n"
    column_wise, row_by_row = tmp_path / "fast.csv", tmp_path / "slow.csv"
    column_wise.write_text(header + bad)
    row_by_row.write_text(header + bad + short)
    fast, slow = read_event_file(column_wise), read_event_file(row_by_row)
    assert isinstance(fast[0], Reject) and isinstance(slow[0], Reject)
    assert json.loads(slow[0].raw) == json.loads(fast[0].raw)
    assert list(json.loads(slow[0].raw)) == list(json.loads(fast[0].raw))
    same = ("ts", "reason", "detail", "raw", "call_id", "serial")
    assert [getattr(slow[0], f) for f in same] == [getattr(fast[0], f) for f in same]


_FILE_ROWS = st.lists(
    # (seconds after the first, what is wrong with the row: nothing, its state, its
    # time, or nothing but a time polars does not read: Python's ISO-8601 with a space)
    st.tuples(st.integers(0, 6), st.sampled_from(["", "", "", "state", "ts", "space"])),
    max_size=6,
)


@given(files=st.lists(_FILE_ROWS, min_size=1, max_size=3), ordered=st.booleans())
@settings(max_examples=150, deadline=None)
def test_rows_of_several_files_come_out_in_event_time_order(
    files: list[list[tuple[int, str]]], ordered: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Files already in order are checked column-wise rather than row by row (a reject
    # there takes the time of the good row before it, or 0 at a file's start); any
    # way, the rows are those of each file, file after file, sorted by time (stable).
    folder = tmp_path_factory.mktemp("files")
    paths = []
    for number, rows in enumerate(files):
        if ordered:
            rows = sorted(rows)
        times = {
            "ts": lambda at: "soon",
            "space": lambda at: datetime.fromtimestamp(1795860000 + at, UTC).isoformat(" "),
        }
        lines = [
            f"{times.get(wrong, lambda at: 1795860000 + at)(at)},c{number}-{n},1,"
            f"{'Busy' if wrong == 'state' else 'ok'},100,200,,7,Main\n"
            for n, (at, wrong) in enumerate(rows)
        ]
        path = folder / f"f{number}.csv"
        path.write_text(HEADER + "".join(lines))
        paths.append(path)
    items, errors = read_event_files(paths)
    assert not errors
    expected = sorted(
        (item for path in paths for item in read_event_file(path)), key=lambda i: i.ts
    )
    assert items == expected


_PADDING = st.sampled_from([" ", "\t", "\x1c", "\xa0", "\u3000", "\x85", "\x00", "x"])
_CALL_IDS = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8),
    st.sampled_from(["a" * 127, "a" * 128, "a" * 129, "é" * 70, "a b", "a\x7fb", "ид"]),
)
_SERIALS = st.one_of(
    st.integers(0, 10**20).map(str),
    st.sampled_from(["", "007", "-1", "1.0", "٣", "²", "1 2", "9" * 18, "9" * 19]),
)
_STATES = st.sampled_from(
    ["180", "183", "Ringing", "RINGING", "rInGiNg", "OK", "ok", "Ok", "200", "Bye", "BYE",
     "Answered", "HANGUP", "hangup", "Busy", "", "O K"]
)  # fmt: skip
_TIMES = st.sampled_from(
    ["1793692800.5", "1793692801", "2026-11-03T08:00:05+00:00", " 1793692802", "yesterday", ""]
)
_ROWS = st.tuples(
    _TIMES,
    _CALL_IDS,
    _SERIALS,
    _STATES,
    st.lists(st.text(max_size=6), min_size=5, max_size=5),
    # Which field (0-7; more: none) gets padding, the padding, before or after.
    st.tuples(st.integers(0, 11), _PADDING, st.booleans()),
)


@given(rows=st.lists(_ROWS, min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_rows_taken_as_they_are_agree_with_validating_each(
    rows: list[tuple[str, str, str, str, list[str], tuple[int, str, bool]]],
) -> None:
    # Rows whose fields need no stripping or closer look skip the validator: for any
    # mix of padding, call ids, serials, state spellings and bad times (a reject takes
    # the time of the last good row before it) the result is the same.
    from engine.ingest.eventfiles import _items_of_frame, _items_of_rows

    columns = ["ts", "call_id", "serial", "state", "caller", "callee", "forward", "menu_id",
               "menu_name"]  # fmt: skip
    table = []
    for ts, call_id, serial, state, texts, (where, pad, before) in rows:
        fields = [call_id, serial, state, *texts]
        if where < len(fields):
            fields[where] = pad + fields[where] if before else fields[where] + pad
        table.append((ts, *fields))
    frame = pl.DataFrame(table, schema=columns, orient="row")
    fast = _items_of_frame(frame, "rows", 1)
    slow = _items_of_rows(
        ((n, dict(zip(columns, row, strict=True))) for n, row in enumerate(table, 1)), "rows"
    )
    assert fast == slow


_READ_ITEMS = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 5), st.integers(1, 2), st.floats(0.0, 9.0)).map(
            lambda r: CallEvent(
                r[2], f"c{r[0]}", r[1], CallState.RINGING, 180, "1", "2", "", "1", "M", "x:1"
            )
        ),
        st.tuples(st.integers(0, 5), st.booleans(), st.floats(0.0, 9.0)).map(
            lambda r: Reject(
                r[2], RejectReason.BAD_STATE, "bad", b"raw", f"c{r[0]}" if r[1] else None, 1
            )
        ),
    ),
    max_size=30,
)


@given(
    items=_READ_ITEMS,
    stored=st.sets(st.integers(0, 5), max_size=3),
    room=st.integers(1, 40),
    split=st.integers(0, 30),
)
@settings(max_examples=400, deadline=None)
def test_offering_rows_read_at_once_is_offering_each(
    items: list[CallEvent | Reject], stored: set[int], room: int, split: int
) -> None:
    # Replay offers a batch of rows at once (in two runs here: the second meets the
    # first's keys still waiting for their commit); it must take what offering them
    # one by one takes: duplicates (stored already, waiting, or earlier in the run),
    # quarantined rows with and without a key, and a full intake. Runs of new
    # reports only are taken whole, the rest row by row.
    from engine.ingest.intake import Intake, SeenReports
    from engine.ingest.records import record_of
    from engine.ingest.stats import Stats

    intakes = []
    for at_once in (False, True):
        seen = SeenReports(3600)
        seen.add_batch([(f"c{n}", 1) for n in stored], 1.0)
        intake = Intake(Stats(), seen, max_pending=room, unkeyed_per_minute=3)
        if at_once:
            first = split % (len(items) + 1)
            intake.offer_read(items[:first], record_of)
            intake.offer_read(iter(items[first:]), record_of)
        else:
            for item in items:
                intake.offer(item.key, None, record_of(item), item.ts)
        intakes.append(intake)
    each, at_once = intakes
    assert at_once.open.records == each.open.records and at_once.open.keys == each.open.keys
    assert at_once._waiting == each._waiting and at_once.next_seq == each.next_seq
    assert at_once.stats == each.stats and at_once._latest_ts == each._latest_ts


# -- detection in a forked process ------------------------------------------------------


def _replay_in(data_dir: Path, files: list[Path], forked: bool | str) -> dict[str, object]:
    """`forked`: detection in a process forked once it is loaded (True), in this one
    (False), or ("loading") in one forked before it is, as the command line does."""
    settings = make_settings(data_dir, detection={"alerts_jsonl": "off"})
    reports = []
    for path in files:
        if forked == "loading":
            reports.append(
                replay([path], settings, loading=detectfork.start_loading(settings, None))
            )
        else:
            reports.append(replay([path], settings, detect_in_child=bool(forked)))
    calls = query(data_dir, "SELECT * EXCLUDE (day) FROM calls ORDER BY call_id")
    return {
        "alerts": [a.as_json() for report in reports for a in report.alerts],
        "stored": [report.stored for report in reports],
        "rejects": [len(report.rejects) for report in reports],
        "duplicates": [report.duplicates for report in reports],
        "calls": calls,
        "events": query(data_dir, "SELECT count(*), max(seq) FROM events"),
    }


def _small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments of 1,000 reports, written to the lake three at a time when forked:
    the demo makes several groups and a last one that is not full."""
    monkeypatch.setattr(replay_module, "REPLAY_BATCH", 1000)
    monkeypatch.setattr(replay_module, "GROUP_SEGMENTS", 3)


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_detection_in_a_forked_process_gives_what_detecting_in_process_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_groups(monkeypatch)
    generated = generate(load_scenario(Path("data/scenarios/demo.yaml")))
    events_path, _ = write_files(generated, tmp_path / "demo", "parquet")
    frame = pl.read_parquet(events_path)
    half = frame.height // 2
    bad = frame.head(1).with_columns(
        pl.lit("Hold").alias("state"), pl.lit("bad-1").alias("call_id")
    )
    # The first file repeats some of its own rows (duplicates within a segment) and
    # has a bad row; the second repeats 200 rows of the first (stored by the earlier
    # run) and 200 of its own, and goes on from the first one's snapshot.
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    pl.concat([frame.head(half), frame.slice(100, 300), bad]).write_parquet(first)
    pl.concat([frame.slice(half - 200, 400), frame.slice(half)]).write_parquet(second)

    forked = _replay_in(tmp_path / "forked", [first, second], forked=True)
    in_process = _replay_in(tmp_path / "in-process", [first, second], forked=False)
    loading = _replay_in(tmp_path / "loading", [first, second], forked="loading")
    assert forked == in_process
    assert loading == in_process
    assert forked["alerts"], "the demo raises alerts"
    assert forked["rejects"] == [1, 0]
    assert forked["duplicates"] == [300, 400]


def _alerts_of_replay(path: Path, settings: Settings, early: bool) -> list[dict[str, Any]]:
    loading = detectfork.start_loading(settings, None) if early else None
    report = replay([path], settings, detect_in_child=False, loading=loading)
    return [a.as_json() for a in report.alerts]


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_detection_loaded_before_a_lake_that_went_past_its_snapshot_is_loaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A snapshot older than the lake (a crash between snapshots) is caught up from the
    # lake by the lake writer at its start: the state the early detection process
    # restored from it alone is not whole, and replay loads detection again itself.
    _small_groups(monkeypatch)
    generated = generate(load_scenario(Path("data/scenarios/demo.yaml")))
    events_path, _ = write_files(generated, tmp_path / "demo", "parquet")
    frame = pl.read_parquet(events_path)
    third = frame.height // 3
    parts = [tmp_path / f"part{n}.parquet" for n in range(3)]
    for n, part in enumerate(parts):
        frame.slice(n * third, third if n < 2 else None).write_parquet(part)
    outcomes = []
    for way in ("loading", "in-process"):
        data_dir = tmp_path / way
        settings = make_settings(data_dir, detection={"alerts_jsonl": "off"})
        early = way == "loading"
        run = functools.partial(_alerts_of_replay, settings=settings, early=early)
        run(parts[0])
        snapshot = data_dir / "state" / "detection.snapshot"
        older = snapshot.read_bytes()
        run(parts[1])
        snapshot.write_bytes(older)
        caplog.clear()
        with caplog.at_level("INFO", logger="engine.apps.replay"):
            alerts = run(parts[2])
        calls = query(data_dir, "SELECT * EXCLUDE (day) FROM calls ORDER BY call_id")
        outcomes.append((alerts, calls))
        if way == "loading":
            assert "the lake holds reports after the detection snapshot" in caplog.text
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1], "the demo's calls are rebuilt"


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_the_views_file_is_written_while_the_detection_process_forked_early_runs(
    tmp_path: Path,
) -> None:
    # The views process reads its request to the end of its input: the detection
    # process, forked after it started, must not hold that input open.
    settings = make_settings(tmp_path / "data")
    views = ViewsFile()
    loading = detectfork.start_loading(settings, None, views.pipe_ends())
    assert loading is not None
    try:
        lake = lake_module.Lake(settings.store.data_dir)
        lake.prepare()
        views.publish(lake.data_dir, lake.view_statements())
        waited = threading.Thread(target=views.wait, daemon=True)
        waited.start()
        waited.join(60)
        assert not waited.is_alive(), "the views file waited for the detection process"
        assert (lake.data_dir / "callsentry.duckdb").exists()
    finally:
        loading.close()
        views.close()


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_an_unusable_snapshot_is_left_alone_until_replay_holds_the_data_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = one_call(tmp_path)
    settings = make_settings(tmp_path / "data")
    replay([csv], settings)
    snapshot = settings.store.data_dir / "state" / "detection.snapshot"
    snapshot.write_bytes(b"CALLSENTRY-DETECTION-SNAPSHOT v9\n")
    # Another process holds the data dir: replay is refused, and the snapshot, which
    # is that process's, stays where it is.
    holder = DataDirLock(settings.store.data_dir)
    holder.acquire()
    try:
        with pytest.raises(StoreError, match="in use"):
            replay([csv], settings, loading=detectfork.start_loading(settings, None))
    finally:
        holder.release()
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["detection.snapshot"]
    # Held by replay, it is set aside there, and detection starts cold.
    with caplog.at_level("INFO"):
        report = replay([csv], settings, loading=detectfork.start_loading(settings, None))
    assert report.duplicates == 2
    assert "the detection snapshot could not be used" in caplog.text
    assert "is unusable" in caplog.text
    names = sorted(p.name for p in snapshot.parent.iterdir())
    assert names[0] == "detection.snapshot" and names[1].startswith("detection.snapshot.corrupt-")


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_a_long_replay_holds_a_bounded_number_of_rows_whatever_the_files_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 300 rows, segments of 500, written to the lake two at a time: while
    # it stores, replay holds the group's rows, the parts read ahead and the part it
    # stores, never the whole file.
    monkeypatch.setattr(replay_module, "REPLAY_BATCH", 500)
    monkeypatch.setattr(replay_module, "GROUP_SEGMENTS", 2)
    held: list[int] = []
    remember = replay_module._remember_stored

    def counts_the_rows(*args: Any) -> None:
        gc.collect()
        held.append(sum(1 for o in gc.get_objects() if type(o) is CallEvent))
        remember(*args)

    monkeypatch.setattr(replay_module, "_remember_stored", counts_the_rows)
    generated = generate(load_scenario(Path("data/scenarios/demo.yaml")))
    events_path, _ = write_files(generated, tmp_path / "demo", "csv")
    del generated
    gc.collect()
    report = replay(
        [events_path], make_settings(tmp_path / "data"), detect_in_child=True, part_bytes=20_000
    )
    assert report.stored == report.read > 8000
    assert len(held) > 10
    group = 2 + replay_module.SEGMENTS_AHEAD
    bound = (group + 1) * 500 + (replay_module.PARTS_IN_FLIGHT + 3) * 400
    assert 0 < max(held) <= bound < report.read


def _lake_tables(data_dir: Path) -> dict[str, object]:
    return {
        "events": query(data_dir, "SELECT * EXCLUDE (day) FROM events ORDER BY seq"),
        "calls": query(data_dir, "SELECT * EXCLUDE (day) FROM calls ORDER BY call_id"),
        "alerts": query(data_dir, "SELECT * EXCLUDE (day) FROM alerts ORDER BY alert_id"),
    }


class _Crash(Exception):
    pass


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
@pytest.mark.parametrize("crash", ["before the calls", "after the last segment went"])
def test_a_replay_that_dies_writing_a_group_is_made_whole_once_by_the_next_start(
    crash: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay writes many journal segments to the lake as one group, then lets them go,
    the last one first. Dying before the group is whole, its files go and the
    journal is written again; dying after its last segment went, the group stands
    and the rest of its journal goes. Either way every row is there once."""
    monkeypatch.setattr(replay_module, "REPLAY_BATCH", 1000)
    # The whole replay one group: dying in it, detection's state dies too, and the
    # next start detects the journal's segments from the same (empty) state.
    monkeypatch.setattr(replay_module, "GROUP_SEGMENTS", 50)
    generated = generate(load_scenario(Path("data/scenarios/demo.yaml")))
    events_path, _ = write_files(generated, tmp_path / "demo", "parquet")
    clean = make_settings(tmp_path / "clean", detection={"alerts_jsonl": "off"})
    replay([events_path], clean, detect_in_child=True)

    settings = make_settings(tmp_path / "data", detection={"alerts_jsonl": "off"})
    journal = tmp_path / "data" / "journal"
    with monkeypatch.context() as patch:
        if crash == "before the calls":
            write_group = lake_module.Lake.write_group

            def dies_at_the_calls(lake: lake_module.Lake, *args: object, **kw: object) -> int:
                if args[2] == []:  # no reports: the calls and alerts
                    raise _Crash
                return write_group(lake, *args, **kw)  # type: ignore[arg-type]

            patch.setattr(lake_module.Lake, "write_group", dies_at_the_calls)
        else:

            def dies_after_the_first_unlink(directory: Path) -> None:
                raise _Crash

            patch.setattr(lakewriter_module, "fsync_dir", dies_after_the_first_unlink)
        with pytest.raises(_Crash):
            replay([events_path], settings, detect_in_child=True)
    left = sorted(p.name for p in journal.glob("*.sealed"))
    assert len(left) >= 3, "several segments were left in the journal"
    groups = lake_module.Lake(tmp_path / "data").groups()
    assert len(groups) == 1
    _, last = groups[0]
    assert (f"{last:012d}.sealed" in left) == (crash == "before the calls")

    # The next start (here a replay of nothing) finds what was left.
    again = replay([], settings)
    assert again.stored == (len(generated.events) if crash == "before the calls" else 0)
    assert not list(journal.glob("*.sealed"))
    assert _lake_tables(tmp_path / "data") == _lake_tables(tmp_path / "clean")


def _demo_pipeline() -> Pipeline:
    return Pipeline(load_rules(Path("rules")).rules, CallTracker())


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_a_failure_in_the_detection_process_is_reported_with_its_traceback() -> None:
    process = detectfork.DetectionProcess(_demo_pipeline(), None)
    try:
        process.submit(["not a step"])  # type: ignore[list-item]
        with pytest.raises(detectfork.DetectionProcessError, match="Traceback"):
            process.result()
    finally:
        process.close()


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_a_finished_detection_process_answers_what_it_was_asked_and_ends() -> None:
    process = detectfork.DetectionProcess(_demo_pipeline(), None)
    try:
        process.submit([1.0])
        process.finish()
        columns, alerts = process.result()
        assert alerts == [] and len(columns["call_id"]) == 0
        process._process.join(10)
        assert process._process.exitcode == 0
        with pytest.raises(detectfork.DetectionProcessError, match="after finish"):
            process.submit([2.0])
    finally:
        process.close()


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_a_killed_detection_process_is_reported_not_waited_for() -> None:
    process = detectfork.DetectionProcess(_demo_pipeline(), None)
    try:
        pid = process._process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        process._process.join(10)
        with pytest.raises(detectfork.DetectionProcessError, match="killed by signal 9"):
            process.submit([1.0])
            process.result()
    finally:
        process.close()


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_a_hung_detection_process_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    process = detectfork.DetectionProcess(_demo_pipeline(), None)
    try:
        pid = process._process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        monkeypatch.setattr(detectfork, "ANSWER_TIMEOUT_S", 0.5)
        monkeypatch.setattr(detectfork, "_JOIN_TIMEOUT_S", 0.5)
        process.submit([1.0])
        with pytest.raises(detectfork.DetectionProcessError, match=r"no answer in 0\.5 s"):
            process.result()
    finally:
        process.close()  # kills it: a stopped process does not take the request to stop


@pytest.mark.skipif(not detectfork.available(), reason="fork is Linux-only here")
def test_segments_are_queued_for_the_detection_process_while_it_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More than the pipe holds is handed over while the child cannot take any of it:
    # the parent goes on reading and journaling rather than waiting for the child.
    monkeypatch.setattr(detectfork, "ANSWER_TIMEOUT_S", 60.0)
    events = generate(load_scenario(Path("data/scenarios/demo.yaml"))).events
    segments = [events[start : start + 2000] for start in range(0, 8000, 2000)]
    process = detectfork.DetectionProcess(_demo_pipeline(), None)
    pid = process._process.pid
    assert pid is not None
    # The pipe is a socket pair: what its two ends buffer, four times over.
    with socket.socket(fileno=os.dup(process._conn.fileno())) as end:
        holds = end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + end.getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF
        )
    rounds = 1
    while rounds * sum(len(pack_events(segment)) for segment in segments) < 4 * holds:
        rounds += 1
    segments = segments * rounds
    failed: list[BaseException] = []

    def submit_all() -> None:
        try:
            for n, segment in enumerate(segments):
                process.submit([(1 + 2000 * n, pack_events(segment))])
        except BaseException as error:
            failed.append(error)

    submitting = threading.Thread(target=submit_all)
    try:
        os.kill(pid, signal.SIGSTOP)
        submitting.start()
        submitting.join(20)
        assert not submitting.is_alive(), "a submit waited for the stopped child"
        assert failed == []
        os.kill(pid, signal.SIGCONT)
        answers = [process.result() for _ in segments]
    finally:
        os.kill(pid, signal.SIGCONT)
        process.close()
        submitting.join()
    # What the child found is what the same pipeline finds in process.
    here = _demo_pipeline()
    for segment, (columns, alerts) in zip(segments, answers, strict=True):
        output = here.feed(segment)
        assert columns["call_id"] == [call.call_id for call in output.calls]
        assert alerts == output.alerts


@given(
    rows=st.lists(
        st.tuples(
            st.booleans(),
            st.floats(0, 4e9),
            st.text(max_size=5),
            st.integers(0, 10**20),
            st.sampled_from(list(CallState)),
            st.none() | st.integers(100, 699),
            st.booleans(),
        ),
        max_size=30,
    )
)
@settings(max_examples=200, deadline=None)
def test_reports_packed_for_the_detection_process_come_back_as_they_were(
    rows: list[tuple[bool, float, str, int, CallState, int | None, bool]],
) -> None:
    items: list[Item] = [
        CallEvent(ts, text, serial, state, code, text, "2", "", "m", text, "f:1", text, check)
        if event
        else Reject(ts, RejectReason.BAD_FIELD, text, b"raw", text, serial)
        for event, ts, text, serial, state, code, check in rows
    ]
    events = [item._replace(source="") for item in items if type(item) is CallEvent]
    assert unpack_events(pack_events(items)) == events


def test_a_long_replay_logs_how_far_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text(HEADER + "1795860000,c1,1,180,100,200,,7,Main\n1795860003,c1,2,ok,1,2,,7,M\n")
    monkeypatch.setattr(replay_module, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(replay_module, "REPLAY_BATCH", 1)
    with caplog.at_level(logging.INFO, logger="engine.apps.replay"):
        replay([csv], make_settings(tmp_path / "data"))
        replay([csv], make_settings(tmp_path / "again"), progress=replay_module.Progress(2))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("replay: ")]
    # CSV: how many rows the files hold is not known before they are read.
    assert len(lines) == 4
    assert re.fullmatch(r"replay: 2 rows, \d+ rows/s, 0 alerts so far", lines[1])
    assert re.fullmatch(r"replay: 1 of 2 rows \(50 %\), \d+ rows/s, 0 alerts so far", lines[2])


def test_a_replay_says_what_detections_bounds_evicted_wherever_detection_ran(
    tmp_path: Path,
) -> None:
    # 1,100 calls ringing at once, each from a caller of its own: past 1,000 calls in
    # progress and 100 entities a rule keeps, the lowest bounds settings allow.
    path = tmp_path / "crowd.csv"
    path.write_text(
        HEADER
        + "".join(
            f"{1795860000 + n / 1000:.3f},crowd-{n},1,180,caller-{n},200,,7,m\n"
            for n in range(1100)
        )
    )
    bounds = {"max_keys_per_rule": 100, "max_open_calls": 1000, "alerts_jsonl": "off"}
    evicted = []
    for forked in [False, *([True] if detectfork.available() else [])]:
        settings = make_settings(tmp_path / f"data-{forked}", detection=bounds)
        evicted.append(replay([path], settings, detect_in_child=forked).evicted)
    assert evicted[0].keys > 0 and evicted[0].calls >= 100
    assert all(each == evicted[0] for each in evicted)

    environ = {
        **os.environ,
        "CALLSENTRY_DETECTION__MAX_KEYS_PER_RULE": "100",
        "CALLSENTRY_DETECTION__MAX_OPEN_CALLS": "1000",
        "CALLSENTRY_DETECTION__ALERTS_JSONL": '"off"',
    }
    result = subprocess.run(
        [sys.executable, "-m", "engine", "replay", str(path), "--data-dir", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"evicted: {evicted[0].keys} entities from rule state "
        f"(detection.max_keys_per_rule 100), {evicted[0].calls} calls in progress "
        "(detection.max_open_calls 1000)"
    ) in result.stdout


def test_the_progress_bar_draws_rows_rate_and_alerts(capsys: pytest.CaptureFixture[str]) -> None:
    # What a terminal shows during a long replay (rich is loaded only here).
    from engine.apps.progress import ProgressBar

    bar = ProgressBar(1_000)
    bar.at(500, 3)
    bar.close()
    drawn = capsys.readouterr().err
    assert "500/1000" in drawn and "rows/s" in drawn and "3 alerts" in drawn


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_row_longer_than_a_report_is_oversized_as_live_has_it(
    tmp_path: Path, suffix: str
) -> None:
    # Live refused a 3,000-character menu name as an oversized datagram; replay stored it.
    from engine.ingest.codec import MAX_DATAGRAM_BYTES, Vos3000TextCodec

    rows = [
        ("2026-12-05T10:00:00Z", "big-1", "1", "RINGING", "8613800000001", "4001", "", "12",
         "M" * 3000),
        ("2026-12-05T10:00:01Z", "ok-1", "1", "RINGING", "8613800000001", "4001", "", "12", "Main"),
        # 2,100 bytes in UTF-8, 1,400 in GBK: a report a switch sending GBK could send.
        ("2026-12-05T10:00:02Z", "gbk-1", "1", "RINGING", "8613800000001", "4001", "", "12",
         "菜" * 700),
        # Spaces to strip: the row takes the slow path, and is refused there too.
        ("2026-12-05T10:00:03Z", "big-2", "1", " ringing ", "8613800000001", "4001", "", "12",
         "菜" * 1100),
    ]  # fmt: skip
    columns = HEADER.strip().split(",")
    frame = pl.DataFrame([dict(zip(columns, row, strict=True)) for row in rows])
    path = tmp_path / f"events{suffix}"
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".jsonl":
        frame.write_ndjson(path)
    else:
        frame.write_parquet(path)
    items = read_event_file(path)
    assert [type(item).__name__ for item in items] == ["Reject", "CallEvent", "CallEvent", "Reject"]
    for rejected in (items[0], items[3]):
        assert isinstance(rejected, Reject)
        assert rejected.reason is RejectReason.OVERSIZED
        assert f"over the {MAX_DATAGRAM_BYTES}-byte limit" in rejected.detail
        assert rejected.call_id in ("big-1", "big-2") and rejected.serial == 1
    live = Vos3000TextCodec().decode(",".join(rows[0][1:]).encode(), 0.0)
    assert isinstance(live.item, Reject) and live.item.reason is RejectReason.OVERSIZED


def test_a_field_that_is_no_text_or_number_is_refused_not_rewritten(tmp_path: Path) -> None:
    # `menu_name: true` was stored as 'True', an object as Python's repr of it.
    path = tmp_path / "events.jsonl"
    rows = [
        {"menu_name": True},
        {"callee": 4001.0, "menu_id": 7},  # numbers: as they are written, whole without .0
        {"caller": {"x": 1}},
        {"forward": [1, 2]},
    ]
    lines = [
        json.dumps(
            {"ts": f"2026-12-05T10:00:0{n}Z", "call_id": f"c{n}", "serial": 1,
             "state": "RINGING", "caller": "8613800000001", "callee": "4001",
             "forward": "", "menu_id": "1", "menu_name": "Main", **changed}
        )
        for n, changed in enumerate(rows)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    items = read_event_file(path)
    assert [type(item).__name__ for item in items] == ["Reject", "CallEvent", "Reject", "Reject"]
    said = [item.detail for item in items if isinstance(item, Reject)]
    assert said == [
        "menu_name: bool true is not text or a number",
        'caller: dict {"x": 1} is not text or a number',
        "forward: list [1, 2] is not text or a number",
    ]
    event = items[1]
    assert isinstance(event, CallEvent) and (event.callee, event.menu_id) == ("4001", "7")
