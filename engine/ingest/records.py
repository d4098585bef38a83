"""Reports as journaled in a JSON frame (replay's `J` frames, see engine.ingest.journal).

A CallEvent is journaled as its own JSON array (its fields in order); a Reject as a
list starting with REJECT_MARK, its raw bytes as latin-1 (which maps every byte to
one code point, so they survive JSON exactly).
"""

from __future__ import annotations

import functools
import marshal
from collections.abc import Sequence
from typing import Any, cast

from engine.core.events import CallEvent, CallState, Reject, RejectReason
from engine.ingest import native

REJECT_MARK = "R"

Item = CallEvent | Reject
# A report as journaled in a JSON frame (see record_of).
Record = Any


def record_of(item: Item) -> Record:
    if type(item) is CallEvent:
        return item
    reject = cast(Reject, item)
    return [
        REJECT_MARK,
        reject.ts,
        reject.reason.value,
        reject.detail,
        reject.call_id,
        reject.serial,
        reject.source,
        reject.raw.decode("latin-1"),
    ]


def item_of(record: Record) -> Item:
    if record[0] == REJECT_MARK:
        _, ts, reason, detail, call_id, serial, source, raw = record
        return Reject(
            ts, RejectReason(reason), detail, raw.encode("latin-1"), call_id, serial, source
        )
    # Journals written before `switch` and `check` were fields hold 11 of them: the
    # rest take their defaults (no switch named, not a check).
    return CallEvent(record[0], record[1], record[2], CallState(record[3]), *record[4:13])


# Reports handed to another process of this program (replay's detection process): as
# columns, marshalled. marshal takes only exact builtin types; a CallEvent's fields are
# those but its state, an enum, sent as its place in CallState. The few distinct texts
# of a column (callee, forward, menu, switch) are made one object each, which marshal
# then writes once and refers back to. The source ("file:line") is left out:
# detection never reads it.
_STATES = tuple(CallState)
_STATE_NUMBER = {state: number for number, state in enumerate(_STATES)}
_STATE, _SOURCE = CallEvent._fields.index("state"), CallEvent._fields.index("source")
_FEW_TEXTS = tuple(
    CallEvent._fields.index(name)
    for name in ("callee", "forward", "menu_id", "menu_name", "switch")
)
_new_event = functools.partial(tuple.__new__, CallEvent)
_rows = native.load("_rows")


def pack_events(items: Sequence[Item]) -> bytes:
    """The CallEvents among `items`, in order, as bytes for `unpack_events` in another
    process of the same build (never for a file: marshal's format is the interpreter's)."""
    events = (
        items
        if set(map(type, items)) == {CallEvent}
        else [item for item in items if type(item) is CallEvent]
    )
    if not events:
        return marshal.dumps(())
    columns: list[Any] = list(zip(*events, strict=True))
    columns[_STATE] = bytes(map(_STATE_NUMBER.__getitem__, columns[_STATE]))
    columns[_SOURCE] = None
    for index in _FEW_TEXTS:
        texts: dict[str, str] = {}
        columns[index] = list(map(texts.setdefault, columns[index], columns[index]))
    return marshal.dumps(columns)


def unpack_events(data: bytes) -> list[CallEvent]:
    """The CallEvents `pack_events` packed, each with no source."""
    columns = marshal.loads(data)
    if not columns:
        return []
    columns[_STATE] = list(map(_STATES.__getitem__, columns[_STATE]))
    columns[_SOURCE] = [""] * len(columns[0])
    columns = [list(column) for column in columns]
    if _rows is not None:
        return cast(list[CallEvent], _rows.take_rows(CallEvent, *columns))
    return list(map(_new_event, zip(*columns, strict=True)))
