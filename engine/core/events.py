"""The two things that come out of decoding a report: a `CallEvent` or a `Reject`.

Event time is a float of seconds since the Unix epoch (UTC). It is the arrival
time of a report's first copy in live mode, or the `ts` column of an event file.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

MAX_CALL_ID_BYTES = 128
# Serials are stored as BIGINT; 18 digits always fit.
MAX_SERIAL_DIGITS = 18
# A report whose call_id starts with this, from a sender in `receiver.check_senders`,
# is a deployment check (docs/protocol.md, "Check reports"): answered and stored in the
# `checks` table, never fed to detection. From any other sender it is a report like
# any other.
CHECK_CALL_ID_PREFIX = "callsentry-check-"


class CallState(enum.StrEnum):
    RINGING = "RINGING"
    ANSWERED = "ANSWERED"
    HANGUP = "HANGUP"


# Token (lower case) -> (state, SIP-like code kept when the switch gave one).
STATE_TOKENS: dict[str, tuple[CallState, int | None]] = {
    "180": (CallState.RINGING, 180),
    "183": (CallState.RINGING, 183),
    "ringing": (CallState.RINGING, None),
    "ok": (CallState.ANSWERED, None),
    "200": (CallState.ANSWERED, 200),
    "bye": (CallState.HANGUP, None),
}


class RejectReason(enum.StrEnum):
    """Stable reason codes for quarantined reports (metric labels, `rejects.reason`)."""

    EMPTY = "empty"
    OVERSIZED = "oversized"
    UNDECODABLE = "undecodable"
    MISSING_FIELDS = "missing_fields"
    BAD_CALL_ID = "bad_call_id"
    BAD_SERIAL = "bad_serial"
    BAD_STATE = "bad_state"
    BAD_TS = "bad_ts"
    BAD_FIELD = "bad_field"


class CallEvent(NamedTuple):
    """One call-state report, decoded and validated.

    A NamedTuple rather than a dataclass: tens of thousands are made per second
    on the datagram path, and a tuple is built, journaled (as a JSON array) and
    turned into columns several times faster.
    """

    ts: float
    call_id: str
    serial: int
    state: CallState
    code: int | None
    caller: str
    callee: str
    forward: str
    menu_id: str
    menu_name: str
    source: str = ""
    # The name `receiver.switches` gives the sender's address ("" when it names none).
    switch: str = ""
    # A deployment check (see CHECK_CALL_ID_PREFIX): stored in `checks`, never detected on.
    check: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.call_id, self.serial)


class Reject(NamedTuple):
    """A report that could not be turned into a `CallEvent`, kept raw in quarantine.

    `call_id` and `serial` are set when they could still be read; such a report
    is answered (so the switch stops retrying it) and deduplicated by that key.
    """

    ts: float
    reason: RejectReason
    detail: str
    raw: bytes
    call_id: str | None = None
    serial: int | None = None
    source: str = ""

    @property
    def key(self) -> tuple[str, int] | None:
        if self.call_id is None or self.serial is None:
            return None
        return (self.call_id, self.serial)

    def said(self) -> str:
        """The reject as replay and simulate list it: where, its reason, why (network
        text: escape it for where it is shown)."""
        return f"{self.source}: {self.reason.value}: {self.detail}"
