from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.events import (
    MAX_CALL_ID_BYTES,
    MAX_SERIAL_DIGITS,
    CallEvent,
    CallState,
    Reject,
    RejectReason,
)
from engine.ingest import native
from engine.ingest.codec import SEPARATORS, Vos3000TextCodec

# None where it is not built or is stale; tests/test_fastio.py fails then on Linux.
fastio = native.load("_fastio")

CODEC = Vos3000TextCodec()


def test_manual_example_decodes_and_answers_with_call_id_and_serial() -> None:
    data = b"7f3a9c01@10.0.0.5,2,OK,8613800000001,4420719460000,,12,Main menu"
    item, answer = CODEC.decode(data, 1700000000.0, "10.0.0.5:5060")
    assert isinstance(item, CallEvent)
    assert item.call_id == "7f3a9c01@10.0.0.5"
    assert item.serial == 2
    assert item.state is CallState.ANSWERED
    assert item.code is None
    assert (item.caller, item.callee, item.forward) == ("8613800000001", "4420719460000", "")
    assert (item.menu_id, item.menu_name) == ("12", "Main menu")
    assert item.source == "10.0.0.5:5060"
    assert answer == b"7f3a9c01@10.0.0.5,2"


@pytest.mark.parametrize(
    ("token", "state", "code"),
    [
        ("180", CallState.RINGING, 180),
        ("183", CallState.RINGING, 183),
        ("Ringing", CallState.RINGING, None),
        ("RINGING", CallState.RINGING, None),
        ("ok", CallState.ANSWERED, None),
        ("200", CallState.ANSWERED, 200),
        ("BYE", CallState.HANGUP, None),
        (" bye ", CallState.HANGUP, None),
    ],
)
def test_state_tokens(token: str, state: CallState, code: int | None) -> None:
    item, _ = CODEC.decode(f"c1,1,{token},a,b,,,".encode(), 0.0)
    assert isinstance(item, CallEvent)
    assert (item.state, item.code) == (state, code)


def test_menu_name_takes_the_rest_and_trailers_and_spaces_are_trimmed() -> None:
    item, answer = CODEC.decode(
        b" c1 , 7 ,bye, a , b , f , m1 , Sales, support, 24/7 \r\n\x00", 0.0
    )
    assert isinstance(item, CallEvent)
    assert item.call_id == "c1" and item.serial == 7
    assert (item.caller, item.callee, item.forward, item.menu_id) == ("a", "b", "f", "m1")
    assert item.menu_name == "Sales, support, 24/7"
    assert answer == b"c1,7"


@pytest.mark.parametrize("separator", SEPARATORS)
def test_every_separator_and_answer_uses_it(separator: str) -> None:
    codec = Vos3000TextCodec(separator=separator)
    fields = ["c9", "3", "183", "100", "200", "300", "m", "menu"]
    item, answer = codec.decode(separator.join(fields).encode(), 0.0)
    assert isinstance(item, CallEvent) and item.code == 183
    assert answer == f"c9{separator}3".encode()


def test_gbk_menu_name_is_decoded_and_answer_is_in_the_same_encoding() -> None:
    data = "c1|4|OK|1|2||9|客户服务".encode("gbk")
    item, answer = Vos3000TextCodec(separator="|").decode(data, 0.0)
    assert isinstance(item, CallEvent)
    assert item.menu_name == "客户服务"
    assert answer == b"c1|4"


def test_gbk_trail_byte_equal_to_the_pipe_separator_does_not_split_a_field() -> None:
    # '亅' is 0x81 0x7C in GBK: its trail byte is '|'. Decoding before splitting keeps it whole.
    menu_id = "亅"
    assert b"|" in menu_id.encode("gbk")
    data = f"c1|4|OK|1|2||{menu_id}|菜单".encode("gbk")
    item, _ = Vos3000TextCodec(separator="|").decode(data, 0.0)
    assert isinstance(item, CallEvent)
    assert (item.menu_id, item.menu_name) == (menu_id, "菜单")


MALFORMED = [
    (b"", RejectReason.EMPTY, None),
    (b"c1,1,OK,a,b,,m," + b"x" * 2100, RejectReason.OVERSIZED, b"c1,1"),
    (b"\xff\xfe\x00\x81", RejectReason.UNDECODABLE, None),
    (b"c1,1,OK,a,b,,9,\xff\xff\xff", RejectReason.UNDECODABLE, b"c1,1"),
    (b"c1,1,OK,a,b", RejectReason.MISSING_FIELDS, b"c1,1"),
    (b"just-text", RejectReason.MISSING_FIELDS, None),
    (b"c1,1,RING,a,b,,,", RejectReason.BAD_STATE, b"c1,1"),
    (b"c1,1,,a,b,,,", RejectReason.BAD_STATE, b"c1,1"),
    (b"c1,-1,OK,a,b,,,", RejectReason.BAD_SERIAL, None),
    (b"c1,1.5,OK,a,b,,,", RejectReason.BAD_SERIAL, None),
    (b"c1,,OK,a,b,,,", RejectReason.BAD_SERIAL, None),
    ("c1,²,OK,a,b,,,".encode(), RejectReason.BAD_SERIAL, None),
    (b"c1,1234567890123456789,OK,a,b,,,", RejectReason.BAD_SERIAL, None),
    (b",1,OK,a,b,,,", RejectReason.BAD_CALL_ID, None),
    (b"   ,1,OK,a,b,,,", RejectReason.BAD_CALL_ID, None),
    (b"c" * 129 + b",1,OK,a,b,,,", RejectReason.BAD_CALL_ID, None),
    (b"c\x01d,1,OK,a,b,,,", RejectReason.BAD_CALL_ID, None),
    (b",,,,,,,", RejectReason.BAD_CALL_ID, None),
    (b"\r\n", RejectReason.MISSING_FIELDS, None),
    (b"c1|1|OK|a|b|||", RejectReason.MISSING_FIELDS, None),
]


@pytest.mark.parametrize(("data", "reason", "answer"), MALFORMED)
def test_malformed_reports_get_a_specific_reason(
    data: bytes, reason: RejectReason, answer: bytes | None
) -> None:
    item, got_answer = CODEC.decode(data, 5.0, "1.2.3.4:5")
    assert isinstance(item, Reject)
    assert item.reason is reason, item.detail
    assert item.detail
    assert item.raw == data
    assert got_answer == answer
    assert (item.key is not None) == (answer is not None)


def test_reject_details_say_what_was_wrong() -> None:
    item, _ = CODEC.decode(b"c1,1,RING,a,b,,,", 0.0)
    assert isinstance(item, Reject)
    assert "unknown state 'RING'" in item.detail
    item, _ = CODEC.decode(b"c1,1,OK,a,b", 0.0)
    assert isinstance(item, Reject) and item.detail.startswith("5 of 8 fields")


def test_codec_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="separator"):
        Vos3000TextCodec(separator=":")
    with pytest.raises(ValueError, match="unknown encoding"):
        Vos3000TextCodec(encodings=("utf-8", "no-such-codec"))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=2200), st.sampled_from(SEPARATORS))
def test_decode_never_raises_on_any_bytes(data: bytes, separator: str) -> None:
    item, answer = Vos3000TextCodec(separator=separator).decode(data, 1.0)
    assert isinstance(item, CallEvent | Reject)
    if isinstance(item, Reject):
        assert item.raw == data and item.detail
    if answer is not None:
        assert item.key is not None


def _field(exclude: str) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(
            blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=exclude
        ),
        max_size=20,
    )


@settings(max_examples=500, deadline=None)
@given(
    separator=st.sampled_from(SEPARATORS),
    call_id=_field(",|;\t").filter(lambda text: bool(text) and text.isprintable()),
    serial=st.integers(min_value=0, max_value=10**18 - 1),
    state=st.sampled_from(
        [
            (CallState.RINGING, 180),
            (CallState.RINGING, 183),
            (CallState.RINGING, None),
            (CallState.ANSWERED, None),
            (CallState.ANSWERED, 200),
            (CallState.HANGUP, None),
        ]
    ),
    numbers=st.lists(_field(",|;\t"), min_size=4, max_size=4),
    menu_name=st.text(
        st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=40
    ),
)
def test_round_trip(
    separator: str,
    call_id: str,
    serial: int,
    state: tuple[CallState, int | None],
    numbers: list[str],
    menu_name: str,
) -> None:
    codec = Vos3000TextCodec(separator=separator)
    event = CallEvent(7.5, call_id, serial, state[0], state[1], *numbers, menu_name, "x")
    data = codec.encode(event)
    # Within the limits by construction (20 characters of at most 4 bytes a field, 40 of
    # menu name): every example is decoded, none passes by being skipped.
    assert len(data) <= codec.max_bytes and len(call_id.encode()) <= MAX_CALL_ID_BYTES
    item, answer = codec.decode(data, 7.5, "x")
    assert item == event
    assert answer == codec.answer(call_id, serial)


# Datagrams around the key: anything, or two commas with odd call_ids and serials.
KEYISH = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda a, b, rest: a + b"," + b + b"," + rest,
        st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode)),
        st.sampled_from([b"1", b" 7 ", b"007", b"", b"x", b"\xb2", b"1" * 18, b"9" * 19]),
        st.binary(max_size=40),
    ),
)


@settings(max_examples=3000, deadline=None)
@given(KEYISH, st.sampled_from(SEPARATORS))
def test_read_key_agrees_with_decode(data: bytes, separator: str) -> None:
    codec = Vos3000TextCodec(separator=separator)
    item, answer = codec.decode(data, 0.0)
    expected = None if item.key is None or answer is None else (item.key, answer)
    assert codec.read_key(data) == expected


def _usual_key(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """The key of the usual report, as the first branch of `read_key` takes it: a
    printable ASCII call_id with no space at either end, and 1-18 ASCII digits."""
    parts = data.split(b",", 2)
    if len(parts) < 3:
        return None
    call_id, serial = parts[0], parts[1]
    if not (0 < len(call_id) <= MAX_CALL_ID_BYTES and 0 < len(serial) <= MAX_SERIAL_DIGITS):
        return None
    if not (call_id.isascii() and call_id.decode().isprintable() and serial.isdigit()):
        return None
    if call_id.startswith(b" ") or call_id.endswith(b" "):
        return None
    return (call_id.decode(), int(serial)), call_id + b"," + serial


@settings(max_examples=3000, deadline=None)
@given(KEYISH)
def test_the_compiled_key_reader_agrees_with_read_key(data: bytes) -> None:
    # The receiver reads the usual key in C as datagrams come off the socket; it
    # must take exactly the usual reports, answering what read_key answers, and leave
    # every other datagram to read_key.
    if fastio is None:
        pytest.skip("compiled helper not built")
    read = fastio.read_usual_key(data, ord(","), MAX_CALL_ID_BYTES, MAX_SERIAL_DIGITS)
    assert read == _usual_key(data)
    assert read is None or read == CODEC.read_key(data)


def test_the_compiled_key_reader_takes_the_usual_report() -> None:
    if fastio is None:
        pytest.skip("compiled helper not built")
    usual = b"7f3a9c01@10.0.0.5,2,OK,8613800000001,4420719460000,,12,Main menu"
    assert fastio.read_usual_key(usual, ord(","), 128, 18) == CODEC.read_key(usual)
    assert fastio.read_usual_key(b"a,123456789012345678,", ord(","), 128, 18) == (
        ("a", 123456789012345678),
        b"a,123456789012345678",
    )


def test_read_key_of_an_oversized_report_and_of_gbk() -> None:
    assert CODEC.read_key(b"c1, 9 ,OK," + b"x" * 3000) == (("c1", 9), b"c1,9")
    data = "亅|4|OK|1|2||9|菜单".encode("gbk")
    assert Vos3000TextCodec(separator="|").read_key(data) == (("亅", 4), "亅|4".encode("gbk"))
