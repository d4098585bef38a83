"""Input codecs: bytes of one datagram -> `CallEvent` or `Reject`, and the answer bytes.

A codec never raises past `decode`: every problem becomes a `Reject` with a
reason code and a sentence that says what was wrong, and with the answer when
call_id and serial can still be read (docs/protocol.md, obligation 3).

>>> codec = Vos3000TextCodec()
>>> decoded = codec.decode(b"7f3a9c01@10.0.0.5,2,OK,8613800000001,4420719460000,,12,Main menu", 0.0)
>>> decoded.item.state, decoded.item.menu_name, decoded.answer
(<CallState.ANSWERED: 'ANSWERED'>, 'Main menu', b'7f3a9c01@10.0.0.5,2')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from engine.core.events import (
    MAX_CALL_ID_BYTES,
    MAX_SERIAL_DIGITS,
    STATE_TOKENS,
    CallEvent,
    CallState,
    Reject,
    RejectReason,
)

MAX_DATAGRAM_BYTES = 2048
# The receiver reads at most this much of a datagram (docs/protocol.md: a report is at
# most MAX_DATAGRAM_BYTES), so one of exactly this size may have been longer: the
# socket cut it there, and the journal holds only what was read.
RECEIVE_BYTES = 4096
SEPARATORS = (",", "|", ";", "\t")
FIELD_COUNT = 8
_TRAILER = b"\r\n\x00"
_DIGITS = frozenset("0123456789")
_new_tuple = tuple.__new__


class Decoded(NamedTuple):
    item: CallEvent | Reject
    # Bytes to send back to the switch, or None when call_id and serial are unreadable.
    answer: bytes | None


class Codec(Protocol):
    @property
    def name(self) -> str: ...

    def decode(self, data: bytes, ts: float, source: str = "", switch: str = "") -> Decoded: ...

    def encode(self, event: CallEvent) -> bytes: ...

    def answer(self, call_id: str, serial: int) -> bytes: ...

    def read_key(self, data: bytes) -> tuple[tuple[str, int], bytes] | None: ...

    @property
    def key_separator(self) -> bytes | None:
        """The byte that ends call_id and serial in the usual report, for a reader
        that reads those keys itself exactly as `read_key` would (None: no such)."""


class FieldError(ValueError):
    """A field of a report is invalid; `reason` is the quarantine reason code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_call_id(text: str) -> str:
    call_id = text.strip()
    if not call_id:
        raise FieldError(RejectReason.BAD_CALL_ID, "call_id is empty")
    if len(call_id.encode("utf-8", "surrogatepass")) > MAX_CALL_ID_BYTES:
        raise FieldError(
            RejectReason.BAD_CALL_ID, f"call_id is longer than {MAX_CALL_ID_BYTES} bytes"
        )
    if not call_id.isprintable():
        raise FieldError(
            RejectReason.BAD_CALL_ID, f"call_id {_clip(call_id)!r} has unprintable characters"
        )
    return call_id


def parse_serial(text: str) -> int:
    serial = text.strip()
    # str.isdigit() accepts non-ASCII digits such as '²'; the wire format does not.
    if not serial or not _DIGITS.issuperset(serial):
        raise FieldError(
            RejectReason.BAD_SERIAL, f"serial {_clip(serial)!r} is not a non-negative integer"
        )
    if len(serial) > MAX_SERIAL_DIGITS:
        raise FieldError(
            RejectReason.BAD_SERIAL, f"serial has more than {MAX_SERIAL_DIGITS} digits"
        )
    return int(serial)


def parse_state(text: str) -> tuple[CallState, int | None]:
    token = text.strip().lower()
    try:
        return STATE_TOKENS[token]
    except KeyError:
        raise FieldError(
            RejectReason.BAD_STATE,
            f"unknown state {_clip(text.strip())!r} (expected 180, 183, ringing, ok, 200 or bye)",
        ) from None


# The encodings a report in a file may have been sent in (`codec.encodings`' default):
# a row fits a report when it fits in one of them, as Chinese menu names fit in GBK's
# two bytes a character where UTF-8 takes three.
REPORT_ENCODINGS = ("utf-8", "gbk")


def _report_bytes(fields: Sequence[str], encoding: str) -> int:
    """The bytes of the 8 fields joined by a one-byte separator in `encoding` (one
    it cannot write them in: more than any report may be)."""
    errors = "surrogatepass" if encoding == "utf-8" else "strict"
    try:
        return sum(len(field.encode(encoding, errors)) for field in fields) + len(fields) - 1
    except UnicodeEncodeError:
        return MAX_DATAGRAM_BYTES + 1


def make_file_event(ts: float, fields: Sequence[str], source: str, switch: str = "") -> CallEvent:
    """`make_event` for a row of an event file (or a stored report read back): a row
    longer than a report may be, in each of `REPORT_ENCODINGS`, is refused as
    `oversized`, as the receiver refuses such a datagram before reading its fields, so
    replay stores what live stores."""
    size = min(_report_bytes(fields, encoding) for encoding in REPORT_ENCODINGS)
    if size > MAX_DATAGRAM_BYTES:
        # A bad key is said first, as the receiver keeps the key of an oversized report.
        parse_call_id(fields[0])
        parse_serial(fields[1])
        raise FieldError(
            RejectReason.OVERSIZED,
            f"report of {size} bytes (its fields joined as the switch sends them) is over "
            f"the {MAX_DATAGRAM_BYTES}-byte limit",
        )
    return make_event(ts, fields, source, switch)


def make_event(ts: float, fields: Sequence[str], source: str, switch: str = "") -> CallEvent:
    """Validate the 8 text fields (from a datagram or an event file) into a `CallEvent`,
    in protocol order: call_id, serial, state, caller, callee, forward, menu_id, menu_name."""
    call_id, serial, state, caller, callee, forward, menu_id, menu_name = fields
    # Key fields first: a report whose key is bad is rejected for that, whatever else is wrong.
    parsed_call_id = parse_call_id(call_id)
    parsed_serial = parse_serial(serial)
    parsed_state, code = parse_state(state)
    return CallEvent(
        ts,
        parsed_call_id,
        parsed_serial,
        parsed_state,
        code,
        caller.strip(),
        callee.strip(),
        forward.strip(),
        menu_id.strip(),
        menu_name.strip(),
        source,
        switch,
    )


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True, slots=True)
class Vos3000TextCodec:
    """The `vos3000-text` codec of docs/protocol.md: 8 text fields, menu_name the rest."""

    separator: str = ","
    encodings: tuple[str, ...] = ("utf-8", "gbk")
    max_bytes: int = MAX_DATAGRAM_BYTES
    name: str = "vos3000-text"
    _separator_bytes: bytes = field(default=b",", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.separator not in SEPARATORS:
            raise ValueError(
                f"separator {self.separator!r} is not one of "
                + ", ".join(repr(s) for s in SEPARATORS)
            )
        if not self.encodings:
            raise ValueError("at least one encoding is needed")
        for encoding in self.encodings:
            try:
                ascii_compatible = "Az09,|;\t".encode(encoding) == b"Az09,|;\t"
            except LookupError:
                raise ValueError(f"unknown encoding {encoding!r}") from None
            if not ascii_compatible:
                raise ValueError(f"encoding {encoding!r} does not keep ASCII as it is")
        # Frozen: set once here, read on every datagram.
        object.__setattr__(self, "_separator_bytes", self.separator.encode("ascii"))

    def decode(self, data: bytes, ts: float, source: str = "", switch: str = "") -> Decoded:
        """`switch`: the name the sender's address goes by (engine.ingest.senders)."""
        if not data:
            return Decoded(
                Reject(ts, RejectReason.EMPTY, "empty datagram", data, source=source), None
            )
        if len(data) > self.max_bytes:
            size = (
                f"{len(data)} bytes or more (read no further)"
                if len(data) == RECEIVE_BYTES
                else f"{len(data)} bytes"
            )
            return self._reject(
                data,
                ts,
                source,
                RejectReason.OVERSIZED,
                f"datagram of {size} is over the {self.max_bytes}-byte limit",
            )
        body = data.rstrip(_TRAILER)
        text: str | None = None
        encoding = self.encodings[0]
        try:
            text = body.decode(encoding)
        except UnicodeDecodeError:
            for encoding in self.encodings[1:]:
                try:
                    text = body.decode(encoding)
                    break
                except UnicodeDecodeError:
                    continue
        if text is None:
            return self._reject(
                data,
                ts,
                source,
                RejectReason.UNDECODABLE,
                "datagram is not valid " + " or ".join(self.encodings),
            )
        separator = self.separator
        fields = text.split(separator, FIELD_COUNT - 1)
        if len(fields) == FIELD_COUNT:
            # Fast path for the common well-formed ASCII report; anything unusual
            # falls through to make_event, which names the exact problem.
            call_id = fields[0].strip()
            serial = fields[1].strip()
            state = STATE_TOKENS.get(fields[2].strip().lower())
            if (
                state is not None
                and call_id
                and serial.isdigit()
                and serial.isascii()
                and len(serial) <= MAX_SERIAL_DIGITS
                and call_id.isascii()
                and len(call_id) <= MAX_CALL_ID_BYTES
                and call_id.isprintable()
            ):
                # tuple.__new__ skips the NamedTuple's Python-level __new__.
                return _new_tuple(
                    Decoded,
                    (
                        _new_tuple(
                            CallEvent,
                            (
                                ts,
                                call_id,
                                int(serial),
                                state[0],
                                state[1],
                                fields[3].strip(),
                                fields[4].strip(),
                                fields[5].strip(),
                                fields[6].strip(),
                                fields[7].strip(),
                                source,
                                switch,
                                False,
                            ),
                        ),
                        f"{call_id}{separator}{serial}".encode(encoding),
                    ),
                )
        else:
            return self._reject_fields(
                data,
                ts,
                source,
                fields,
                encoding,
                RejectReason.MISSING_FIELDS,
                f"{len(fields)} of {FIELD_COUNT} fields "
                f"(call_id,serial,state,caller,callee,forward,menu_id,menu_name "
                f"separated by {separator!r})",
            )
        try:
            event = make_event(ts, fields, source, switch)
        except FieldError as error:
            return self._reject_fields(
                data, ts, source, fields, encoding, error.reason, error.detail
            )
        return Decoded(event, self._answer(event.call_id, fields[1].strip(), encoding))

    def encode(self, event: CallEvent) -> bytes:
        """The datagram a switch would send for `event` (first encoding)."""
        state = str(event.code) if event.code is not None else _STATE_WORDS[event.state]
        fields = (
            event.call_id,
            str(event.serial),
            state,
            event.caller,
            event.callee,
            event.forward,
            event.menu_id,
            event.menu_name,
        )
        return self.separator.join(fields).encode(self.encodings[0])

    def answer(self, call_id: str, serial: int) -> bytes:
        return self._answer(call_id, str(serial), self.encodings[0])

    def _answer(self, call_id: str, serial: str, encoding: str) -> bytes:
        # The serial goes back as the switch wrote it ("007" stays "007").
        return f"{call_id}{self.separator}{serial}".encode(encoding, "replace")

    @property
    def key_separator(self) -> bytes:
        # engine/ingest/_fastio.c reads the usual key as the first branch of read_key does.
        return self._separator_bytes

    def read_key(self, data: bytes) -> tuple[tuple[str, int], bytes] | None:
        """(call_id, serial) and the answer bytes, exactly as `decode` would give them,
        or None when they are unreadable; cheap for the common ASCII key.

        The receiver answers on this alone; the full decode happens off the answer path.
        """
        separator = self._separator_bytes
        parts = data.split(separator, 2)
        if len(parts) == 3:
            # The usual report: ASCII call_id and digits, no padding; its answer is
            # its own first two fields. (Both fit well inside the size limit, so
            # reading past it changes nothing.)
            raw_id, raw_serial = parts[0], parts[1]
            if (
                raw_serial.isdigit()
                and len(raw_serial) <= MAX_SERIAL_DIGITS
                and 0 < len(raw_id) <= MAX_CALL_ID_BYTES
                and raw_id.isascii()
            ):
                call_id = raw_id.decode("ascii")
                if call_id.isprintable() and call_id[0] != " " and call_id[-1] != " ":
                    return (call_id, int(raw_serial)), raw_id + separator + raw_serial
        parts = data[: self.max_bytes].split(separator, 2)
        if len(parts) == 3 and parts[0].isascii() and parts[1].isascii():
            # An ASCII prefix decodes the same in every allowed encoding, and no
            # multi-byte GBK character can hide a separator inside it.
            call_id = parts[0].decode("ascii").strip()
            serial = parts[1].decode("ascii").strip()
            if (
                call_id
                and len(call_id) <= MAX_CALL_ID_BYTES
                and call_id.isprintable()
                and serial.isdigit()
                and len(serial) <= MAX_SERIAL_DIGITS
            ):
                return (call_id, int(serial)), f"{call_id}{self.separator}{serial}".encode("ascii")
        item, answer = self.decode(data, 0.0)
        key = item.key
        if key is None or answer is None:
            return None
        return key, answer

    def _reject(
        self, data: bytes, ts: float, source: str, reason: RejectReason, detail: str
    ) -> Decoded:
        """Reject with only raw bytes at hand: the key may still be readable from them."""
        parts = data[: self.max_bytes].split(self._separator_bytes, 2)
        if len(parts) == 3:
            for encoding in self.encodings:
                try:
                    call_id = parse_call_id(parts[0].decode(encoding))
                    serial_text = parts[1].decode("ascii").strip()
                    serial = parse_serial(serial_text)
                except (UnicodeDecodeError, FieldError):
                    continue
                return Decoded(
                    Reject(ts, reason, detail, data, call_id, serial, source),
                    self._answer(call_id, serial_text, encoding),
                )
        return Decoded(Reject(ts, reason, detail, data, None, None, source), None)

    def _reject_fields(
        self,
        data: bytes,
        ts: float,
        source: str,
        fields: Sequence[str],
        encoding: str,
        reason: RejectReason,
        detail: str,
    ) -> Decoded:
        call_id = serial = None
        if len(fields) >= 2 and reason is not RejectReason.BAD_CALL_ID:
            try:
                call_id = parse_call_id(fields[0])
                serial = parse_serial(fields[1])
            except FieldError:
                call_id = serial = None
        reject = Reject(ts, reason, detail, data, call_id, serial, source)
        if call_id is None or serial is None:
            return Decoded(reject, None)
        return Decoded(reject, self._answer(call_id, fields[1].strip(), encoding))


_STATE_WORDS = {
    CallState.RINGING: "Ringing",
    CallState.ANSWERED: "OK",
    CallState.HANGUP: "Bye",
}

CODECS: dict[str, Callable[..., Codec]] = {"vos3000-text": Vos3000TextCodec}


def build_codec(name: str, separator: str, encodings: Sequence[str]) -> Codec:
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None
    return factory(separator=separator, encodings=tuple(encodings))
