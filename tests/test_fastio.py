"""The compiled commit helper: write, fdatasync and sendmmsg in one step without the GIL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ingest import intake as ingest
from engine.ingest import journal
from engine.ingest.intake import Intake, SeenReports
from engine.ingest.journal import DATAGRAMS, Journal, read_segment
from engine.ingest.stats import Stats
from engine.ingest.udpbatch import sockaddr_of

linux = sys.platform.startswith("linux")


def test_the_helper_is_built_on_linux() -> None:
    # It is optional at install time; on the machines we ship to it must be there,
    # or the receiver quietly loses a quarter of its throughput.
    if not linux:
        pytest.skip("the helper is Linux only")
    assert journal.durable_write is not None


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


needs_helper = pytest.mark.skipif(journal.durable_write is None, reason="helper not built")


@needs_helper
def test_a_frame_is_written_then_its_answers_leave(
    tmp_path: Path, peer: socket.socket, sender: socket.socket
) -> None:
    wal = Journal(tmp_path, {"codec": "test"})
    wal.start(1)
    to = sockaddr_of(socket.AF_INET, *peer.getsockname())
    answers = [(f"call-{n},{n}".encode(), to) for n in range(100)]
    sent = wal.append(DATAGRAMS, 1, b"payload", (sender.fileno(), answers))
    assert sent == (100, 0)
    assert [peer.recv(100) for _ in range(100)] == [answer for answer, _ in answers]
    frames = read_segment(wal.path(1)).frames
    assert [(f.kind, f.first_seq, f.payload) for f in frames] == [(DATAGRAMS, 1, b"payload")]
    # Without answers to send, the caller is told nothing left.
    assert wal.append(DATAGRAMS, 2, b"more") is None
    assert len(read_segment(wal.path(1)).frames) == 2


@needs_helper
def test_a_failed_write_sends_nothing(peer: socket.socket, sender: socket.socket) -> None:
    assert journal.durable_write is not None
    to = sockaddr_of(socket.AF_INET, *peer.getsockname())
    # A pipe nobody reads: the write fails (EPIPE) as a full disk would (ENOSPC).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with pytest.raises(BrokenPipeError):
            journal.durable_write(write_end, b"frame", True, sender.fileno(), [(b"lost,1", to)])
    finally:
        os.close(write_end)
    peer.settimeout(0.3)
    with pytest.raises(TimeoutError):
        peer.recv(100)


@needs_helper
def test_answers_that_cannot_leave_are_counted_not_raised(sender: socket.socket) -> None:
    assert journal.durable_write is not None
    unreachable = sockaddr_of(socket.AF_INET6, "::1", 9)  # wrong family for this socket
    with open(os.devnull, "wb") as sink:
        sent, error = journal.durable_write(
            sink.fileno(), b"x", False, sender.fileno(), [(b"a,1", unreachable)] * 3
        )
    assert sent == 0 and error != 0
    with open(os.devnull, "wb") as sink, pytest.raises(TypeError, match="sockaddr"):
        journal.durable_write(sink.fileno(), b"x", False, sender.fileno(), [("a,1", b"")])


@pytest.mark.skipif(not linux, reason="scheduling policies are Linux only")
@pytest.mark.parametrize(("priority", "expected"), [("idle", "5 0"), ("low", "0 10")])
def test_the_lake_writer_yields_the_cpu(priority: str, expected: str) -> None:
    # In a child: a policy once lowered cannot be raised back without privileges.
    script = (
        "import os, threading\n"
        "from engine.apps.lakewriter import lower_priority\n"
        "lower_priority(os.environ['PRIORITY'])\n"
        "show = lambda: print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))\n"
        "t = threading.Thread(target=show)\n"
        "t.start(); t.join()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PRIORITY": priority},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == expected


PEERS: dict[Any, str | None] = {"a": "10.0.0.1:5060", "b": "10.0.0.2:5060", "refused": None}


def offer_each(intake: Intake, received: list[Any], fast: bool) -> None:
    """The receiver's loop over a batch, with or without the compiled run-taker."""
    index = 0
    while index < len(received):
        if fast:
            index = intake.take_usual(received, index, PEERS, 5.0, "endpoint")
            if index == len(received):
                break
        data, addr, key, answer = received[index]
        index += 1
        source = PEERS.get(addr)
        if source is None:
            continue
        intake.offer(key, answer, (5.0, source, data), 5.0, ("endpoint", addr))


@needs_helper
@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6), st.sampled_from(["a", "b", "refused", "unknown"]), st.booleans()
        ),
        max_size=40,
    ),
    st.integers(1, 8),
    st.sets(st.integers(0, 6), max_size=3),
)
def test_taking_runs_of_usual_reports_is_offering_each(
    reports: list[tuple[int, str, bool]], max_pending: int, stored: set[int]
) -> None:
    def received() -> list[Any]:
        # Same call_id in several reports: copies of one report, pending or stored.
        return [
            (f"c{n},1,OK".encode(), addr, (f"c{n}", 1) if read else None, f"c{n},1".encode())
            for n, addr, read in reports
        ]

    intakes, owed = [], []
    for fast in (False, True):
        seen = SeenReports(3600)
        seen.add_batch([(f"c{n}", 1) for n in stored], 1.0)
        intake = Intake(Stats(), seen, max_pending=max_pending, unkeyed_per_minute=3)
        offer_each(intake, received(), fast)
        intakes.append(intake)
        # Copies that came while the batch was written are owed answers once it is durable.
        with pytest.MonkeyPatch.context() as patch:
            if not fast:
                patch.setattr(ingest, "_release_waiting", None)
            sealed = intake.seal()
            offer_each(intake, received(), fast)
            owed.append(intake.durable(sealed) if sealed is not None else [])
    plain, fast = intakes
    assert fast.open.records == plain.open.records
    assert fast.open.keys == plain.open.keys
    assert fast.open.answers == plain.open.answers
    assert fast._waiting == plain._waiting
    assert fast.next_seq == plain.next_seq
    assert fast.stats.line() == plain.stats.line()
    assert owed[0] == owed[1]
