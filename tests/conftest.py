"""Shared fixtures: a real engine on loopback (own thread, own event loop), real files."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.apps.serve import Engine
from engine.apps.settings import Settings, load_settings
from engine.ingest.journal import read_segment


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Return as soon as `condition()` holds; fail if it has not within `timeout` seconds
    (a bound on a hang, generous for a loaded machine, never a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout:g} s")
        time.sleep(0.01)


def wait_until_answering(
    process: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 30.0
) -> subprocess.Popen[bytes]:
    """`process` (a `callsentry serve`) once it answers a probe on `port`; its log if it
    exits first."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            probe.sendto(b"probe,0,OK,1,2,,,", ("127.0.0.1", port))
            try:
                if probe.recv(100) == b"probe,0":
                    return process
            except OSError:
                pass
            if process.poll() is not None:
                raise AssertionError(log_path.read_text())
        raise AssertionError("serve did not start answering")
    finally:
        probe.close()


def make_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = {
        "receiver": {"listen": ["127.0.0.1:0"]},
        "store": {"data_dir": str(data_dir)},
        # On by default at a fixed port; tests (and other runs of them) must not clash.
        "metrics": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(None, overrides, environ={})


@dataclass
class RunningEngine:
    engine: Engine
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        return self.engine.server.addresses[0]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine's loop and wait for its result."""
        done: Future[Any] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as error:
                done.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.engine.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def journal_keys(self) -> set[tuple[str, int]]:
        """(call_id, serial) of every report in the journal files (open or sealed) right now."""
        keys: set[tuple[str, int]] = set()
        journal = self.engine.store.journal
        codec = self.engine.codec
        for path in sorted(journal.directory.glob("*.*")):
            if path.suffix not in (".wal", ".sealed"):
                continue
            for frame in read_segment(path).frames:
                for _, _, raw in frame.datagrams():
                    read = codec.read_key(raw)
                    if read is not None:
                        keys.add(read[0])
        return keys


def start_engine(settings: Settings) -> RunningEngine:
    import uvloop

    loop = uvloop.new_event_loop()
    started: Future[Engine] = Future()

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                engine = Engine(settings)
                await engine.start()
                started.set_result(engine)
            except BaseException as error:
                started.set_exception(error)

        loop.run_until_complete(boot())
        if started.exception() is None:
            loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    engine = started.result(timeout=30)
    return RunningEngine(engine, loop, thread)


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Callable[..., RunningEngine]]:
    running: list[RunningEngine] = []

    def factory(**sections: dict[str, Any]) -> RunningEngine:
        handle = start_engine(make_settings(tmp_path / "data", **sections))
        running.append(handle)
        return handle

    yield factory
    for handle in running:
        handle.stop()


class Switch:
    """A plain blocking UDP socket playing the switch in tests."""

    def __init__(self, target: tuple[str, int], bind: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.target = target

    def send(self, payload: bytes) -> None:
        self.sock.sendto(payload, self.target)

    def answer(self, timeout: float = 3.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            return None

    def ask(self, payload: bytes, timeout: float = 3.0) -> bytes | None:
        self.send(payload)
        return self.answer(timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def switch_factory() -> Iterator[Callable[..., Switch]]:
    made: list[Switch] = []

    def factory(target: tuple[str, int], bind: str = "127.0.0.1") -> Switch:
        switch = Switch(target, bind)
        made.append(switch)
        return switch

    yield factory
    for switch in made:
        switch.close()
