"""Notifications: each channel gets the alerts its route takes, through the outbox, in
the format it reads with network text escaped for it, within its rate limit (past it,
one digest per burst, kept across a restart). Real servers on loopback: an SMTP
server (aiosmtpd), an HTTP endpoint for Apprise's json://, a syslog socket."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st

from engine.alerts.couriers import Courier, Dispatch, RetryPolicy
from engine.alerts.notify import (
    DIGEST_PREFIX,
    ChannelState,
    NotifyDestination,
    NotifySink,
    Route,
    notify_state_path,
)
from engine.alerts.outbox import Outbox, outbox_path
from engine.alerts.transports import SD_ID, AppriseTransport
from engine.apps.delivery import make_durable_sinks, outbox_destinations
from engine.apps.settings import ConfigError, load_settings
from engine.core.text import (
    display_width,
    html_text,
    markdown_text,
    shown,
    syslog_param,
    terminal_table,
)
from engine.detect.alerts import Alert
from tests.conftest import make_settings, wait_for
from tests.test_outbox import Receiver, free_port, risky_events

# A menu name as an attacker could send it: markup, an attribute that runs script,
# Markdown, a terminal escape and a forged second line.
HOSTILE_MENU = '<img src=x onerror="alert(1)"> **[pay](http://evil)** \x1b[2J\nALERT forged'
CONSOLE = "https://console.example.org"
FAST = RetryPolicy(give_up_after_s=86_400, first_backoff_s=0.05, max_backoff_s=0.2, poll_s=0.05)


def make_alert(
    n: int,
    *,
    severity: str = "critical",
    rule: str = "forward-spike",
    entity: str = "4008005001",
    summary: str = "",
    mode: str = "alert",
) -> Alert:
    return Alert(
        alert_id=f"00000000-0000-4000-8000-{n:012d}",
        rule_id=rule,
        detector="rule",
        severity=severity,
        entity_type="forward",
        entity=entity,
        window_start=1_764_500_000.0,
        window_end=1_764_501_800.0,
        raised_at=1_764_501_800.0 + n,
        value=40.0,
        threshold=12.0,
        summary=summary or f"forward number {entity} took 40 calls ({n})",
        evidence=[f"call-{n}"],
        rule_version="v1",
        mode=mode,
    )


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Mailbox:
    """A real SMTP server on loopback (aiosmtpd) keeping what it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content))
        return "250 OK"

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.close()


@pytest.fixture
def endpoint() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def deliver_all(settings_dir: Path, dispatch: Dispatch) -> None:
    """Run each courier's passes until nothing it can send now waits."""
    for courier in dispatch.couriers:
        for _ in range(20):
            courier.work()
            if not dispatch.outbox.due(courier.name, courier.clock(), 1):
                break


def wired(settings: Any, alerts: list[Alert], tags: dict[str, list[str]]) -> Dispatch:
    """The lake writer's sinks and serve's couriers, as the settings make them."""
    for sink in make_durable_sinks(settings, tags_of=lambda rule_id: tags.get(rule_id, [])):
        sink.deliver(alerts)
    outbox = Outbox.of(settings.store.data_dir)
    return Dispatch(outbox, outbox_destinations(settings), FAST)


# -- e-mail ---------------------------------------------------------------------------


def test_a_critical_alert_reaches_a_real_smtp_server_with_its_text_escaped(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    url = f"mailto://127.0.0.1:{mailbox.port}?from=callsentry@example.org&to=fraud@example.org"
    settings = make_settings(
        tmp_path / "data",
        notify={"channels": [{"name": "fraud-mail", "url": url, "severities": ["critical"]}]},
        console={"public_url": CONSOLE + "/"},
    )
    critical = make_alert(1, summary=f"menu {HOSTILE_MENU} forwarded 40 calls")
    quiet = make_alert(2, severity="high")
    dispatch = wired(settings, [critical, quiet], {})
    deliver_all(tmp_path, dispatch)

    assert len(mailbox.messages) == 1, "the high alert is not routed to this channel"
    mail = mailbox.messages[0]
    assert mail["Subject"] == "[callsentry] CRITICAL alert: forward-spike"
    assert mail["To"] == "fraud@example.org"
    parts = {part.get_content_type(): part for part in mail.walk()}
    html = parts["text/html"].get_payload(decode=True).decode("utf-8")
    # The menu name arrives as text: no tag, no attribute, no escape sequence, no line.
    assert "<img" not in html and "\x1b" not in html and "\nALERT forged" not in html
    assert html_text(HOSTILE_MENU) in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "\\x1b[2J\\x0aALERT forged" in html
    assert f'href="{CONSOLE}/alerts/{critical.alert_id}"' in html
    assert "4008005001" in html and "threshold 12" in html
    # The plain-text part the transport makes keeps the console's address.
    text = parts["text/plain"].get_payload(decode=True).decode("utf-8")
    assert f"{CONSOLE}/alerts/{critical.alert_id}" in text
    counts = dispatch.outbox.counts()["notify.fraud-mail"]
    assert (counts.delivered, counts.pending) == (1, 0)


# -- JSON over HTTP (Apprise json://) ---------------------------------------------------


def test_a_loopback_http_endpoint_receives_the_alert_as_json(
    tmp_path: Path, endpoint: Receiver
) -> None:
    url = f"json://127.0.0.1:{endpoint.port}/hook"
    settings = make_settings(
        tmp_path / "data",
        notify={"channels": [{"name": "soc", "url": url, "tags": ["irsf"]}]},
        console={"public_url": CONSOLE},
    )
    tagged = make_alert(1, summary=f"menu {HOSTILE_MENU}")
    untagged = make_alert(2, rule="short-calls-caller")
    dispatch = wired(settings, [tagged, untagged], {"forward-spike": ["irsf", "spike"]})
    deliver_all(tmp_path, dispatch)

    assert len(endpoint.posts) == 1, "only the alert whose rule has the tag"
    _, body = endpoint.posts[0]
    assert body["title"] == "[callsentry] CRITICAL alert: forward-spike"
    message = str(body["message"])
    assert shown(f"menu {HOSTILE_MENU}") in message and "\x1b" not in message
    assert f"Open the alert in the console: {CONSOLE}/alerts/{tagged.alert_id}" in message
    assert "Tags: irsf, spike" in message


# -- rate limit and digest --------------------------------------------------------------


def channel(
    tmp_path: Path, endpoint: Receiver, clock: Clock, limit: int
) -> tuple[Outbox, NotifyDestination, Courier]:
    """A channel as serve makes it (a fresh start: new objects on the same files)."""
    outbox = Outbox(outbox_path(tmp_path), clock=clock)
    transport = AppriseTransport(f"json://127.0.0.1:{endpoint.port}/hook")
    destination = NotifyDestination(
        "notify.soc", transport, tmp_path, limit=limit, period_s=600,
        public_url=CONSOLE, outbox=outbox, clock=clock,
    )  # fmt: skip
    return outbox, destination, Courier(outbox, destination, FAST, clock=clock)


def enqueue(outbox: Outbox, alerts: list[Alert]) -> None:
    NotifySink(outbox, [("notify.soc", Route())]).deliver(alerts)


def test_a_burst_beyond_the_rate_limit_becomes_one_digest_across_a_restart(
    tmp_path: Path, endpoint: Receiver
) -> None:
    clock = Clock()
    outbox, destination, courier = channel(tmp_path, endpoint, clock, limit=3)
    burst = [make_alert(n) for n in range(10)]
    enqueue(outbox, burst)
    courier.work()
    titles = [str(body["title"]) for _, body in endpoint.posts]
    assert titles == ["[callsentry] CRITICAL alert: forward-spike"] * 3
    assert len(ChannelState(notify_state_path(tmp_path)).held("notify.soc")) == 7
    # The seven held alerts are delivered as far as the outbox is concerned; the digest
    # waits for the period to end.
    counts = outbox.counts()["notify.soc"]
    assert (counts.delivered, counts.pending) == (10, 1)

    # A restart in the middle of the burst: nothing held is lost, nothing sent twice.
    outbox.close()
    clock.now += 599
    outbox, destination, courier = channel(tmp_path, endpoint, clock, limit=3)
    courier.work()
    assert len(endpoint.posts) == 3, "still within the period"
    clock.now += 2
    courier.work()
    courier.work()
    assert len(endpoint.posts) == 4
    _, digest = endpoint.posts[3]
    assert digest["title"] == "[callsentry] 7 alerts held by the rate limit (3 messages per 600 s)"
    message = str(digest["message"])
    listed = [a.alert_id for a in burst[3:]]
    assert all(f"{CONSOLE}/alerts/{alert_id}" in message for alert_id in listed)
    assert not any(f"/alerts/{a.alert_id}" in message for a in burst[:3])
    assert ChannelState(notify_state_path(tmp_path)).held("notify.soc") == []

    # The digest delivered again (a crash before the outbox marked it) sends nothing.
    destination.send(f"{DIGEST_PREFIX}{clock.now}", b"")
    assert len(endpoint.posts) == 4
    # The period rolled on: the next alert goes out on its own.
    enqueue(outbox, [make_alert(99)])
    courier.work()
    assert len(endpoint.posts) == 5
    assert str(endpoint.posts[4][1]["message"]).count("/alerts/") == 1
    assert outbox.counts()["notify.soc"].pending == 0


def test_an_alert_held_then_delivered_again_names_the_same_digest(
    tmp_path: Path, endpoint: Receiver
) -> None:
    clock = Clock()
    outbox, destination, courier = channel(tmp_path, endpoint, clock, limit=1)
    enqueue(outbox, [make_alert(1), make_alert(2)])
    courier.work()
    payload = make_alert(2).alert_id
    # The courier crashed before it marked alert 2 delivered: it comes again.
    destination.send(payload, outbox.listing(("delivered",), "notify.soc", 10)[0].payload)
    digests = [d for d in outbox.listing(("pending",), "notify.soc", 10)]
    assert [d.key.startswith(DIGEST_PREFIX) for d in digests] == [True]
    clock.now += 600
    courier.work()
    assert len(endpoint.posts) == 2
    assert "1 alert held" in str(endpoint.posts[1][1]["title"])


# -- syslog -----------------------------------------------------------------------------

RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>[!-~]{1,255}) "
    r"(?P<app>[!-~]{1,48}) (?P<proc>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    r"(?P<sd>\[.*\]) \ufeff(?P<msg>.*)$",
    re.S,
)
SD_PARAM = re.compile(r' ([^= \]"]{1,32})="((?:[^"\\\]]|\\["\\\]])*)"')


def structured_data(sd: str) -> dict[str, str]:
    """The one SD-ELEMENT's params, unescaped (RFC 5424 section 6.3.3)."""
    assert sd.startswith(f"[{SD_ID}") and sd.endswith("]"), sd
    inner = sd[len(SD_ID) + 1 : -1]
    params = {m.group(1): re.sub(r"\\(.)", r"\1", m.group(2)) for m in SD_PARAM.finditer(inner)}
    assert "".join(m.group(0) for m in SD_PARAM.finditer(inner)) == inner, "no stray text"
    return params


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_a_syslog_receiver_gets_a_valid_rfc5424_line(tmp_path: Path, protocol: str) -> None:
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(30)
        port = server.getsockname()[1]
        received: list[bytes] = []
        if protocol == "tcp":
            server.listen(1)

            def accept() -> None:
                connection, _ = server.accept()
                with connection:
                    data = b""
                    while chunk := connection.recv(65536):
                        data += chunk
                received.append(data)

            reader = threading.Thread(target=accept)
            reader.start()
        settings = make_settings(
            tmp_path / "data",
            notify={"channels": [{"name": "siem", "syslog": f"{protocol}://127.0.0.1:{port}"}]},
            console={"public_url": CONSOLE},
        )
        entity = '8613"]\\\x1b[2J'
        alert = make_alert(1, entity=entity, summary=f"menu {HOSTILE_MENU}")
        dispatch = wired(settings, [alert], {"forward-spike": ["irsf"]})
        deliver_all(tmp_path, dispatch)
        if protocol == "udp":
            received.append(server.recv(65536))
        else:
            reader.join(30)
    (data,) = received
    if protocol == "tcp":
        length, _, data = data.partition(b" ")  # octet counting (RFC 6587)
        assert int(length) == len(data)
    line = data.decode("utf-8")
    match = RFC5424.match(line)
    assert match, line
    assert int(match["pri"]) == 16 * 8 + 2, "local0, critical"
    assert (match["app"], match["msgid"]) == ("callsentry", "alert")
    assert "\n" not in line and "\x1b" not in line
    params = structured_data(match["sd"])
    assert params["entity"] == shown(entity)
    assert params["alert_id"] == alert.alert_id and params["rule_id"] == "forward-spike"
    assert params["link"] == f"{CONSOLE}/alerts/{alert.alert_id}"
    assert params["tags"] == "irsf" and params["level"] == "critical"
    assert params["value"] == "40" and params["threshold"] == "12"
    assert "escalated_at" not in params, "not escalated: no param, not the text None"
    assert "None" not in params.values()
    assert match["msg"] == shown(f"menu {HOSTILE_MENU}")


# -- routing ----------------------------------------------------------------------------


def test_a_route_takes_an_alert_only_when_every_condition_holds() -> None:
    alert = make_alert(1, severity="high", rule="short-calls-caller")
    assert Route().takes(alert, [])
    assert Route(severities=frozenset({"high", "critical"})).takes(alert, [])
    assert not Route(severities=frozenset({"critical"})).takes(alert, [])
    # An alert without a level was raised at its rule's main threshold: critical.
    assert Route(levels=frozenset({"critical"})).takes(alert, [])
    assert not Route(levels=frozenset({"warning"})).takes(alert, [])
    assert Route(rules=("short-calls-*",)).takes(alert, [])
    assert not Route(rules=("short-calls",)).takes(alert, [])
    assert Route(tags=frozenset({"wangiri", "irsf"})).takes(alert, ["irsf"])
    assert not Route(tags=frozenset({"wangiri"})).takes(alert, ["irsf"])
    both = Route(severities=frozenset({"high"}), tags=frozenset({"irsf"}))
    assert both.takes(alert, ["irsf"]) and not both.takes(alert, [])


def test_shadow_alerts_and_unrouted_ones_are_never_enqueued(tmp_path: Path) -> None:
    outbox = Outbox(outbox_path(tmp_path))
    sink = NotifySink(outbox, [("notify.a", Route(severities=frozenset({"critical"})))])
    sink.deliver([make_alert(1, mode="shadow"), make_alert(2, severity="low"), make_alert(3)])
    assert [d.key for d in outbox.listing(("pending",))] == [make_alert(3).alert_id]


def test_replay_delivers_no_notification(tmp_path: Path, endpoint: Receiver) -> None:
    from engine.apps.replay import replay

    settings = make_settings(
        tmp_path / "data",
        detection={"alerts_jsonl": "off", "models_enabled": False},
        notify={"channels": [{"name": "soc", "url": f"json://127.0.0.1:{endpoint.port}/x"}]},
    )
    report = replay([risky_events(tmp_path / "events.csv", 5)], settings)
    assert len([a for a in report.alerts if a.mode == "alert"]) == 5
    assert endpoint.posts == []
    assert not outbox_path(settings.store.data_dir).exists()


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ({"name": "mail", "url": "nope://x"}, "channel 'mail': url (nope://...) is not a URL"),
        ({"name": "mail", "url": "no scheme"}, "channel 'mail': url is not an Apprise URL"),
        ({"name": "mail", "url": "tgram://${BOT}/1"}, "environment variable BOT (named as"),
        ({"name": "mail", "url": "json://x/${1X}"}, "${1X} does not name an environment"),
        ({"name": "x"}, "channel 'x': give either url"),
        ({"name": "x", "syslog": "udp://h:1", "url": "json://h"}, "channel 'x': give either"),
        ({"name": "x", "syslog": "syslog://h:1"}, "is not udp://HOST:PORT or tcp://"),
        ({"name": "x", "syslog": "udp://h:99999"}, "port '99999'"),
        ({"name": "x", "syslog": "udp://h", "facility": "local9"}, "'local9' is not a syslog"),
        ({"name": "a b", "syslog": "udp://h"}, "'a b': a channel's name is 1 to 64"),
        ({"name": "x", "syslog": "udp://h", "severities": ["urgent"]}, "severities.0"),
        ({"name": "x", "syslog": "udp://h", "rate_limit": -1}, "rate_limit"),
    ],
)
def test_a_bad_channel_is_a_config_error_naming_it(channel: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"notify": {"channels": [channel]}}, environ={})
    assert expected in str(raised.value)
    assert str(raised.value).startswith("notify.channels.0")


def test_two_channels_of_one_name_and_a_bad_console_url_are_refused() -> None:
    twice = [{"name": "a", "syslog": "udp://h"}, {"name": "a", "syslog": "tcp://h"}]
    with pytest.raises(ConfigError, match="two channels are named 'a'"):
        load_settings(None, {"notify": {"channels": twice}}, environ={})
    with pytest.raises(ConfigError, match=r"console.public_url .*is not an http"):
        load_settings(None, {"console": {"public_url": "javascript:alert(1)"}}, environ={})


def test_a_secret_from_the_environment_is_used_and_never_shown(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "callsentry.toml"
    config.write_text(
        '[[notify.channels]]\nname = "chat"\nurl = "slack://T1JJ3T3L2/A1BRTD4JD/${SLACK_TOKEN}"\n'
    )
    secret = "TIiajkdnlazkcOXrIdevi7FQ"
    settings = load_settings(config, environ={"SLACK_TOKEN": secret})
    (chat,) = settings.notify.channels
    assert secret in chat.expanded_url and secret not in repr(settings)
    checked = subprocess.run(
        [sys.executable, "-m", "engine", "config", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env={"SLACK_TOKEN": secret, "PATH": ""},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert secret not in checked.stdout + checked.stderr
    assert "slack://" in checked.stdout


def test_a_failing_service_says_why_without_its_secret(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    secret = "s3cret-token"
    transport = AppriseTransport(
        f"json://user:{secret}@127.0.0.1:{port}/hook", secrets=[secret], timeout_s=2
    )
    from engine.alerts.couriers import DeliveryError

    with pytest.raises(DeliveryError) as raised:
        transport.send_alert(json.loads(json.dumps(make_alert(1).as_json())), CONSOLE)
    assert secret not in str(raised.value) and str(raised.value)


# -- the escaping functions -------------------------------------------------------------


@given(st.lists(st.lists(st.text(max_size=30), min_size=3, max_size=3), max_size=8))
def test_a_terminal_table_lines_up_whatever_its_cells_hold(rows: list[list[str]]) -> None:
    # Columns had fixed widths: a destination name over 12 characters pushed the rest of
    # its row out of line (`alerts deliveries`).
    titles = ["DESTINATION", "KEY", "STATE"]
    lines = terminal_table(rows, titles)
    cells = [titles, *[[shown(c) for c in row] for row in rows]]
    assert len(lines) == len(cells)
    first, second = (max(display_width(row[i]) for row in cells) for i in (0, 1))
    for line, (a, b, c) in zip(lines, cells, strict=True):
        # Every row's second and third cells begin at the same column of the screen.
        assert line == (
            a + " " * (first - display_width(a)) + "  " + b + " " * (second - display_width(b))
            + "  " + c
        )  # fmt: skip
        assert "\x1b" not in line and "\n" not in line


_MARKUP = re.compile(r"(?<!\\)(?:\\\\)*[`*_\[\]<>&|~]")


@given(st.text())
def test_markdown_text_leaves_no_markup_unescaped(text: str) -> None:
    escaped = markdown_text(text)
    unescaped = re.sub(r"\\(.)", "", escaped)
    assert not re.search(r"[`*_\[\]<>&|~\\]", unescaped), escaped
    assert "\n" not in escaped and "\x1b" not in escaped


@given(st.text())
def test_html_text_leaves_no_tag_or_quote(text: str) -> None:
    escaped = html_text(text)
    assert not re.search(r"[<>\"'\x00-\x1f]", escaped)
    assert not re.search(r"&(?!amp;|lt;|gt;|quot;|#x27;)", escaped)


@given(st.text())
def test_syslog_param_is_a_valid_param_value(text: str) -> None:
    escaped = syslog_param(text)
    assert re.fullmatch(r'(?:[^"\\\]\x00-\x1f]|\\["\\\]])*', escaped), escaped
    assert re.sub(r"\\(.)", r"\1", escaped) == shown(text)


# -- a real engine ----------------------------------------------------------------------


@pytest.mark.slow
def test_serve_notifies_a_channel_through_the_outbox_and_counts_it(
    tmp_path: Path, endpoint: Receiver
) -> None:
    """Live reports -> the lake writer routes by the rule's tags -> the outbox -> serve's
    courier -> Apprise json:// on loopback; the metrics and `alerts deliveries` count it."""
    import os
    import signal
    import subprocess
    import sys

    from tests.test_outbox import ROOT, ring, scrape, spawn_serve

    udp, metrics = free_port(), free_port()
    channels = (
        f'[{{name = "soc", url = "json://127.0.0.1:{endpoint.port}/hook", tags = ["irsf"]}}, '
        '{name = "elsewhere", url = "json://127.0.0.1:9/x", tags = ["wangiri"]}]'
    )
    process = spawn_serve(
        tmp_path, udp, "", metrics,
        CALLSENTRY_NOTIFY__CHANNELS=channels, CALLSENTRY_CONSOLE__PUBLIC_URL=CONSOLE,
    )  # fmt: skip
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(3):
            ring(sock, udp, n)
        wait_for(lambda: len(endpoint.posts) >= 3, 60, "three notifications")
        wait_for(
            lambda: (
                'callsentry_deliveries_delivered_total{destination="notify.soc"} 3.0'
                in scrape(metrics)
            ),
            30,
            "the deliveries counted",
        )
    finally:
        sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    for _, body in endpoint.posts:
        assert body["title"] == "[callsentry] HIGH alert: risky-destination-callee"
        assert f"{CONSOLE}/alerts/" in str(body["message"])
        assert "Tags: destination, irsf" in str(body["message"])
    listed = subprocess.run(
        [sys.executable, "-m", "engine", "alerts", "deliveries", "--state", "all",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "notify.soc: now 0 waiting, 0 given up; in all 3 delivered, 0 given up" in listed.stdout
    assert "notify.elsewhere" not in listed.stdout, "no alert was routed there"


def test_the_readmes_notification_settings_load(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "public_url = " in b]
    config = tmp_path / "callsentry.toml"
    config.write_text(block)
    environ = {
        "SMTP_PASSWORD": "pw", "SLACK_TOKEN_A": "T1JJ3T3L2", "SLACK_TOKEN_B": "A1BRTD4JD",
        "SLACK_TOKEN_C": "TIiajkdnlazkcOXrIdevi7FQ",
    }  # fmt: skip
    settings = load_settings(config, environ=environ)
    assert [c.name for c in settings.notify.channels] == ["fraud-mail", "fraud-chat", "siem"]
    assert [c.limit for c in settings.notify.channels] == [10, 20, 0]
    assert settings.console.public_url == "https://callsentry.example.org"


def test_notify_test_sends_to_each_channel_and_says_which_failed(
    tmp_path: Path, endpoint: Receiver
) -> None:
    import os
    import subprocess
    import sys

    dead = free_port()  # nothing listens there
    config = tmp_path / "callsentry.toml"
    config.write_text(
        f'[[notify.channels]]\nname = "soc"\nurl = "json://127.0.0.1:{endpoint.port}/hook"\n'
        f'[[notify.channels]]\nname = "down"\nurl = "json://127.0.0.1:{dead}/hook"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "engine", "notify", "test", "--config", str(config), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)

    both = run()
    assert both.returncode == 1, both.stderr
    assert "notify.soc: sent" in both.stdout
    assert "notify.down: failed: " in both.stdout
    assert both.stderr.strip().splitlines()[-1] == (
        "callsentry: 1 of 2 channels did not take the test message"
    )
    assert len(endpoint.posts) == 1
    assert "channel soc works" in str(endpoint.posts[0][1]["message"])
    one = run("--channel", "soc")
    assert one.returncode == 0 and one.stdout.strip() == "notify.soc: sent", one.stderr
    unknown = run("--channel", "nope")
    assert unknown.returncode == 2
    assert "no channel named 'nope' (known: soc, down)" in unknown.stderr
    # Outside the outbox: nothing queued, nothing counted.
    assert not outbox_path(tmp_path / "data").exists()
