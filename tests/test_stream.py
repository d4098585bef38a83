"""Streaming replay: event files read in parts give what reading them whole gives, and a
replay stores and raises the same whatever the part sizes and however a file is split."""

from __future__ import annotations

import codecs
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.apps.replay import replay
from engine.core.events import CallEvent
from engine.ingest.eventfiles import (
    EventFileError,
    EventStream,
    _row_cut,
    _row_end,
    file_parts,
    read_event_file,
    read_event_files,
)
from engine.simulator.scenario import generate, load_scenario, write_files
from tests.conftest import make_settings

HEADER = b"ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
SCENARIOS = sorted(Path("data/scenarios").glob("*.yaml"))


def _line(at: int, n: int, state: str = "ok") -> bytes:
    return f"{1795860000 + at},c{n},1,{state},100,200,,7,Main\n".encode()


# Lines of a CSV file, good and bad: a quoted field running over two lines, a quote
# never closed, bytes that are not UTF-8, a blank line, too few and too many fields,
# a bad state, a bad time, a CRLF line end.
_CSV_LINES = st.one_of(
    st.builds(_line, st.integers(0, 50), st.integers(0, 9)),
    st.builds(_line, st.integers(0, 50), st.integers(0, 9), st.just("Busy")),
    st.sampled_from(
        [
            b'1795860001,"c\nq",1,ok,100,200,,7,Main\n',
            b'1795860002,"never closed,1,ok,100,200,,7,Main\n',
            b"1795860003,c\xff,1,ok,100,200,,7,Main\n",
            b"\n",
            b"1795860004,c1,1,ok\n",
            b"1795860005,c1,1,ok,100,200,,7,Main,extra\n",
            b"soon,c2,1,ok,100,200,,7,Main\n",
            b"1795860006,c3,1,ok,100,200,,7,Main\r\n",
            b'1795860007,"c,4",1,ok,"1""00",200,,7,"Main"\n',
            b"2026-1-02T14:00:25+00:00,c5,1,ok,100,200,,7,Main\n",
            b'1795860008,c6,1,ok,100,200,40",7,Main\n',
            b"2026-11-02T14:00:25.25+00:00,c5,1,ok,100,200,,7,Main\n",
        ]
    ),
)


@given(lines=st.lists(_CSV_LINES, max_size=40), part_bytes=st.integers(1, 400), bom=st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_csv_file_read_in_parts_is_the_file_read_whole(
    lines: list[bytes], part_bytes: int, bom: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Each part is cut where a row ends as the row-by-row reader reads the whole file
    # (a quote may hold a row open across lines): rejects keep their true file:line,
    # and a part with a bad row falls back to row by row alone. A byte-order mark
    # before the header (spreadsheets write one) changes nothing.
    folder = tmp_path_factory.mktemp("csv")
    path = folder / "events.csv"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + HEADER + b"".join(lines))
    whole = read_event_file(path)
    if bom:
        plain = folder / "plain" / "events.csv"
        plain.parent.mkdir()
        plain.write_bytes(HEADER + b"".join(lines))
        assert whole == read_event_file(plain)
    parts = list(file_parts(path, part_bytes=part_bytes))
    assert [item for part in parts for item in part] == whole
    small = list(file_parts(path, part_bytes=part_bytes, first_small=True))
    assert [item for part in small for item in part] == whole


def test_a_byte_order_mark_is_no_part_of_the_first_column_or_line(tmp_path: Path) -> None:
    # Read row by row (a bad row), the BOM named the first column "\ufeffts" and the
    # whole file was refused for want of a ts column; a JSON-lines file's first line
    # was rejected as no JSON.
    csv_file = tmp_path / "events.csv"
    csv_file.write_bytes(codecs.BOM_UTF8 + HEADER + _line(0, 1) + b"1795860001,c2,1,ok\n")
    first, bad = read_event_file(csv_file)
    assert type(first) is CallEvent and first.call_id == "c1"
    assert type(bad).__name__ == "Reject" and bad.source == "events.csv:3"
    json_file = tmp_path / "events.jsonl"
    json_file.write_bytes(codecs.BOM_UTF8 + b'{"ts": 1795860000, "call_id": "c1", "serial": 1, '
                          b'"state": "ok", "caller": "100", "callee": "200"}\n')  # fmt: skip
    (event,) = read_event_file(json_file)
    assert type(event) is CallEvent and event.call_id == "c1"
    # Bytes that only begin like a mark are no mark: not UTF-8, not an empty file.
    json_file.write_bytes(codecs.BOM_UTF8[:2])
    with pytest.raises(EventFileError, match="not UTF-8"):
        read_event_file(json_file)


def test_a_bad_row_in_one_part_leaves_the_other_parts_on_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = [_line(n, n) for n in range(300)]
    rows[250] = b"1795860250,c250,1,ok\n"  # too few fields: line 252
    path.write_bytes(HEADER + b"".join(rows))
    parts = list(file_parts(path, part_bytes=2000))
    assert len(parts) > 5
    items = [item for part in parts for item in part]
    assert items == read_event_file(path)
    (reject,) = [item for item in items if type(item).__name__ == "Reject"]
    assert reject.source == "events.csv:252"
    assert [item.source for item in items[:3]] == ["events.csv:2", "events.csv:3", "events.csv:4"]


def test_a_header_name_with_spaces_names_its_column_in_every_part(tmp_path: Path) -> None:
    # Read whole, a bad byte sends the file row by row, whose header names are stripped;
    # its first part has no bad byte and was read column-wise, where "call_id\v" named
    # no column: the parts failed where the whole file did not.
    path = tmp_path / "events.csv"
    header = HEADER.replace(b"call_id,", b"call_id\x0b,").replace(b"ts,", b" ts ,")
    path.write_bytes(header + b"".join(_line(n, n) for n in range(20)) + b"1795860099,c\xff,1\n")
    whole = read_event_file(path)
    assert len(whole) == 21 and whole[0].source == "events.csv:2"
    parts = list(file_parts(path, part_bytes=200))
    assert len(parts) > 2
    assert [item for part in parts for item in part] == whole


@pytest.mark.parametrize("end", [b"\r", b"\r\n", b'"\r"\n'])
def test_a_header_line_ends_in_every_part_where_it_ends_read_whole(
    tmp_path: Path, end: bytes
) -> None:
    # The row reader's lines end at \n, \r\n or a lone \r (bytes.splitlines); a part's
    # header was cut at the first \n alone, so a lone \r in the header line made the
    # parts' header another line than the whole file's.
    path = tmp_path / "events.csv"
    header = HEADER.rstrip(b"\n").replace(b"menu_name", b'"menu_name') + end
    if not end.startswith(b'"'):
        header = header.replace(b'"menu_name', b"menu_name")
    path.write_bytes(header + b"".join(_line(n, n) for n in range(20)))
    whole = read_event_file(path)
    parts = list(file_parts(path, part_bytes=200))
    # A quote the header line leaves open runs on past every part's end: one part.
    assert len(parts) > 2 or end.startswith(b'"')
    assert [item for part in parts for item in part] == whole


@pytest.mark.parametrize("part_bytes", [150, 200, 250])
def test_a_header_ended_by_a_lone_cr_numbers_every_part_s_lines_as_read_whole(
    tmp_path: Path, part_bytes: int
) -> None:
    # Joined to a part whose first line is empty, the header's CR and that line's LF
    # read as one line end (CRLF), and the part's lines were numbered one short.
    path = tmp_path / "events.csv"
    header = HEADER.rstrip(b"\n") + b"\r"
    path.write_bytes(header + b"".join(_line(n, n) + b"\n" * 30 for n in range(20)) + b"bad\n")
    whole = read_event_file(path)
    assert whole[-1].source == "events.csv:622"
    parts = list(file_parts(path, part_bytes=part_bytes))
    assert len(parts) > 2
    assert [item for part in parts for item in part] == whole


def test_a_quote_inside_an_unquoted_field_splits_the_row_as_the_row_reader_does(
    tmp_path: Path,
) -> None:
    # To the row reader (csv) a quote opens a quoted field only at a field's start;
    # polars, after a quoted field, may read on to the next quote. A row with such a
    # quote and a comma after it has as many fields either way, so counting fields
    # alone let polars read a part holding it, its last two fields as one.
    path = tmp_path / "events.csv"
    odd = b'1795860001,c2,1,ok,100,200,"",7$"Sales, desk"\n'
    path.write_bytes(HEADER + b"bad\n" + (_line(5, 5) + odd + _line(6, 6)) * 8)
    whole = read_event_file(path)
    odd_rows = [item for item in whole if isinstance(item, CallEvent) and item.call_id == "c2"]
    assert {(item.menu_id, item.menu_name) for item in odd_rows} == {('7$"Sales', 'desk"')}
    parts = list(file_parts(path, part_bytes=200))
    assert len(parts) > 2
    assert [item for part in parts for item in part] == whole


def test_a_header_quoted_as_the_readers_name_differently_reads_in_parts_as_whole(
    tmp_path: Path,
) -> None:
    # `""ts` is `ts` to the row reader (an empty quoted field, then text) and another
    # name to polars: a part read column-wise missed its ts column.
    path = tmp_path / "events.csv"
    header = HEADER.replace(b"ts,", b'""ts,', 1)
    path.write_bytes(header + b"".join(_line(n, n) for n in range(20)))
    whole = read_event_file(path)
    assert len(whole) == 20 and all(isinstance(item, CallEvent) for item in whole)
    parts = list(file_parts(path, part_bytes=200))
    assert len(parts) > 2
    assert [item for part in parts for item in part] == whole


def test_a_time_the_row_parser_refuses_is_refused_column_wise_too(tmp_path: Path) -> None:
    # polars reads "2026-1-02" (a one-digit month) as a time; Python's fromisoformat,
    # the row parser's, does not: a clean file (read column-wise) and the same row in
    # a part read row by row must say the same.
    path = tmp_path / "events.csv"
    rows = [b"2026-11-02T14:00:0%d.5+00:00,c%d,1,ok,100,200,,7,Main\n" % (n, n) for n in range(3)]
    rows.append(b"2026-1-02T14:00:25+00:00,c9,1,ok,100,200,,7,Main\n")
    path.write_bytes(HEADER + b"".join(rows))
    items = read_event_file(path)
    assert [type(item).__name__ for item in items] == ["CallEvent"] * 3 + ["Reject"]
    assert items[3].reason.value == "bad_ts" and items[3].source == "events.csv:5"


@pytest.mark.parametrize("bad", [b"", b"c\xff"])
def test_a_header_naming_a_column_twice_is_refused_by_every_reader(
    tmp_path: Path, bad: bytes
) -> None:
    # Read row by row the last call_id held the value, column-wise the first: neither
    # is certain, so the file is refused, whichever path reads it (a bad byte sends
    # the whole file row by row).
    path = tmp_path / "events.csv"
    rows = b"".join(b"1795860%03d,c%d,1,ok,100,200,,7,Main,x%d\n" % (n, n, n) for n in range(30))
    path.write_bytes(HEADER.rstrip(b"\n") + b",call_id\n" + rows + bad)
    for read in (read_event_file, lambda p: list(file_parts(p, part_bytes=300))):
        with pytest.raises(EventFileError, match="names call_id more than once"):
            read(path)


def test_a_quote_inside_an_unquoted_field_opens_nothing_on_either_path(tmp_path: Path) -> None:
    # `40"` is a character of its field to the csv module and polars; the row reader
    # took any odd count of quotes for an open field and swallowed the next lines.
    rows = [_line(n, n) for n in range(5)]
    rows[2] = b'1795860002,c2,1,ok,100,200,40",7,Main\n'
    clean, bad = tmp_path / "clean.csv", tmp_path / "bad.csv"
    clean.write_bytes(HEADER + b"".join(rows))
    bad.write_bytes(HEADER + b"".join(rows) + b"1795860009,c\xff,1\n")  # row by row
    fast, slow = read_event_file(clean), read_event_file(bad)
    assert [type(item).__name__ for item in fast] == ["CallEvent"] * 5
    assert fast[2].forward == '40"' and fast[3].source == "clean.csv:5"
    assert [(i.call_id, i.forward) for i in slow[:5]] == [(i.call_id, i.forward) for i in fast]


def test_a_lone_cr_ends_a_line_column_wise_as_row_by_row(tmp_path: Path) -> None:
    # polars reads a header ended by a lone CR and the row after it as one line (a
    # header of 17 names and no row); the row reader, as bytes.splitlines, as two.
    path = tmp_path / "events.csv"
    path.write_bytes(HEADER.rstrip(b"\n") + b"\r" + _line(0, 0).rstrip(b"\n"))
    (event,) = read_event_file(path)
    assert type(event).__name__ == "CallEvent" and event.source == "events.csv:2"


@given(
    rows=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=60),
    part_rows=st.integers(1, 25),
    fmt=st.sampled_from(["parquet", "jsonl"]),
)
@settings(max_examples=100, deadline=None)
def test_parquet_and_json_lines_read_in_parts_are_the_file_read_whole(
    rows: list[tuple[int, bool]],
    part_rows: int,
    fmt: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    frame = pl.DataFrame(
        {
            "ts": [str(1795860000 + at) if good else "soon" for at, good in rows],
            "call_id": [f"c{n}" for n in range(len(rows))],
            "serial": [1] * len(rows),
            "state": ["ok"] * len(rows),
        },
        schema={"ts": pl.String, "call_id": pl.String, "serial": pl.Int64, "state": pl.String},
    )
    path = tmp_path_factory.mktemp("rows") / f"events.{fmt}"
    if fmt == "parquet":
        frame.write_parquet(path, row_group_size=7)
    else:
        frame.write_ndjson(path)
    whole = read_event_file(path)
    for first_small in (False, True):
        parts = list(file_parts(path, part_rows=part_rows, first_small=first_small))
        assert [item for part in parts for item in part] == whole


_ORDERED_FILE = st.lists(st.integers(0, 40), max_size=30).map(sorted)


@given(
    files=st.lists(_ORDERED_FILE, min_size=1, max_size=4),
    part_bytes=st.integers(30, 600),
)
@settings(max_examples=150, deadline=None)
def test_files_in_event_time_order_stream_as_they_read_whole(
    files: list[list[int]], part_bytes: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Merged across files in event-time order, file order breaking ties: exactly the
    # rows read_event_files sorts, and nothing late.
    folder = tmp_path_factory.mktemp("files")
    paths = []
    for number, times in enumerate(files):
        path = folder / f"f{number}.csv"
        path.write_bytes(
            HEADER + b"".join(_line(at, 100 * number + n) for n, at in enumerate(times))
        )
        paths.append(path)
    whole, errors = read_event_files(paths)
    stream = EventStream(paths, part_bytes=part_bytes)
    assert [item for part in stream for item in part] == whole
    assert stream.late == 0 and stream.rows == len(whole) and errors == stream.errors == []


def test_a_file_out_of_order_across_parts_comes_out_whole_with_the_late_rows_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.csv"
    times = [*range(100, 200), *range(0, 50)]  # the last 50 rows belong before the rest
    path.write_bytes(HEADER + b"".join(_line(at, n) for n, at in enumerate(times)))
    stream = EventStream([path], part_bytes=1000)
    rows = [item for part in stream for item in part]
    assert Counter(rows) == Counter(read_event_file(path))
    assert stream.late == 50
    # Within reach of a part, order is restored: a single part is sorted whole.
    assert [item for part in EventStream([path]) for item in part] == read_event_files([path])[0]


def test_many_files_are_read_a_small_first_part_each(tmp_path: Path) -> None:
    # Every file is started (any may hold the earliest row), but only a small part of
    # each waits for its turn.
    paths = []
    for day in range(6):
        path = tmp_path / f"day{day}.parquet"
        pl.DataFrame(
            {
                "ts": [1795860000.0 + 86400 * day + n for n in range(5000)],
                "call_id": [f"d{day}-{n}" for n in range(5000)],
                "serial": [1] * 5000,
                "state": ["ok"] * 5000,
            }
        ).write_parquet(path)
        paths.append(path)
    stream = EventStream(paths, part_rows=2000)
    sizes = [len(part) for part in stream]
    assert sum(sizes) == 30_000 and max(sizes) <= 2000
    assert [item for part in EventStream(paths, 2000) for item in part] == read_event_files(paths)[
        0
    ]


def _tables(data_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    """The tables, less the file a report was read from (its source "file:line")."""
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return {
            table: con.execute(
                f"SELECT * EXCLUDE (day{', source' if table in ('events', 'rejects') else ''}) "
                f"FROM {table} ORDER BY ALL"
            ).fetchall()
            for table in ("events", "rejects", "calls", "alerts")
        }


@pytest.mark.parametrize("scenario_path", SCENARIOS, ids=lambda p: p.stem)
def test_a_replay_stores_and_raises_the_same_whatever_its_parts_and_files(
    scenario_path: Path, tmp_path: Path
) -> None:
    # The scenario read as one part (as a replay read every file before streaming),
    # in parts of 997 rows, and split into three files (a row in two of them: a
    # duplicate; the split not at a part's end) read in parts of 1,500: the same
    # events, calls, alerts and rejects, and the same alerts reported.
    generated = generate(load_scenario(scenario_path))
    events_path, _ = write_files(generated, tmp_path / "scenario", "parquet")
    frame = pl.read_parquet(events_path)
    third = frame.height // 3
    split = [tmp_path / f"split{n}.parquet" for n in range(3)]
    frame.head(third + 1).write_parquet(split[0])
    frame.slice(third, third).write_parquet(split[1])
    frame.slice(2 * third).write_parquet(split[2])

    def run(name: str, paths: list[Path], part_rows: int) -> tuple[object, ...]:
        data_dir = tmp_path / name
        report = replay(paths, make_settings(data_dir), part_rows=part_rows)
        return (
            report.stored,
            report.calls,
            [alert.alert_id for alert in report.alerts],
            _tables(data_dir),
        )

    whole = run("whole", [events_path], 10**9)
    assert whole[2] or scenario_path.stem == "lookalikes", "the scenario raises alerts"
    assert run("parts", [events_path], 997) == whole
    assert run("split", split, 1500) == whole


def test_a_replay_finds_what_the_lake_holds_day_by_day_a_part_at_a_time(tmp_path: Path) -> None:
    # Four days of rows, a day's worth apart from the horizon: the first replay stores
    # days 0-2, the second (days 1-3, in parts of 40 rows) only day 3, its copies of
    # days 1 and 2 found in their day partitions, however long ago they were stored.
    def day_rows(day: int) -> list[bytes]:
        return [_line(86400 * day + 60 * n, 1000 * day + n) for n in range(100)]

    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_bytes(HEADER + b"".join(row for day in (0, 1, 2) for row in day_rows(day)))
    second.write_bytes(HEADER + b"".join(row for day in (1, 2, 3) for row in day_rows(day)))
    settings = make_settings(tmp_path / "data")
    assert replay([first], settings, part_bytes=2000).stored == 300
    again = replay([second], settings, part_rows=40, part_bytes=2000)
    assert (again.stored, again.duplicates) == (100, 200)
    assert replay([first, second], settings, part_bytes=3000).stored == 0


def _row_cut_line_by_line(body: bytes) -> int:
    # Where the rows end as `_row_end` finds them, line after line.
    lines = body.splitlines(keepends=True)
    index = offset = cut = 0
    while index < len(lines):
        end = _row_end(lines, index)
        if end is None:
            return cut
        offset += sum(len(line) for line in lines[index:end])
        index, cut = end, offset
    return cut


_LINE_BITS = ["a", ",", '"', '""', ',"', '",', 'b"c', " ", "é", "\x00", "\r", "\r\n", "\n"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from(["a", ",", '"', " ", "é", "\x00", "\r", "\r\n", "\n"]), max_size=12
        )
        .map("".join)
        .map(lambda line: line.encode("utf-8") + b"\n"),
        min_size=1,
        max_size=8,
    ).map(b"".join)
)
@example(b'b"c,"d\ne\n')  # even quotes, yet the second opens a quoted field
@example(b'a,40"\nb\n')  # an odd quote inside an unquoted field opens nothing
def test_a_parts_cut_is_where_the_rows_end_line_by_line(body: bytes) -> None:
    # Lines matched whole in C where every line is a row of its own; else line by line.
    assert _row_cut(body) == _row_cut_line_by_line(body)
