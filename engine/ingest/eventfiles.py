"""Event files (CSV, JSONL, Parquet) -> `CallEvent`s and `Reject`s, sorted by event time.

Columns per docs/protocol.md ("Event files"): ts (ISO-8601 with a UTC offset, or epoch seconds),
call_id, serial, state, caller, callee, forward, menu_id, menu_name. A bad row
becomes a `Reject` whose source names the file and line; a file that cannot be
read at all raises `EventFileError` naming the file and why.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import csv
import functools
import io
import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, cast

import polars as pl

from engine.core.events import (
    MAX_CALL_ID_BYTES,
    MAX_SERIAL_DIGITS,
    STATE_TOKENS,
    CallEvent,
    Reject,
    RejectReason,
)
from engine.ingest import native
from engine.ingest.codec import (
    MAX_DATAGRAM_BYTES,
    FieldError,
    make_file_event,
    parse_call_id,
    parse_serial,
)

_TS = operator.itemgetter(0)

COLUMNS = (
    "ts",
    "call_id",
    "serial",
    "state",
    "caller",
    "callee",
    "forward",
    "menu_id",
    "menu_name",
)
REQUIRED = ("ts", "call_id", "serial", "state")
# Read where a file has it (an export of the events table), "" where it has not.
OPTIONAL = ("switch",)
KEPT = (*COLUMNS, *OPTIONAL)
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class EventFileError(Exception):
    """A whole event file cannot be read; the message names the file and why."""


def _iso(text: str) -> datetime | None:
    """ISO-8601 with an offset, or None when it is not ISO-8601 at all."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        raise FieldError(RejectReason.BAD_TS, f"ts {text!r} has no UTC offset (write +00:00 or Z)")
    return moment


def parse_ts(value: Any) -> float:
    """Epoch seconds (number or numeric text) or ISO-8601 text with an offset -> epoch seconds."""
    if isinstance(value, bool) or value is None:
        raise FieldError(RejectReason.BAD_TS, f"ts {value!r} is not a time")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            raise FieldError(RejectReason.BAD_TS, f"ts {value} has no UTC offset")
        ts = value.timestamp()
    else:
        text = str(value).strip()
        # ISO text has a '-' after the year; trying it first spares a raised ValueError
        # per row from float() on the common form.
        moment = _iso(text) if len(text) > 10 and text[4:5] == "-" else None
        if moment is not None:
            ts = moment.timestamp()
        else:
            try:
                ts = float(text)
            except ValueError:
                moment = _iso(text)
                if moment is None:
                    raise FieldError(
                        RejectReason.BAD_TS,
                        f"ts {text[:40]!r} is neither ISO-8601 with an offset nor epoch seconds",
                    ) from None
                ts = moment.timestamp()
    if not math.isfinite(ts) or not 0 <= ts < 32_503_680_000:  # before year 3000
        raise FieldError(RejectReason.BAD_TS, f"ts {value!r} is out of range")
    # Whole microseconds, as the lake stores them: replaying stored events is exact.
    return round(ts, 6)


def _text(value: Any, column: str = "") -> str:
    """A field's text: a number as it is written (a whole float without its `.0`: a
    spreadsheet's or a float column's number); a yes/no, a list or an object is no
    report's field and is refused, not stored as Python writes it ("True")."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):  # a database export's NUMERIC column
        value = float(value) if not value.is_finite() else value
        if isinstance(value, Decimal):
            value = int(value) if value == value.to_integral_value() else float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise FieldError(
            RejectReason.BAD_FIELD,
            f"{column or 'a field'}: {type(value).__name__} {_shown_value(value)} is not "
            "text or a number",
        )
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _shown_value(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 40 else text[:40] + "…"


# Besides the switch's tokens, files may use the `events` table's own state names,
# so an export of the table replays as it is.
_TABLE_STATES = {"answered": "ok", "hangup": "bye"}


def row_to_item(row: Mapping[str, Any], source: str, fallback_ts: float) -> CallEvent | Reject:
    """The row's event, or its reject: at the row's own time when that much of it is
    good, else at `fallback_ts` (the last good row's, so it stays in its place)."""
    ts: float | None = None
    try:
        ts = parse_ts(row.get("ts"))
        fields = [_text(row.get(column), column) for column in COLUMNS[1:]]
        fields[2] = _TABLE_STATES.get(fields[2].strip().lower(), fields[2])
        return make_file_event(ts, fields, source, _text(row.get("switch"), "switch"))
    except FieldError as error:
        at = fallback_ts if ts is None else ts
        return _reject(row, source, at, error.reason, error.detail)


def _reject(
    row: Mapping[str, Any], source: str, ts: float, reason: RejectReason, detail: str
) -> Reject:
    raw = json.dumps(dict(row), default=str, ensure_ascii=False).encode("utf-8")
    call_id: str | None = None
    serial: int | None = None
    try:
        call_id = parse_call_id(_text(row.get("call_id")))
        serial = parse_serial(_text(row.get("serial")))
    except FieldError:
        call_id = serial = None
    return Reject(ts, reason, detail, raw, call_id, serial, source)


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    names = list(columns)
    present = set(names)
    twice = [c for c in KEPT if names.count(c) > 1]
    if twice:
        # Which of the two holds the value? Readers differ (the last, or the first):
        # the file says nothing certain, so it is refused.
        raise EventFileError(f"{path}: the header names {', '.join(twice)} more than once")
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise EventFileError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(event files have {', '.join(COLUMNS)})"
        )


def _frame(path: Path) -> tuple[pl.DataFrame, int] | Iterator[Row]:
    """The file as a frame and the line number of its first row; JSON lines as rows
    (line or row number, row), where a str row is a line that is not a JSON object."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise EventFileError(
            f"{path}: unknown event file type {path.suffix!r} (expected .csv, .jsonl or .parquet)"
        )
    if kind == "jsonl":
        return _json_rows(path)
    if kind == "csv":
        return _csv_frame(path)
    try:
        frame = pl.read_parquet(path)
        first_line = 1
    except UnicodeDecodeError as error:
        raise EventFileError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except OSError as error:
        raise EventFileError(f"{path}: {error.strerror or error}") from None
    except pl.exceptions.PolarsError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EventFileError(f"{path}: cannot read as {kind}: {first}") from None
    _check_columns(path, frame.columns)
    frame = frame.select([c for c in KEPT if c in frame.columns])
    for name, dtype in frame.schema.items():
        if dtype.is_nested() or dtype in (pl.Binary, pl.Object):
            # Its values would be stored as Python's text of a list or of bytes.
            raise EventFileError(
                f"{path}: column {name} holds {dtype}; event files hold text, numbers and times"
            )
    return frame, first_line


# Rows read one at a time: (line number, the row's fields by column) or (line number,
# why it is no row: a reason, a sentence and the row's bytes).
Row = tuple[int, Mapping[str, Any] | tuple[RejectReason, str, bytes] | str]

# The most a CSV row may take: a report's own limit (docs/protocol.md). A quoted field
# may run across lines only within it, so a stray quote swallows no more than that.
MAX_ROW_BYTES = 2048


def _csv_frame(path: Path) -> tuple[pl.DataFrame, int] | Iterator[Row]:
    """A CSV file as a frame (line = row + 2, after the header) when every row is one
    well-formed line; otherwise row by row (`_csv_rows`), so one bad row costs that
    row, each reported at its true line."""
    try:
        with path.open("rb") as handle:
            _skip_bom(handle)
            data = handle.read()
    except OSError as error:
        raise EventFileError(f"{path}: {error.strerror or error}") from None
    return _csv_data(path, data, 2)


def _skip_bom(handle: BinaryIO) -> None:
    """Past the UTF-8 byte-order mark that spreadsheets write before the header, where
    the file has one: both readers then name the first column alike."""
    if handle.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
        handle.seek(0)


def _csv_data(path: Path, data: bytes, first_line: int) -> tuple[pl.DataFrame, int] | Iterator[Row]:
    """`_csv_frame` of CSV text already read: a header line, then rows from the file's
    line `first_line` on (a part of a long file is its header and some of its lines)."""
    if not data.strip():
        return iter(())  # no rows, as an empty JSON-lines file
    if b'"' in data and not all(map(_CLOSED_LINE.fullmatch, data.splitlines(keepends=True))):
        # A line that is not closed (a quote inside an unquoted field, a quoted field
        # running across lines, `""ts` in the header) may be split or named differently
        # by polars and by the row reader (csv): such a part is read row by row.
        return _csv_rows(path, data, first_line - 2)
    try:
        # Everything as text: the row validator decides, so a bad cell is a quarantined
        # row, not a failed file.
        frame = pl.read_csv(data, infer_schema=False, encoding="utf8")
    except (UnicodeDecodeError, pl.exceptions.PolarsError):
        return _csv_rows(path, data, first_line - 2)
    if any(name != name.strip() or "_duplicated_" in name for name in frame.columns):
        # The row reader strips the header's names ("call_id " is call_id) and refuses a
        # name given twice (which polars renames "call_id_duplicated_0"): a part read
        # here must name its columns as the same file read row by row does.
        return _csv_rows(path, data, first_line - 2)
    _check_columns(path, frame.columns)
    if not _one_line_rows(data, frame.width, frame.height):
        return _csv_rows(path, data, first_line - 2)
    # An empty field is "" to the row reader (csv), null to polars: "" here too, so a
    # reject says the same (its row, its detail) whichever reader read its part.
    kept = [pl.col(c).fill_null("") for c in KEPT if c in frame.columns]
    return frame.select(kept), first_line


def _one_line_rows(data: bytes, width: int, height: int) -> bool:
    """Whether each of the `height` rows polars read is one line holding `width` fields
    (polars pads a short row and reads a quoted field across lines; line numbers and
    missing fields would then be wrong). Without quotes, separators are counted in C;
    with them (every line closed, `_csv_data`), the csv module counts each row's fields."""
    if b"\n\n" in data or b"\n\r\n" in data:
        return False  # blank lines: polars skips them, so its rows are not lines
    if data.count(b"\r") != data.count(b"\r\n"):
        return False  # a lone CR ends a line to the row reader, not to polars
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if lines != height + 1:
        return False
    if b'"' not in data:
        return data.count(b",") == (width - 1) * lines
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""), strict=True)
        return all(len(row) == width for row in reader) and reader.line_num == lines
    except (csv.Error, UnicodeDecodeError):
        return False


def _quote_open(text: str) -> bool:
    """Whether a row's text so far ends inside a quoted field, as the csv module (and
    polars) read it: a quote opens a field only at the field's start; one inside an
    unquoted field (`40"`) is a character of it, and opens nothing."""
    if '"' not in text:
        return False
    try:
        for _ in csv.reader([text], strict=True):
            pass
    except csv.Error as error:
        return "unexpected end of data" in str(error)
    return False


def _csv_rows(path: Path, data: bytes, line_offset: int = 0) -> Iterator[Row]:
    """Rows of a CSV file one at a time, each from the line it starts on: a line that
    is not UTF-8 is rejected alone, a row with more or fewer fields than the header is
    rejected with its counts, and an unclosed quote is rejected at the line it opened,
    reading going on at the next line, once the row it makes passes MAX_ROW_BYTES.
    `line_offset`: lines of the file between the header and `data`'s second line
    (a part of a long file)."""
    lines = data.splitlines(keepends=True)
    header = next(csv.reader([lines[0].decode("utf-8", "replace")])) if lines else []
    _check_columns(path, [name.strip() for name in header])
    columns = [name.strip() for name in header]
    index = 1
    while index < len(lines):
        number, raw = index + 1 + line_offset, lines[index]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            index += 1
            yield number, (RejectReason.UNDECODABLE, f"not UTF-8 text ({error.reason})", raw)
            continue
        end = index + 1
        open_ = _quote_open(text)
        while open_ and end < len(lines) and len(raw) <= MAX_ROW_BYTES:
            try:
                text += lines[end].decode("utf-8")
            except UnicodeDecodeError:
                break
            raw += lines[end]
            end += 1
            open_ = _quote_open(text)
        if open_:
            # Unclosed: this line alone is rejected; the lines it swallowed are read.
            index += 1
            yield (
                number,
                (RejectReason.BAD_FIELD, "a quoted field is never closed", lines[index - 1]),
            )
            continue
        index = end
        if not text.strip():
            continue
        try:
            (fields,) = list(csv.reader([text.rstrip("\r\n")], strict=True))
        except (csv.Error, ValueError) as error:
            yield number, (RejectReason.BAD_FIELD, f"not a CSV row: {error}", raw)
            continue
        counts = f"{len(fields)} fields where the header names {len(columns)}"
        if len(fields) > len(columns):
            yield number, (RejectReason.BAD_FIELD, counts, raw)
        elif len(fields) < len(columns):
            yield number, (RejectReason.MISSING_FIELDS, counts, raw)
        else:
            # The columns polars' path keeps, in its order: a reject's row (its raw JSON)
            # is then the same whichever path read the row.
            row = dict(zip(columns, fields, strict=True))
            yield number, {name: row[name] for name in KEPT if name in row}


def _lone_surrogate(line: str, row: Mapping[str, Any]) -> str | None:
    """Why a JSON row is not text, when an escape in it (\\ud800 to \\udfff) stands
    for half of a character: no UTF-8 store can take it."""
    if "\\u" not in line:
        return None
    for key, value in row.items():
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    return (
                        f"field {key!r} holds a lone surrogate \\u{ord(text[error.start]):04x} "
                        "(half of a character), not text"
                    )
    return None


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        # A byte-order mark before the first line is no part of it (utf-8-sig would
        # also drop a file's first bytes that merely begin like one).
        with path.open("rb") as binary:
            _skip_bom(binary)
            handle = io.TextIOWrapper(binary, encoding="utf-8", errors="strict")
            checked = False
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, f"line is not JSON: {error.msg}"
                    continue
                if not isinstance(row, dict):
                    yield number, "line is not a JSON object"
                    continue
                if not checked:
                    _check_columns(path, row)
                    checked = True
                surrogate = _lone_surrogate(line, row)
                if surrogate is not None:
                    yield number, surrogate
                    continue
                yield number, row
    except UnicodeDecodeError as error:
        raise EventFileError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except OSError as error:
        raise EventFileError(f"{path}: {error.strerror or error}") from None


# Column types the fast path turns into text exactly as `_text` would.
_PLAIN_TEXT = (pl.String, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32)


# Times from 2^32 s (the year 2106) on are left to the row-by-row parser (see below).
_COLUMN_TS_BELOW = float(1 << 32)


_ISO_SHAPE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?[+-]\d{2}:?\d{2}$"


def _microseconds_to_seconds(micros: pl.Series) -> pl.Series:
    """Whole microseconds as seconds, each the double nearest to micros / 10^6, as
    Python's `datetime.timestamp()` makes it. Divided by a column of 10^6, not by the
    number: polars divides a column by a number as a multiplication by its reciprocal,
    a last bit off for about a third of the times with milliseconds (the closer look
    then remade every such row in Python)."""
    return micros.cast(pl.Float64) / pl.repeat(1e6, len(micros), dtype=pl.Float64, eager=True)


def _epoch_seconds(column: pl.Series) -> pl.Series:
    """Event times as epoch seconds, column-wise; null where the row needs a closer look
    (the row-by-row parser then says exactly what is wrong with it).

    A time taken here must be the very float `parse_ts` makes of the row: Python's
    round(ts, 6), correctly rounded, where polars' round(6) multiplies and divides and
    differs by a microsecond for a time with digits past the microsecond (a text
    "1912923437.7565895"; a float column) or a large one (the year 2206). Below
    2^32 s a time polars' round(6) leaves as it is (whole microseconds, as every
    ISO-8601 time polars reads is) is one Python's round leaves too; any other time
    gets the closer look."""
    if column.dtype == pl.String:
        text = column.str.strip_chars()
        # Only the shape Python's fromisoformat takes too: polars also reads one-digit
        # months, days and hours ("2026-1-02"), which the row parser refuses.
        shaped = text.str.contains(_ISO_SHAPE).fill_null(False)
        iso = text.zip_with(shaped, pl.Series([None], dtype=pl.String)).str.to_datetime(
            format="%Y-%m-%dT%H:%M:%S%.f%:z", time_zone="UTC", strict=False, time_unit="us"
        )
        seconds = _microseconds_to_seconds(iso.dt.epoch("us"))
        numeric = text.cast(pl.Float64, strict=False)
        seconds = seconds.fill_null(numeric)
    elif isinstance(column.dtype, pl.Datetime) and column.dtype.time_zone is not None:
        seconds = _microseconds_to_seconds(column.dt.epoch("us"))
    elif column.dtype.is_numeric():
        seconds = column.cast(pl.Float64)
    else:
        return pl.Series([None] * len(column), dtype=pl.Float64)
    exact = (
        seconds.is_finite()
        & (seconds >= 0)
        & (seconds < _COLUMN_TS_BELOW)
        & (seconds.round(6) == seconds)
    )
    return seconds.zip_with(exact.fill_null(False), pl.Series([None], dtype=pl.Float64))


# Python's whitespace (what str.strip() removes; none is above U+3000), as a class
# for polars' regular expressions, whose own \s is a little different.
_WHITESPACE = "".join(f"\\x{{{n:x}}}" for n in range(0x3001) if chr(n).isspace())
_STRIPPED = f"^[{_WHITESPACE}]|[{_WHITESPACE}]$"
# A call id make_event takes as it is: printable ASCII, no surrounding spaces.
_PLAIN_CALL_ID = rf"^[\x21-\x7e](?:[\x20-\x7e]{{0,{MAX_CALL_ID_BYTES - 2}}}[\x21-\x7e])?$"
_PLAIN_SERIAL = rf"^[0-9]{{1,{MAX_SERIAL_DIGITS}}}$"
# The state spellings taken without a closer look (the protocol's tokens and the
# events table's names, in the usual cases).
_EXACT_STATES = {
    spelling: STATE_TOKENS[_TABLE_STATES.get(token, token)]
    for token in (*STATE_TOKENS, *_TABLE_STATES)
    for spelling in {token, token.upper(), token.capitalize()}
}
_EXACT_STATE = {spelling: parsed[0] for spelling, parsed in _EXACT_STATES.items()}
_EXACT_CODE = {spelling: parsed[1] for spelling, parsed in _EXACT_STATES.items()}
_new_tuple = tuple.__new__
# A CallEvent from a tuple of its fields, called from C (map) with no Python frame,
# where engine/ingest/_rows.c is not built (or is stale); with it, each is one
# allocation filled in C.
_new_event = functools.partial(_new_tuple, CallEvent)
_rows = native.load("_rows")
_take_rows: Callable[..., list[CallEvent]] | None = None if _rows is None else _rows.take_rows


def _plain_rows(frame: pl.DataFrame, columns: list[str]) -> pl.Series:
    """Rows whose fields make_event would take as they are: call id and serial well
    formed, no text field with spaces to strip. Checked column by column in polars;
    every other row goes through make_event, which says what is wrong with it."""

    def text(name: str) -> pl.Expr:
        if name not in columns:
            return pl.lit("")
        return pl.col(name).cast(pl.String).fill_null("")

    report = COLUMNS[1:9]  # call_id ... menu_name: what a datagram carries
    checks = [
        text("call_id").str.contains(_PLAIN_CALL_ID),
        text("serial").str.contains(_PLAIN_SERIAL),
        *(~text(name).str.contains(_STRIPPED) for name in COLUMNS[4:]),
        # Longer than a report may be: make_file_event refuses it, as the receiver does.
        pl.sum_horizontal([text(name).str.len_bytes() for name in report])
        <= MAX_DATAGRAM_BYTES - (len(report) - 1),
    ]
    return frame.select(pl.all_horizontal(checks).alias("plain"))["plain"]


def _checked_columns(
    frame: pl.DataFrame, label: str, first_line: int
) -> tuple[pl.Series, list[int], list[str]]:
    """Event times in epoch seconds; the rows that need a closer look (anything but a
    row checked column-wise by _plain_rows, with a time and a state spelled as
    usual); and each row's "file:line" (made by polars: twice as fast as str() and
    + per row)."""
    seconds = _epoch_seconds(frame["ts"])
    usual = (
        _plain_rows(frame, frame.columns)
        & seconds.is_not_null()
        & frame["state"].cast(pl.String).is_in(list(_EXACT_STATE))
    ).fill_null(False)
    slow = (~usual).arg_true().to_list()
    lines = pl.int_range(first_line, first_line + len(frame)).cast(pl.String)
    sources = pl.select(pl.concat_str(pl.lit(f"{label}:"), lines)).to_series().to_list()
    return seconds, slow, sources


# What _checked_columns makes of a frame.
Checked = tuple[pl.Series, list[int], list[str]]


def _plain(frame: pl.DataFrame) -> bool:
    """Whether every column but ts has a type the fast path takes as text."""
    return all(frame[c].dtype in _PLAIN_TEXT for c in frame.columns if c != "ts")


def _items_of_frame(
    frame: pl.DataFrame,
    label: str,
    first_line: int,
    checked: Callable[[], Checked] | None = None,
    fallback_ts: float = 0.0,
) -> list[CallEvent | Reject]:
    """Rows to items column by column: times parsed by polars, texts taken as columns,
    each usual row made a `CallEvent` in C (engine/ingest/_rows.c, or zip and map: no Python
    per row); a row the fast path cannot vouch for goes through `row_to_item` like any
    row. `checked` gives what _checked_columns makes of the frame when another thread
    is at it. `fallback_ts`: the time of a reject before the frame's first good row
    (that of the file's last good row before the frame, or 0 at its start)."""
    columns = frame.columns
    if not _plain(frame):
        rows = frame.iter_rows()
        return _items_of_rows(
            ((n, dict(zip(columns, v, strict=True))) for n, v in enumerate(rows, first_line)),
            label,
            fallback_ts,
        )
    count = len(frame)
    with contextlib.ExitStack() as stack:
        if checked is None:
            # Polars' part (times, checks, "file:line" sources) leaves the interpreter
            # lock: on a thread, it runs beside the texts' conversion to Python
            # strings, which holds it.
            helper = stack.enter_context(
                ThreadPoolExecutor(1, thread_name_prefix="event-file-columns")
            )
            checked = helper.submit(_checked_columns, frame, label, first_line).result
        # The serial as text is for the closer look alone (its rows are taken below).
        texts = [
            frame[c].cast(pl.String).fill_null("").to_list() if c in columns else [""] * count
            for c in COLUMNS[1:]
            if c != "serial"
        ]
        texts.insert(1, [])  # (in place: the columns' order stays COLUMNS[1:])
        state_texts = texts[2]
        states = list(map(_EXACT_STATE.get, state_texts))
        seconds, slow, sources = checked()
    serials = frame["serial"].cast(pl.Int64, strict=False).to_list()
    times = seconds.to_list()
    switches = (
        frame["switch"].cast(pl.String).fill_null("").to_list()
        if "switch" in columns
        else [""] * count
    )
    fields = (
        times,
        texts[0],
        serials,
        states,
        list(map(_EXACT_CODE.get, state_texts)),
        *texts[3:],
        sources,
        switches,
        # Rows of a file are never deployment checks (those are stored apart, in `checks`).
        [False] * count,
    )
    # What the closer look needs of the rows it remakes, taken before the columns' values
    # move into the rows.
    serial_texts = frame["serial"].cast(pl.String).fill_null("").gather(slow).to_list()
    unusual = [
        (
            index,
            times[index],
            [texts[0][index], serial_text, *(text[index] for text in texts[2:])],
            sources[index],
            switches[index],
        )
        for index, serial_text in zip(slow, serial_texts, strict=True)
    ]
    items: list[CallEvent | Reject]
    if _take_rows is not None:
        items = cast(list[CallEvent | Reject], _take_rows(CallEvent, *fields))
    else:
        items = list(map(_new_event, zip(*fields, strict=True)))
    if unusual:
        _closer_look(frame, items, unusual, fallback_ts)
    return items


def _closer_look(
    frame: pl.DataFrame,
    items: list[CallEvent | Reject],
    unusual: list[tuple[int, float | None, list[str], str, str]],
    fallback_ts: float = 0.0,
) -> None:
    """Remake the rows at the `unusual` indexes (ascending; with each its time, texts
    and source) through the validator: a field to strip, a state spelled otherwise, or
    something wrong that a reject must name."""
    columns = frame.columns
    previous = -1
    for index, ts, fields, source, switch in unusual:
        if index - 1 > previous:
            # The row before was made by the fast path: a CallEvent.
            fallback_ts = items[index - 1].ts
        previous = index
        item: CallEvent | Reject
        if ts is None:
            row = dict(zip(columns, frame.row(index), strict=True))
            item = row_to_item(row, source, fallback_ts)
        else:
            fields[2] = _TABLE_STATES.get(fields[2].strip().lower(), fields[2])
            try:
                item = make_file_event(ts, fields, source, switch)
            except FieldError as error:
                row = dict(zip(columns, frame.row(index), strict=True))
                item = _reject(row, source, ts, error.reason, error.detail)
        if type(item) is CallEvent:
            fallback_ts = item.ts
        items[index] = item


def _items_of_rows(
    rows: Iterable[Row], label: str, fallback_ts: float = 0.0
) -> list[CallEvent | Reject]:
    items: list[CallEvent | Reject] = []
    for number, row in rows:
        source = f"{label}:{number}"
        if isinstance(row, str):
            items.append(Reject(fallback_ts, RejectReason.BAD_FIELD, row, b"", source=source))
            continue
        if isinstance(row, tuple):
            reason, detail, raw = row
            items.append(Reject(fallback_ts, reason, detail, raw, source=source))
            continue
        item = row_to_item(row, source, fallback_ts)
        if isinstance(item, CallEvent):
            fallback_ts = item.ts
        items.append(item)
    return items


def read_frame_items(frame: pl.DataFrame, label: str) -> list[CallEvent | Reject]:
    """Rows of a frame with the event-file columns (stored events read back, for a
    backtest) as a file's rows are read: each a `CallEvent`, or a `Reject` saying
    what is wrong with it at "label:row"."""
    _check_columns(Path(label), frame.columns)
    return _items_of_frame(frame, label, 1)


def read_event_file(path: Path) -> list[CallEvent | Reject]:
    read = _frame(path)
    if isinstance(read, tuple):
        frame, first_line = read
        return _items_of_frame(frame, path.name, first_line)
    return _items_of_rows(read, path.name)


# A file as polars read it (frame, label, first line, its checks to come), or its
# rows when it was read row by row (JSON lines, or a frame of unusual column types).
_Part = tuple[pl.DataFrame, str, int, "Future[Checked]"] | list[CallEvent | Reject]


def _load(paths: list[Path], errors: list[str], loaded: Future[list[_Part]]) -> None:
    """Polars' share of reading, for a thread of its own: read each file (`loaded`
    as soon as all are), then check each frame column-wise (its future in the part)."""
    parts: list[_Part] = []
    try:
        for path in paths:
            try:
                read = _frame(path)
                if not isinstance(read, tuple):
                    parts.append(_items_of_rows(read, path.name))
                elif not _plain(read[0]):
                    parts.append(_items_of_frame(read[0], path.name, read[1]))
                else:
                    parts.append((read[0], path.name, read[1], Future()))
            except EventFileError as error:
                errors.append(str(error))
    except BaseException as error:
        loaded.set_exception(error)
        raise
    loaded.set_result(parts)
    for part in parts:
        if isinstance(part, tuple):
            frame, label, first_line, checks = part
            try:
                checks.set_result(_checked_columns(frame, label, first_line))
            except BaseException as error:
                checks.set_exception(error)


def read_event_files(
    paths: Iterable[Path], meanwhile: Callable[[], None] | None = None
) -> tuple[list[CallEvent | Reject], list[str]]:
    """All rows of all files in event-time order (file order breaks ties), and file
    errors. `meanwhile` runs on this thread while polars reads and checks the files
    on another (replay opens the store then); the rows are made here, after it, since
    making them holds the interpreter lock in long C calls that `meanwhile` would
    wait behind."""
    errors: list[str] = []
    loaded: Future[list[_Part]] = Future()
    with ThreadPoolExecutor(1, thread_name_prefix="event-files") as helper:
        loading = helper.submit(_load, list(paths), errors, loaded)
        if meanwhile is not None:
            meanwhile()
        items: list[CallEvent | Reject] = []
        # Whether the rows are known to be in event-time order without a look at each.
        ordered = True
        for part in loaded.result():
            if isinstance(part, list):
                items.extend(part)
                ordered = False
                continue
            frame, label, first_line, checks = part
            part_items = _items_of_frame(frame, label, first_line, checks.result)
            if part_items:
                # Every row's time read by polars and in order: then so are the items (a
                # row's item has that time; a reject the time of the last good row
                # before it, or 0 before any), unless the file starts before the last.
                seconds = checks.result()[0]
                ordered = (
                    ordered
                    and not seconds.null_count()
                    and seconds.is_sorted()
                    and (not items or items[-1].ts <= part_items[0].ts)
                )
            items.extend(part_items)
        loading.result()
    if not ordered:
        # Both CallEvent and Reject are tuples led by ts. Rows in event-time order are
        # only checked (one pass), not sorted.
        times = list(map(_TS, items))
        if not all(map(operator.le, times, itertools.islice(times, 1, None))):
            items.sort(key=_TS)
    return items, errors


# Streaming: event files read a part at a time, in event-time order across files.

# Rows per part of a Parquet or JSON-lines file, and bytes per part of a CSV file (about
# as many rows): what is held of a file while it is read, whatever its size.
PART_ROWS = 100_000
PART_BYTES = 8 * 2**20
# The first part of each of several files: all are read from the start (any may hold
# the earliest rows), and most then wait for their turn.
FIRST_ROWS = 1_000
FIRST_BYTES = 64 * 2**10


def _part_errors(path: Path, error: BaseException) -> str:
    if isinstance(error, EventFileError):
        return str(error)
    if isinstance(error, UnicodeDecodeError):
        return f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError):
        return f"{path}: {error.strerror or error}"
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return f"{path}: cannot read: {first}"


def _row_end(lines: list[bytes], index: int) -> int | None:
    """Where the CSV row starting at `lines[index]` ends as `_csv_rows` reads it (the
    index of the line after it), or None when that depends on lines after `lines`."""
    raw = lines[index]
    if b'"' not in raw:
        return index + 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return index + 1
    open_ = _quote_open(text)
    end = index + 1
    while open_ and len(raw) <= MAX_ROW_BYTES:
        if end == len(lines):
            return None
        try:
            text += lines[end].decode("utf-8")
        except UnicodeDecodeError:
            break
        raw += lines[end]
        end += 1
        open_ = _quote_open(text)
    # Unclosed: the line alone is a row (a reject); reading goes on at the next one.
    return index + 1 if open_ else end


# A line the csv module reads as one row, closed at its end: fields separated by
# commas, each unquoted with no quote in it, or quoted with its quotes doubled inside
# and no line end. Such a line never ends inside a quoted field (`_quote_open`); a
# line it does not match is asked of `_row_end`. (Possessive: what they match, the
# plain pattern matches too, with no backtracking to remember.)
_FIELD = rb'(?:[^,"\r\n]++|"[^"\r\n]*+(?:""[^"\r\n]*+)*+"|)'
_CLOSED_LINE = re.compile(_FIELD + rb"(?:," + _FIELD + rb")*+(?:\r\n|\n|\r)?")


def _row_cut(body: bytes) -> int:
    """The length of the longest prefix of `body` (whole lines) ending where a CSV row
    ends as `_csv_rows` reads the whole file: where a part may end. Only quotes can
    make a row run across lines, so without them it is all of `body`."""
    if b'"' not in body:
        return len(body)
    lines = body.splitlines(keepends=True)
    if all(map(_CLOSED_LINE.fullmatch, lines)):
        # Every line is a row of its own (matched in C, where `_row_end` runs the csv
        # module over each line with a quote in Python).
        return len(body)
    index = offset = 0
    cut = 0
    while index < len(lines):
        end = _row_end(lines, index)
        if end is None:
            return cut
        offset += sum(len(line) for line in lines[index:end])
        index = end
        cut = offset
    return cut


def _line_count(data: bytes) -> int:
    """Lines as bytes.splitlines counts them (\\n, \\r\\n and a lone \\r end one)."""
    return (
        data.count(b"\n")
        + data.count(b"\r")
        - data.count(b"\r\n")
        + (0 if not data or data.endswith((b"\n", b"\r")) else 1)
    )


def _first_line_end(head: bytes) -> int:
    """Where the header line ends as bytes.splitlines ends it (at \n, at the \n of \r\n,
    or at a lone \r), the row reader's lines; -1 when `head` holds no certain end (none,
    or a \r as its last byte, whose \n may be the next part's first)."""
    ends = [at for at in (head.find(b"\n"), head.find(b"\r")) if at >= 0]
    if not ends:
        return -1
    end = min(ends)
    if head[end : end + 1] == b"\r":
        if end + 1 == len(head):
            return -1
        if head[end + 1 : end + 2] == b"\n":
            return end + 1
    return end


def _csv_parts(
    path: Path, part_bytes: int, first_bytes: int | None = None
) -> Iterator[tuple[bytes, int]]:
    """A CSV file as parts: (its header line and a run of whole rows, the file's line
    number of the first). Each part is cut where a row ends, so each reads (fast
    path or row by row) as those lines read within the whole file. A file within
    `part_bytes` is one part: the whole file, as read before. The first part of a
    longer one is about `first_bytes` (default `part_bytes`)."""
    target = first_bytes or part_bytes
    try:
        with path.open("rb") as handle:
            _skip_bom(handle)
            head = handle.read(part_bytes + 1)
            if len(head) <= part_bytes:
                yield head, 2
                return
            newline = _first_line_end(head)
            if newline < 0:
                # No line ends in the first part: no row can be cut apart; read it whole.
                yield head + handle.read(), 2
                return
            header = head[: newline + 1]
            if header.endswith(b"\r"):
                # Ended by a lone CR, the header is given an LF in each part instead:
                # before a body whose first line is empty, CR and LF would read as one
                # line end, and the part's lines would be numbered one short.
                header = header[:-1] + b"\n"
            pending = head[newline + 1 :]
            line = 2
            at_end = False
            while pending or not at_end:
                if not at_end and len(pending) < target:
                    more = handle.read(part_bytes)
                    at_end = not more
                    pending += more
                    if not at_end:
                        continue
                if at_end:
                    body, pending = pending, b""
                else:
                    last = pending.rfind(b"\n", 0, target)
                    if last < 0:
                        last = pending.find(b"\n")
                    cut = _row_cut(pending[: last + 1]) if last >= 0 else 0
                    if cut == 0:
                        # One row longer than a part (or no line end yet): take more.
                        more = handle.read(part_bytes)
                        at_end = not more
                        pending += more
                        if not at_end:
                            target *= 2
                        continue
                    body, pending = pending[:cut], pending[cut:]
                    target = max(target, part_bytes)
                yield header + body, line
                line += _line_count(body)
    except OSError as error:
        raise EventFileError(f"{path}: {error.strerror or error}") from None


def _last_good_ts(items: list[CallEvent | Reject], otherwise: float) -> float:
    for item in reversed(items):
        if type(item) is CallEvent:
            return item.ts
    return otherwise


def _parquet_parts(path: Path, part_rows: int, first_rows: int) -> Iterator[pl.DataFrame]:
    try:
        schema = pl.read_parquet_schema(path)
        _check_columns(path, schema)
        kept = [c for c in KEPT if c in schema]
        for name in kept:
            dtype = schema[name]
            if dtype.is_nested() or dtype in (pl.Binary, pl.Object):
                raise EventFileError(
                    f"{path}: column {name} holds {dtype}; event files hold text, numbers and times"
                )
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        offset, size = 0, first_rows
        while offset < rows:
            yield pl.scan_parquet(path).select(kept).slice(offset, size).collect()
            offset += size
            size = part_rows
    except (OSError, UnicodeDecodeError, pl.exceptions.PolarsError) as error:
        if isinstance(error, pl.exceptions.PolarsError):
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            raise EventFileError(f"{path}: cannot read as parquet: {first}") from None
        raise EventFileError(_part_errors(path, error)) from None


def file_parts(
    path: Path,
    part_rows: int = PART_ROWS,
    part_bytes: int = PART_BYTES,
    *,
    first_small: bool = False,
) -> Iterator[list[CallEvent | Reject]]:
    """The rows of one event file, a part at a time, in file order: together what
    `read_event_file` returns (each row's source "file:line", and a reject's time that
    of the last good row before it, across parts too). Raises EventFileError.
    `first_small`: the first part is a small one (FIRST_ROWS rows, FIRST_BYTES bytes)."""
    first_rows = min(part_rows, FIRST_ROWS) if first_small else part_rows
    first_bytes = min(part_bytes, FIRST_BYTES) if first_small else part_bytes
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise EventFileError(
            f"{path}: unknown event file type {path.suffix!r} (expected .csv, .jsonl or .parquet)"
        )
    fallback = 0.0
    if kind == "jsonl":
        rows = _json_rows(path)
        size = first_rows
        while part := list(itertools.islice(rows, size)):
            items = _items_of_rows(part, path.name, fallback)
            fallback = _last_good_ts(items, fallback)
            size = part_rows
            yield items
        return
    if kind == "parquet":
        first_line = 1
        for frame in _parquet_parts(path, part_rows, first_rows):
            items = _items_of_frame(frame, path.name, first_line, fallback_ts=fallback)
            first_line += frame.height
            fallback = _last_good_ts(items, fallback)
            yield items
        return
    for data, first_line in _csv_parts(path, part_bytes, first_bytes):
        read = _csv_data(path, data, first_line)
        if isinstance(read, tuple):
            items = _items_of_frame(read[0], path.name, read[1], fallback_ts=fallback)
        else:
            items = _items_of_rows(read, path.name, fallback)
        fallback = _last_good_ts(items, fallback)
        yield items


def parquet_rows(paths: Iterable[Path]) -> int | None:
    """How many rows the files hold, when every one is Parquet (its footer says), else None."""
    total = 0
    for path in paths:
        if path.suffix.lower() != ".parquet":
            return None
        try:
            total += pl.scan_parquet(path).select(pl.len()).collect().item()
        except (OSError, pl.exceptions.PolarsError):
            return None
    return total


def _in_order(items: list[CallEvent | Reject]) -> bool:
    times = list(map(_TS, items))
    return all(map(operator.le, times, itertools.islice(times, 1, None)))


class EventStream:
    """The rows of event files in event-time order (file order breaks ties), a part at
    a time: what `read_event_files` returns, without holding more than a part or two
    of each file. Each file is read in parts (`file_parts`); a part is sorted, and
    rows are let out once no file can still hold an earlier one, which a file in
    event-time order shows by its part's last row. A file out of order across parts
    (a row earlier than rows let out already) cannot be put in its place: such rows
    come out late, counted in `late`, at the front of the next output.

    Iterating gives lists of rows; `errors` holds each file that could not be read
    (the rows read from it before the problem stay); `rows` counts the rows let out."""

    def __init__(
        self, paths: Iterable[Path], part_rows: int = PART_ROWS, part_bytes: int = PART_BYTES
    ) -> None:
        self.paths = list(paths)
        self.part_rows = part_rows
        self.part_bytes = part_bytes
        self.errors: list[str] = []
        self.late = 0
        self.rows = 0

    def _parts(self, path: Path) -> Iterator[list[CallEvent | Reject]]:
        try:
            yield from file_parts(
                path, self.part_rows, self.part_bytes, first_small=len(self.paths) > 1
            )
        except EventFileError as error:
            self.errors.append(str(error))

    def __iter__(self) -> Iterator[list[CallEvent | Reject]]:
        sources = [self._parts(path) for path in self.paths]
        buffers: list[list[CallEvent | Reject]] = [[] for _ in sources]
        active = set(range(len(sources)))
        # The latest time let out: a row earlier than it, read later, is late.
        let_out = -math.inf

        def pull(index: int) -> None:
            part = next(sources[index], None)
            if part is None:
                active.discard(index)
                return
            if not _in_order(part):
                part.sort(key=_TS)
            if part and part[0].ts < let_out:
                self.late += sum(1 for item in part if item.ts < let_out)
            held = buffers[index]
            if held and part and part[0].ts < held[-1].ts:
                held.extend(part)
                held.sort(key=_TS)  # stable: the rows held come first in the file
            else:
                held.extend(part)

        while active or any(buffers):
            for index in sorted(active):
                while index in active and not buffers[index]:
                    pull(index)
            if not active:
                out = [item for held in buffers for item in held]
                buffers = [[] for _ in sources]
            else:
                # No file still being read can hold a row earlier than its part's last.
                cut = min(buffers[index][-1].ts for index in active)
                alone = len(active) == 1 and not any(
                    buffers[index] for index in range(len(buffers)) if index not in active
                )
                pieces = []
                for index, held in enumerate(buffers):
                    if not held:
                        continue
                    taken = len(held) if alone else bisect.bisect_left(held, cut, key=_TS)
                    if taken:
                        pieces.append(held[:taken])
                        buffers[index] = held[taken:]
                out = [item for piece in pieces for item in piece]
                if len(pieces) > 1:
                    out.sort(key=_TS)
                if not out:
                    # Every file held has only rows at `cut`: read on in those that do.
                    for index in sorted(active):
                        if buffers[index][-1].ts == cut:
                            pull(index)
                    continue
            if out:
                let_out = max(let_out, out[-1].ts)
                self.rows += len(out)
                yield out
