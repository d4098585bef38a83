"""The outbox: deliveries that leave the machine are durable before anything sends them,
go out at least once with their idempotency key, one dead endpoint holds up only its
own deliveries, and what is given up is counted and listed. The webhook is a real HTTP
server on loopback; the engine is a real `serve` process, killed for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from engine.alerts.couriers import Courier, DeliveryError, Dispatch, RetryPolicy
from engine.alerts.outbox import Outbox, OutboxError, OutboxSink, outbox_path
from engine.alerts.webhook import IDEMPOTENCY_HEADER, WebhookDestination
from engine.detect.alerts import Alert
from tests.conftest import make_settings, wait_for

ROOT = Path(__file__).resolve().parents[1]


def alert(n: int, mode: str = "alert") -> Alert:
    return Alert(
        f"alert-{n:04d}", "r", "rule", "high", "callee", f"+87077{n:07d}", 0.0, 1.0, 1.0 + n,
        1.0, 1.0, f"call {n}", [f"c{n}"], "v1", mode,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Receiver:
    """A webhook receiver on loopback: records each POST's idempotency key and body, in
    the order they came; `refuse` answers 400 for those keys."""

    def __init__(self, port: int = 0, refuse: frozenset[str] = frozenset()) -> None:
        self.posts: list[tuple[str, dict[str, object]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get(IDEMPOTENCY_HEADER, "")
                if key in refuse:
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.posts.append((key, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def keys(self) -> list[str]:
        with self.lock:
            return [key for key, _ in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


FAST = RetryPolicy(give_up_after_s=3600, first_backoff_s=0.05, max_backoff_s=0.2, poll_s=0.05)


def test_enqueue_is_durable_and_a_repeat_is_kept_once(tmp_path: Path) -> None:
    outbox = Outbox.of(tmp_path)
    assert outbox.enqueue("webhook", "k1", b"{}")
    assert not outbox.enqueue("webhook", "k1", b'{"again": 1}')
    assert outbox.enqueue("other", "k1", b"{}")  # the key is per destination
    outbox.close()
    # Another connection (as another process would) finds what was enqueued.
    again = Outbox.of(tmp_path, read_only=True)
    pending = again.listing(("pending",))
    assert sorted((d.destination, d.key, d.payload) for d in pending) == [
        ("other", "k1", b"{}"),
        ("webhook", "k1", b"{}"),
    ]
    assert again.counts()["webhook"].pending == 1


def test_deliveries_with_none_given_up_say_so_without_a_table(tmp_path: Path) -> None:
    outbox = Outbox.of(tmp_path)
    assert outbox.enqueue("webhook", "k1", b"{}")
    outbox.close()
    listed = subprocess.run(
        [sys.executable, "-m", "engine", "alerts", "deliveries", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "no given up deliveries",
        "webhook: now 1 waiting, 0 given up; in all 0 delivered, 0 given up (a delivery "
        "retried counts each time), 0 failed attempts",
    ]


def test_deliveries_retried_and_given_up_again_are_counted_now_and_in_all(
    tmp_path: Path,
) -> None:
    # After --retry and a second give-up the summary said "4 given up" beside a table of
    # two; and a mistyped --destination answered "no deliveries", exit 0.
    clock = [1000.0]
    outbox = Outbox(outbox_path(tmp_path), clock=lambda: clock[0])
    for key in ("a1", "a2"):
        assert outbox.enqueue("webhook", key, b"{}")
    for _ in range(2):
        clock[0] += 100_000
        assert len(outbox.give_up_older_than("webhook", clock[0])) == 2
        if _ == 0:
            assert outbox.retry_given_up("webhook") == 2
    outbox.close()

    def deliveries(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "alerts", "deliveries", "--data-dir",
             str(tmp_path), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    listed = deliveries()
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len([line for line in lines if " given_up " in line]) == 2
    assert lines[-1].startswith("webhook: now 0 waiting, 2 given up; in all 0 delivered, 4 given")
    typo = deliveries("--destination", "webhok")
    assert typo.returncode == 2
    assert typo.stderr.strip() == (
        "callsentry: --destination 'webhok' is no destination here (known: actions-block, "
        "actions-command, actions-http, webhook)"
    )
    assert deliveries("--destination", "actions-http").returncode == 0  # none yet, but known


def test_an_outbox_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    path = outbox_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is no database" * 100)
    with pytest.raises(OutboxError, match=r"deliveries.sqlite3: not an outbox"):
        Outbox(path)


def test_shadow_alerts_are_not_delivered(tmp_path: Path) -> None:
    outbox = Outbox.of(tmp_path)
    OutboxSink(outbox, ["webhook"]).deliver([alert(1), alert(2, mode="shadow")])
    assert [d.key for d in outbox.listing(("pending",))] == ["alert-0001"]


def test_a_dead_webhook_that_comes_back_gets_every_alert_with_its_key(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    port = free_port()  # nothing listens: connection refused
    outbox = Outbox.of(tmp_path)
    alerts = [alert(n) for n in range(16)]
    OutboxSink(outbox, ["webhook"]).deliver(alerts)
    dispatch = Dispatch(outbox, [WebhookDestination(f"http://127.0.0.1:{port}/a")], FAST)
    dispatch.start()
    try:
        wait_for(lambda: outbox.counts()["webhook"].failed >= 2, what="attempts failing")
        assert outbox.counts()["webhook"].delivered == 0
        receivers.append(Receiver(port))
        wait_for(lambda: outbox.counts()["webhook"].pending == 0, what="all delivered")
    finally:
        dispatch.stop()
    received = receivers[0].posts
    # At least once: every alert's key arrived (a retry may bring one twice), each
    # with the alert it names, oldest first.
    assert set(receivers[0].keys()) == {a.alert_id for a in alerts}
    assert all(body["alert_id"] == key for key, body in received)
    first_seen = list(dict.fromkeys(receivers[0].keys()))
    assert first_seen == [a.alert_id for a in alerts]
    counts = outbox.counts()["webhook"]
    assert (counts.delivered, counts.given_up, counts.pending) == (16, 0, 0)


def test_one_dead_destination_does_not_hold_up_another(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    live = Receiver()
    receivers.append(live)
    # Dead the slow way: it takes the connection and never answers, so its courier
    # waits out its whole timeout on the first delivery.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    dead_url = f"http://127.0.0.1:{blackhole.getsockname()[1]}/a"
    outbox = Outbox.of(tmp_path)
    destinations = [
        WebhookDestination(dead_url, name="dead", timeout_s=120),
        WebhookDestination(live.url, name="live"),
    ]
    dispatch = Dispatch(outbox, destinations, FAST)
    dispatch.start()
    sink = OutboxSink(outbox, ["dead", "live"])
    try:
        sink.deliver([alert(n) for n in range(10)])
        wait_for(lambda: len(live.keys()) >= 10, what="the live destination served")
        sink.deliver([alert(n) for n in range(10, 20)])
        wait_for(lambda: len(live.keys()) >= 20, what="newer alerts served too")
        # Meanwhile the dead one has not finished its first attempt.
        dead = outbox.counts()["dead"]
        assert (dead.delivered, dead.failed, dead.pending) == (0, 0, 20)
    finally:
        blackhole.close()  # the waiting attempt ends (connection reset)
        dispatch.stop()
    assert live.keys() == [f"alert-{n:04d}" for n in range(20)]


def test_a_delivery_the_endpoint_refuses_does_not_hold_up_newer_ones(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    receiver = Receiver(refuse=frozenset({"alert-0000"}))
    receivers.append(receiver)
    outbox = Outbox.of(tmp_path)
    dispatch = Dispatch(outbox, [WebhookDestination(receiver.url)], FAST)
    dispatch.start()
    try:
        OutboxSink(outbox, ["webhook"]).deliver([alert(n) for n in range(5)])
        wait_for(lambda: len(receiver.keys()) == 4, what="the others delivered")
        wait_for(lambda: outbox.counts()["webhook"].failed >= 2, what="the refused one retried")
    finally:
        dispatch.stop()
    assert receiver.keys() == [f"alert-{n:04d}" for n in range(1, 5)]
    [refused] = outbox.listing(("pending",))
    assert refused.key == "alert-0000" and refused.last_error == "HTTP 400"


class Unreachable:
    name = "webhook"

    def __init__(self) -> None:
        self.attempts = 0

    def send(self, key: str, payload: bytes) -> None:
        self.attempts += 1
        raise DeliveryError("connection refused")


def test_past_the_horizon_a_delivery_is_given_up_counted_and_listed(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = Outbox(outbox_path(tmp_path), clock=lambda: now[0])
    policy = RetryPolicy(give_up_after_s=60, first_backoff_s=1, max_backoff_s=8)
    courier = Courier(outbox, Unreachable(), policy, clock=lambda: now[0])
    outbox.enqueue("webhook", "a", b"{}")
    courier.work()
    assert outbox.counts()["webhook"].failed == 1
    # Backing off (1 s after the first failure): a pass within the pause sends nothing.
    now[0] += 0.5
    courier.work()
    assert outbox.counts()["webhook"].failed == 1
    now[0] += 29.5
    outbox.enqueue("webhook", "b", b"{}")
    courier.work()
    assert outbox.counts()["webhook"].failed == 2
    now[0] += 31  # "a" is 61 s old, "b" 31 s
    courier.work()
    assert [d.key for d in outbox.listing()] == ["a"]
    counts = outbox.counts()["webhook"]
    assert (counts.given_up, counts.pending) == (1, 1)
    now[0] += 60
    courier.work()
    assert [d.key for d in outbox.listing()] == ["b", "a"]
    assert outbox.retry_given_up() == 2
    assert outbox.counts()["webhook"].pending == 2


def test_a_give_up_after_a_restart_names_the_error_the_deliveries_met(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    outbox = Outbox(outbox_path(tmp_path), clock=lambda: now[0])
    policy = RetryPolicy(give_up_after_s=60, first_backoff_s=1, max_backoff_s=8)
    outbox.enqueue("webhook", "a", b"{}")
    Courier(outbox, Unreachable(), policy, clock=lambda: now[0]).work()
    outbox.enqueue("webhook", "b", b"{}")  # never tried: the endpoint was down
    now[0] += 61
    # A restarted engine's courier has met no error yet: it gives up first.
    Courier(outbox, Unreachable(), policy, clock=lambda: now[0]).work()
    assert outbox.counts()["webhook"].given_up == 2
    assert "gave up on 2 deliveries after 60 s (last error: connection refused)" in caplog.text


def test_done_deliveries_are_forgotten_after_keep_s_and_their_counts_stay(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    outbox = Outbox(outbox_path(tmp_path), clock=lambda: now[0])
    policy = RetryPolicy(give_up_after_s=60, keep_s=3 * 3600)
    courier = Courier(outbox, Unreachable(), policy, clock=lambda: now[0])
    outbox.enqueue("webhook", "a", b"{}")
    courier.work()
    now[0] += 61
    courier.work()
    assert [d.key for d in outbox.listing()] == ["a"]
    now[0] += 3 * 3600 + 1  # past keep_s, and past the hourly look
    courier.work()
    assert outbox.listing() == []
    assert outbox.counts()["webhook"].given_up == 1
    # Forgotten: the same key is a new delivery now.
    assert outbox.enqueue("webhook", "a", b"{}")


class FailsOnce:
    """An endpoint down for the first attempt, up for the next."""

    name = "webhook"

    def __init__(self) -> None:
        self.attempts = 0

    def send(self, key: str, payload: bytes) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise DeliveryError("connection refused")


def test_a_delivery_that_failed_then_went_through_is_listed_without_its_old_error(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    outbox = Outbox(outbox_path(tmp_path), clock=lambda: now[0])
    courier = Courier(outbox, FailsOnce(), FAST, clock=lambda: now[0])
    outbox.enqueue("webhook", "a", b"{}")
    courier.work()
    [waiting] = outbox.listing(("pending",))
    assert waiting.last_error == "connection refused"
    now[0] += 1  # past the pause
    courier.work()
    [delivered] = outbox.listing(("delivered",))
    assert (delivered.attempts, delivered.last_error) == (2, "")


def test_a_batch_marked_delivered_keeps_no_old_error(tmp_path: Path) -> None:
    # The relay's publisher marks NATS messages delivered many at a time.
    outbox = Outbox(outbox_path(tmp_path))
    outbox.enqueue("nats", "a", b"{}")
    [message] = outbox.due("nats", now=2e9)
    outbox.mark_failed(message, "no responders")
    outbox.mark_delivered_many(outbox.due("nats", now=2e9))
    [delivered] = outbox.listing(("delivered",))
    assert (delivered.attempts, delivered.last_error) == (2, "")


# -- replay and backtest never deliver ------------------------------------------------


def risky_events(path: Path, callees: int) -> Path:
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    for n in range(callees):
        ts = f"2026-11-30T10:{n:02d}:00Z"
        rows.append(f"{ts},risk-{n},1,RINGING,861380000{n:04d},+87077{n:07d},,12,Main")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_replay_and_backtest_never_deliver(tmp_path: Path, receivers: list[Receiver]) -> None:
    from engine.apps.backtest import backtest
    from engine.apps.replay import replay

    receiver = Receiver()
    receivers.append(receiver)
    settings = make_settings(
        tmp_path / "data",
        detection={"webhook_url": receiver.url, "alerts_jsonl": "off", "models_enabled": False},
    )
    report = replay([risky_events(tmp_path / "events.csv", 5)], settings)
    assert len([a for a in report.alerts if a.mode == "alert"]) == 5
    day = datetime(2026, 11, 30, tzinfo=UTC).timestamp()
    result = backtest(
        settings.store.data_dir,
        Path("rules"),
        Path("rules"),
        settings.detection,
        day,
        day + 86400,
        0,
    )
    assert len(result.current) == 5
    assert receiver.posts == []
    assert not outbox_path(settings.store.data_dir).exists()


# -- a real engine --------------------------------------------------------------------


def rules_dir(tmp_path: Path) -> Path:
    """Only the rule that raises one alert per risky callee, at once."""
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "rules/risky-destination-callee.yaml", folder)
    shutil.copy(ROOT / "rules/lists/risky_prefixes.yaml", folder / "lists")
    return folder


def ring(sock: socket.socket, port: int, n: int) -> None:
    """A call to a risky number, reported until answered."""
    payload = f"risk-{n},1,Ringing,8613800{n:06d},+87077{n:07d},,12,Main".encode()
    sock.settimeout(0.5)
    for _ in range(20):
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            if sock.recv(100) == f"risk-{n},1".encode():
                return
        except TimeoutError:
            continue
    raise AssertionError(f"report risk-{n} never answered")


def spawn_serve(
    tmp_path: Path, udp: int, webhook: str, metrics: int, **env: str
) -> subprocess.Popen[bytes]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    variables.update(
        CALLSENTRY_DETECTION__WEBHOOK_URL=webhook,
        CALLSENTRY_DETECTION__MODELS_ENABLED="false",
        CALLSENTRY_STORE__FLUSH_INTERVAL_S="0.2",
        CALLSENTRY_OUTBOX__MAX_BACKOFF_S="0.3",
        **env,
    )
    # A session of its own: kill -9 of the group ends the lake writer too.
    with (tmp_path / "serve.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{udp}",
             "--data-dir", str(tmp_path / "data"), "--rules", str(rules_dir(tmp_path)),
             "--metrics", f"127.0.0.1:{metrics}", "--log-level", "warning"],
            cwd=ROOT, env=variables, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )  # fmt: skip


def lake_alert_ids(data_dir: Path) -> set[str]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return {row[0] for row in con.execute("SELECT alert_id FROM alerts").fetchall()}


def pending(data_dir: Path) -> int:
    if not outbox_path(data_dir).exists():
        return 0
    outbox = Outbox.of(data_dir, read_only=True)
    try:
        return sum(c.pending for c in outbox.counts().values())
    finally:
        outbox.close()


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.slow
def test_kill_9_with_alerts_in_the_outbox_then_restart_delivers_them_all(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    data_dir = tmp_path / "data"
    udp, web, metrics = free_port(), free_port(), free_port()
    webhook = f"http://127.0.0.1:{web}/alerts"  # nothing listens there yet
    process = spawn_serve(tmp_path, udp, webhook, metrics)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(16):
            ring(sock, udp, n)
        wait_for(lambda: pending(data_dir) == 16, 60, "16 alerts waiting in the outbox")
        failing = scrape(metrics)
        assert 'callsentry_deliveries_queue_depth{destination="webhook"} 16.0' in failing
        assert 'callsentry_deliveries_delivered_total{destination="webhook"} 0.0' in failing
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        receiver = Receiver(web)
        receivers.append(receiver)
        process = spawn_serve(tmp_path, udp, webhook, metrics)
        wait_for(lambda: len(set(receiver.keys())) >= 16, 60, "every alert delivered")
        wait_for(lambda: pending(data_dir) == 0, 30, "the outbox empty")
        after = scrape(metrics)
    finally:
        sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    alerts = lake_alert_ids(data_dir)
    assert len(alerts) == 16
    # Each key is an alert's id, and together they cover every alert.
    assert set(receiver.keys()) == alerts
    assert 'callsentry_deliveries_delivered_total{destination="webhook"} 16.0' in after
    assert 'callsentry_deliveries_queue_depth{destination="webhook"} 0.0' in after
    assert 'callsentry_deliveries_failed_total{destination="webhook"}' in after


@pytest.mark.slow
def test_given_up_deliveries_are_listed_by_alerts_deliveries(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    udp, web, metrics = free_port(), free_port(), free_port()
    webhook = f"http://127.0.0.1:{web}/alerts"  # never up
    process = spawn_serve(tmp_path, udp, webhook, metrics, CALLSENTRY_OUTBOX__GIVE_UP_AFTER_S="1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(3):
            ring(sock, udp, n)

        def given_up() -> bool:
            return 'callsentry_deliveries_given_up_total{destination="webhook"} 3.0' in scrape(
                metrics
            )

        wait_for(given_up, 60, "three deliveries given up")
    finally:
        sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    listed = subprocess.run(
        [sys.executable, "-m", "engine", "alerts", "deliveries", "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["DESTINATION", "KEY", "STATE"]
    assert sorted(line.split()[1] for line in lines[1:4]) == sorted(lake_alert_ids(data_dir))
    assert all(line.split()[2] == "given_up" for line in lines[1:4])
    assert "3 given up" in listed.stdout
    # The JSON form, for scripts.
    as_json = subprocess.run(
        [sys.executable, "-m", "engine", "alerts", "deliveries", "--format", "json",
         "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {row["key"] for row in rows} == lake_alert_ids(data_dir)
    assert all(row["error"] for row in rows)


@pytest.mark.slow
def test_sigterm_with_undelivered_alerts_keeps_them_for_the_next_start(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    data_dir = tmp_path / "data"
    udp, web, metrics = free_port(), free_port(), free_port()
    webhook = f"http://127.0.0.1:{web}/alerts"  # down until the second start
    process = spawn_serve(tmp_path, udp, webhook, metrics)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(4):
            ring(sock, udp, n)
        wait_for(lambda: pending(data_dir) == 4, 60, "4 alerts waiting in the outbox")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert pending(data_dir) == 4
        assert (
            "4 deliveries to webhook wait for the next start"
            in (tmp_path / "serve.log").read_text()
        )
        receiver = Receiver(web)
        receivers.append(receiver)
        process = spawn_serve(tmp_path, udp, webhook, metrics)
        wait_for(lambda: pending(data_dir) == 0, 60, "the outbox empty")
    finally:
        sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert set(receiver.keys()) == lake_alert_ids(data_dir) and len(receiver.keys()) >= 4
