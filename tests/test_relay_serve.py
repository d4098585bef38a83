"""The relay end to end: `callsentry serve` with real consumers on loopback, the
switch stand-in sending, kill -9 of serve and its processes while relaying."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from engine.core.events import CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from engine.relay.state import RelayState, load_state, state_path
from engine.simulator.consumer import ConsumerStandIn
from engine.simulator.switch import SendSummary, SwitchSettings, SwitchStandIn
from tests.conftest import wait_for, wait_until_answering
from tests.test_crash import Load, free_port

pytestmark = pytest.mark.slow

T0 = 1795860000.0
CODEC = Vos3000TextCodec()


def write_config(path: Path, targets: dict[str, tuple[int, float]]) -> Path:
    """One `[[relay.udp]]` per target name: (port, retry interval)."""
    lines = ["[relay]"]
    for name, (port, interval) in targets.items():
        lines += [
            "[[relay.udp]]",
            f'target = "127.0.0.1:{port}"',
            f'name = "{name}"',
            "retries = 10",
            f"retry_interval_s = {interval}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_serve(data_dir: Path, port: int, config: Path) -> subprocess.Popen[bytes]:
    """serve in a session of its own (so kill -9 reaches its lake writer and relay too),
    returned once it answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / "serve.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(data_dir),
                # Any free port: another serve on this machine may hold the default.
                "--metrics",
                "127.0.0.1:0",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    return wait_until_answering(process, port, log_path, timeout_s=60)


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0


def stored(data_dir: Path) -> list[tuple[str, int, int]]:
    """(call_id, serial, seq) of every stored report, in stored order."""
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT call_id, serial, seq FROM events ORDER BY seq").fetchall()
    return [(str(c), int(s), int(q)) for c, s, q in rows]


def relay_state(data_dir: Path) -> RelayState:
    state = load_state(state_path(data_dir))
    assert state is not None
    return state


def calls(prefix: str, count: int) -> list[CallEvent]:
    """`count` calls of three reports each (Ringing, OK, Bye), in order."""
    events = []
    for n in range(count):
        for serial, state, code in (
            (1, CallState.RINGING, 180),
            (2, CallState.ANSWERED, None),
            (3, CallState.HANGUP, None),
        ):
            events.append(
                CallEvent(
                    T0, f"{prefix}-{n}", serial, state, code, "8613800000001", "44", "", "7", "m"
                )
            )
    return events


def send(port: int, events: list[CallEvent]) -> SendSummary:
    switch = SwitchStandIn(CODEC, SwitchSettings(port=port, window=200))
    return asyncio.run(switch.send(events))


def test_a_down_and_a_lossy_consumer_each_end_with_every_stored_report(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    late_port = free_port()
    lossy = ConsumerStandIn("127.0.0.1", 0, drop=0.2, seed=7).start()
    config = write_config(
        tmp_path / "callsentry.toml", {"late": (late_port, 0.2), "lossy": (lossy.address[1], 0.2)}
    )
    process = start_serve(data_dir, port, config)
    late: ConsumerStandIn | None = None
    try:
        first, second = calls("first", 500), calls("second", 500)
        # The first half while `late` is down (nothing listens on its port), until the
        # relay has found it down.
        before = send(port, first)
        wait_for(lambda: _down(data_dir, "late"), 120, "late found down")
        late = ConsumerStandIn("127.0.0.1", late_port).start()
        after = send(port, second)
        # The answer path did not notice: every report answered, none given up.
        for summary, events in ((before, first), (after, second)):
            assert (summary.answered, summary.given_up) == (len(events), 0)
        sent = [(e.call_id, e.serial) for e in first + second]
        wanted = {*sent, ("probe", 0)}
        for consumer in (late, lossy):
            wait_for(lambda c=consumer: c.received_keys() >= wanted, 180, "every report relayed")
    finally:
        stop_serve(process)
        lossy.stop()
        if late is not None:
            late.stop()
    rows = stored(data_dir)
    # Stored in the order the switch sent them (the relay's outage changed nothing).
    assert [(c, s) for c, s, _ in rows if c != "probe"] == sent
    keys = {(c, s) for c, s, _ in rows}
    assert late.received_keys() == keys
    assert lossy.received_keys() == keys
    assert lossy.received.dropped > 0  # it did drop, and still has every report
    state = relay_state(data_dir)
    for name in ("late", "lossy"):
        counters = state.targets[name].counters
        assert counters.given_up == 0
        assert counters.answered == len(keys)
    assert state.targets["late"].counters.retried > 0  # it was owed, and sent again


def test_kill_9_while_relaying_loses_no_report_and_resends_only_past_the_cursor(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    consumer = ConsumerStandIn("127.0.0.1", 0).start()
    # A long retry interval: a copy is sent again only because of the kill, not a slow answer.
    config = write_config(tmp_path / "callsentry.toml", {"billing": (consumer.address[1], 30.0)})
    process = start_serve(data_dir, port, config)
    load = Load(port, "k")
    load.start()
    try:
        wait_for(lambda: len(consumer.received_keys()) >= 3000, 120, "relaying under load")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = relay_state(data_dir).targets["billing"].cursor
        wait_for(lambda: not _session_alive(process.pid), 30, "the killed processes gone")
        process = start_serve(data_dir, port, config)
        answered = len(load.answered)
        wait_for(lambda: len(load.answered) >= answered + 2000, 120, "load after the restart")
    finally:
        load.stop()
    stopped_at = time.time()
    try:
        wait_for(lambda: _caught_up(data_dir, stopped_at), 120, "the relay caught up")
    finally:
        stop_serve(process)
        consumer.stop()
    rows = stored(data_dir)
    seq_of = {(c, s): q for c, s, q in rows}
    assert consumer.received_keys() == set(seq_of)
    copies = consumer.received.copies
    again = [key for key, count in copies.items() if count > 1]
    assert all(seq_of[key] > killed_at for key in again), "sent again from before the cursor"
    assert relay_state(data_dir).targets["billing"].counters.given_up == 0


def _down(data_dir: Path, name: str) -> bool:
    state = load_state(state_path(data_dir))
    return state is not None and name in state.targets and state.targets[name].counters.down


def _caught_up(data_dir: Path, since: float) -> bool:
    """Saved after `since` (and the last commit) with nothing stored left to relay."""
    state = load_state(state_path(data_dir))
    return (
        state is not None
        and state.saved_at > since + 1.0
        and state.targets["billing"].counters.lag_reports == 0
    )


def _session_alive(session: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[3] is the session id; a zombie (state Z) is gone for our purpose.
        if int(fields[3]) == session and fields[0] != "Z":
            return True
    return False


def test_nats_unreachable_from_the_start_is_said_in_the_log(tmp_path: Path) -> None:
    # nats-py's connect tries a server that is down (or a wrong URL) for ever and tells
    # only its error callback: the log said nothing, the operator saw no reason why.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]  # closed again: nothing listens there
    config = tmp_path / "callsentry.toml"
    config.write_text(f'[relay.nats]\nurls = ["nats://127.0.0.1:{nobody}"]\n')
    port = free_port()
    process = start_serve(tmp_path / "data", port, config)
    log = tmp_path / "serve.log"
    try:
        wait_for(
            lambda: "not reachable or not ready" in log.read_text(errors="replace"),
            timeout=60,
            what="the log saying NATS is not reachable",
        )
    finally:
        stop_serve(process)
    said = [line for line in log.read_text().splitlines() if "not reachable" in line]
    assert len(said) == 1, said
    assert f"NATS (nats://127.0.0.1:{nobody}) not reachable or not ready (" in said[0]
    assert "reports wait in the journal" in said[0]


def test_a_replay_into_the_same_data_dir_reaches_no_consumer(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    consumer = ConsumerStandIn("127.0.0.1", 0).start()
    config = write_config(tmp_path / "callsentry.toml", {"crm": (consumer.address[1], 1.0)})
    try:
        process = start_serve(data_dir, port, config)
        try:
            assert send(port, calls("live", 5)).given_up == 0
            wait_for(lambda: len(consumer.received_keys()) == 16, 120, "live reports relayed")
        finally:
            stop_serve(process)
        events = tmp_path / "month.csv"
        rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
        rows += [f"{T0 + n},replayed-{n},1,OK,100,200,,7,m" for n in range(50)]
        events.write_text("\n".join(rows) + "\n")
        replayed = subprocess.run(
            [sys.executable, "-m", "engine", "replay", str(events), "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert replayed.returncode == 0, replayed.stderr
        process = start_serve(data_dir, port, config)
        try:
            assert send(port, calls("later", 5)).given_up == 0
            wait_for(lambda: len(consumer.received_keys()) == 31, 120, "later reports relayed")
        finally:
            stop_serve(process)
    finally:
        consumer.stop()
    got = {call_id for call_id, _ in consumer.received_keys()}
    assert not {c for c in got if c.startswith("replayed-")}
    assert "replayed-0" in {c for c, _, _ in stored(data_dir)}  # it was stored, not relayed
