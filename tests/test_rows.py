"""Event files' rows made in C from their columns (engine/ingest/_rows.c): the same tuples as
`tuple.__new__(CallEvent, row)` for each row of zip(*columns), the values moved out
of the columns, and a clear error for anything else."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.events import CallEvent, CallState
from engine.ingest import native

# As event files load it: None where it is not built or is stale (map and zip run).
_rows = native.load("_rows")

needs_rows = pytest.mark.skipif(_rows is None, reason="engine.ingest._rows not built")


def test_the_row_maker_is_built_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("checked where we ship")
    assert _rows is not None


_FIELDS = st.tuples(
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.integers(0, 10**18),
    st.sampled_from(list(CallState)),
    st.sampled_from([None, 180, 183]),
    *(st.text(max_size=3) for _ in range(6)),
)


@needs_rows
@given(rows=st.lists(_FIELDS, max_size=40))
@settings(max_examples=200, deadline=None)
def test_rows_are_the_tuples_zip_makes(rows: list[tuple[Any, ...]]) -> None:
    columns = [list(column) for column in zip(*rows, strict=True)] or [[] for _ in range(11)]
    made = _rows.take_rows(CallEvent, *columns)
    assert made == [tuple.__new__(CallEvent, row) for row in rows]
    assert all(type(row) is CallEvent for row in made)
    assert [row.caller for row in made] == [row[5] for row in rows]
    assert all(value is None for column in columns for value in column)


@needs_rows
def test_values_move_into_the_rows_not_copied() -> None:
    columns = [[object() for _ in range(50)] for _ in range(3)]
    values = [value for column in columns for value in column]
    counts = [sys.getrefcount(value) for value in values]
    made = _rows.take_rows(tuple, *columns)
    # The columns hold None; each value has as many references as before (the row's
    # is the column's).
    assert columns == [[None] * 50] * 3
    assert [sys.getrefcount(value) for value in values] == counts
    assert [value for row in made for value in row] == [
        columns_value for row in zip(*_chunks(values, 50), strict=True) for columns_value in row
    ]


def _chunks(values: list[object], size: int) -> list[list[object]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


@needs_rows
def test_rows_survive_collections_while_they_are_made() -> None:
    # Allocating rows may run the collector over the ones half made.
    thresholds = gc.get_threshold()
    gc.set_threshold(1)
    try:
        columns = [[f"v{n}" for n in range(5000)] for _ in range(3)]
        made = _rows.take_rows(tuple, *columns)
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    assert made[4999] == ("v4999", "v4999", "v4999")


_SAME = [2]


@needs_rows
@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((), TypeError, "first argument must be a tuple subclass"),
        ((list, [1]), TypeError, "first argument must be a tuple subclass"),
        ((tuple, (1, 2)), TypeError, "column 0 is not a list"),
        ((tuple, [1], [1, 2]), ValueError, "column 1 has 2 values, column 0 has 1"),
        ((tuple, [1], _SAME, _SAME), ValueError, "column 2 is column 1 again"),
    ],
)
def test_bad_columns_are_named(args: tuple[Any, ...], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _rows.take_rows(*args)
    assert _SAME == [2], "nothing moved"
