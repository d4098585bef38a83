"""Reports as journaled in a JSON frame (replay's `J` frames, see engine.ingest.journal).

A CallEvent is journaled as its own JSON array (its fields in order); a Reject as a
list starting with REJECT_MARK, its raw bytes as latin-1 (which maps every byte to
one code point, so they survive JSON exactly).
"""

from __future__ import annotations

from typing import Any, cast

from engine.core.events import CallEvent, CallState, Reject, RejectReason

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
