"""kill -9 under load: every report that was answered is in the store after a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import duckdb
import pytest

from engine.ingest.journal import Spares
from engine.ingest.store import lake_writer_lock
from tests.conftest import wait_for, wait_until_answering

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_serve(
    data_dir: Path, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path = data_dir.parent / "serve.log"
    with log_path.open("ab") as log:
        process = _spawn(data_dir, port, log, env)
    return wait_until_answering(process, port, log_path)


def _spawn(
    data_dir: Path, port: int, log: BinaryIO, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            "--metrics",
            "127.0.0.1:0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **(env or {})},
    )


class Load:
    """Distinct reports as fast as a window of 256 outstanding allows; keeps answered keys."""

    def __init__(
        self, port: int, prefix: str, menu_name: str = "menu", wait_s: float = 0.05
    ) -> None:
        self.port = port
        self.prefix = prefix
        self.menu_name = menu_name
        self.wait_s = wait_s
        self.answered: set[str] = set()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def has_answered(self, count: int) -> Callable[[], bool]:
        """Whether `count` of its reports have been answered (to wait on)."""
        return lambda: len(self.answered) >= count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.settimeout(self.wait_s)
        try:
            while not self._stop.is_set():
                for _ in range(256):
                    call_id = f"{self.prefix}-{self.sent}"
                    self.sent += 1
                    payload = f"{call_id},1,OK,100,200,,7,{self.menu_name}".encode()
                    with contextlib.suppress(OSError):  # refused while the engine is down
                        sock.sendto(payload, ("127.0.0.1", self.port))
                while True:
                    try:
                        answer = sock.recv(200)
                    except (TimeoutError, OSError):
                        break
                    self.answered.add(answer.decode().rsplit(",", 1)[0])
        finally:
            sock.close()


def stored_call_ids(data_dir: Path) -> list[str]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT call_id FROM events").fetchall()]


def test_kill_9_under_load_loses_no_answered_report(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    answered: set[str] = set()
    for round_number in range(3):
        process = start_serve(data_dir, port)
        load = Load(port, f"r{round_number}")
        load.start()
        # Killed under load, a little further into it each round.
        wait_for(load.has_answered(1_000 * (1 + round_number)), 60, "answers under load")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        load.stop()
        assert load.answered, "no report was answered before the kill"
        answered |= load.answered

    process = start_serve(data_dir, port)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=180) == 0
    stored = stored_call_ids(data_dir)
    missing = answered - set(stored)
    assert not missing, f"{len(missing)} answered reports lost, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(set(stored)), "a report was stored twice"
    # No lake writer outlives its receiver (orphans notice and exit).
    lock = lake_writer_lock(data_dir)
    lock.acquire(wait_s=20)
    lock.release()


def test_kill_9_in_a_preallocated_journal_segment_loses_no_answered_report(
    tmp_path: Path,
) -> None:
    """The crash lands while the open segment is a spare of zeros: recovery must take
    every answered frame before the zeros and nothing after them."""
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    port = free_port()
    # A loaded segment sealed each second, so the next one starts from a spare.
    env = {"CALLSENTRY_STORE__FLUSH_INTERVAL_S": "1.0"}
    process = start_serve(data_dir, port, env)
    # Long menu names and little waiting: megabytes a second of journal.
    load = Load(port, "pre", menu_name="m" * 400, wait_s=0.002)
    load.start()

    def in_a_spare() -> bool:
        for path in journal.glob("*.wal"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= Spares.MIN_SPARE_BYTES:
                    return True
        return False

    wait_for(in_a_spare, 60, "the load reaching a preallocated segment")
    # Some group commits answered into it before the kill.
    wait_for(load.has_answered(len(load.answered) + 512), 60, "answers from the spare")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    load.stop()
    assert load.answered

    process = start_serve(data_dir, port, env)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=180) == 0
    stored = stored_call_ids(data_dir)
    missing = load.answered - set(stored)
    assert not missing, f"{len(missing)} answered reports lost, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(set(stored)), "a report was stored twice"
    assert not list(journal.glob("spare*")), "spares removed at shutdown"
    assert not list(journal.glob("*.corrupt")), "a torn tail is not corruption"


def _tables(data_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return {
            table: con.execute(f"SELECT * EXCLUDE (day) FROM {table} ORDER BY ALL").fetchall()
            for table in ("events", "calls", "alerts")
        }


def test_kill_9_during_a_replay_then_replaying_again_is_a_clean_replay(tmp_path: Path) -> None:
    """Killed while it journals, while it writes a group of segments to the lake, or
    as it lets them go: the same file replayed again leaves the events, calls and
    alerts of a replay that was never killed, nothing twice and nothing missing."""
    from engine.apps.replay import replay
    from engine.simulator.scenario import generate, load_scenario, write_files
    from tests.conftest import make_settings

    scenario = load_scenario(Path("data/scenarios/fraud-mix.yaml"))
    benign = scenario.benign.model_copy(update={"calls_per_hour": 5_000})
    generated = generate(scenario.model_copy(update={"benign": benign}))
    events_file, _ = write_files(generated, tmp_path / "scenario", "parquet")
    assert len(generated.events) > 3 * 20_000, "several journal segments"
    replay([events_file], make_settings(tmp_path / "clean", detection={"alerts_jsonl": "off"}))
    clean = _tables(tmp_path / "clean")

    command = [sys.executable, "-m", "engine", "replay", str(events_file), "--data-dir"]
    env = dict(os.environ, CALLSENTRY_DETECTION__ALERTS_JSONL="off")
    # Kill once a first segment is sealed, and once the lake has a group's file.
    for round_number, ready in enumerate(("journal/*.sealed", "lake/events/day=2*/grp-*")):
        data_dir = tmp_path / f"killed-{round_number}"
        process = subprocess.Popen([*command, str(data_dir)], env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(data_dir.glob(ready)) and process.poll() is None:
            assert time.monotonic() < deadline, f"no {ready} within a minute"
            time.sleep(0.005)
        process.kill()
        process.wait(10)
        again = subprocess.run(
            [*command, str(data_dir)], env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        assert _tables(data_dir) == clean, f"killed at the first {ready}"
