"""Batched datagram I/O (recvmmsg/sendmmsg through ctypes) on real loopback sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from engine.ingest import udpbatch
from engine.ingest.codec import build_codec
from engine.ingest.udpbatch import BatchSocket, peer_of, sockaddr_of

pytestmark = pytest.mark.skipif(not udpbatch.supported(), reason="needs Linux recvmmsg")


@pytest.fixture
def server() -> Iterator[BatchSocket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield BatchSocket(sock, slots=8)
    sock.close()


def receive_all(io: BatchSocket, expected: int) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 5
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(io.receive())
    return got


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def test_more_datagrams_than_slots_come_in_several_batches_with_their_senders(
    server: BatchSocket,
) -> None:
    first, second = client(), client()
    address = server.sock.getsockname()
    for n in range(10):
        (first if n % 2 else second).sendto(f"report-{n}".encode(), address)
    batch = receive_all(server, 8)
    assert len(batch) == 8  # one call fills every slot and no more
    got = batch + receive_all(server, 2)
    assert sorted(data for data, *_ in got) == sorted(f"report-{n}".encode() for n in range(10))
    senders = {peer_of(raw) for _, raw, *_ in got}
    assert senders == {first.getsockname(), second.getsockname()}
    assert server.receive() == []  # nothing waiting: empty, no error
    assert server.last_error is None
    first.close()
    second.close()


def test_answers_reach_each_sender_in_one_call(server: BatchSocket) -> None:
    clients = [client() for _ in range(3)]
    address = server.sock.getsockname()
    for n, sock in enumerate(clients):
        sock.sendto(f"call-{n},1".encode(), address)
    received = receive_all(server, 3)
    answers = [(data, raw) for data, raw, *_ in received] * 4  # 12 answers: more than 8 slots
    assert server.send(answers) == 12
    for sock in clients:
        own = {sock.recv(64) for _ in range(4)}
        assert len(own) == 1
        assert own.pop().startswith(b"call-")
        sock.close()


def test_empty_and_oversized_datagrams_keep_their_shape(server: BatchSocket) -> None:
    sock = client()
    address = server.sock.getsockname()
    sock.sendto(b"", address)
    sock.sendto(b"x" * 5000, address)
    got = receive_all(server, 2)
    assert [len(data) for data, *_ in got] == [0, 4096]  # cut to the slot, still oversized
    sock.close()


def test_an_answer_to_a_vanished_sender_is_counted_not_raised(server: BatchSocket) -> None:
    # An IPv6 address on an IPv4 socket: the kernel refuses this one message.
    bad = sockaddr_of(socket.AF_INET6, "::1", 9)
    sock = client()
    good = sockaddr_of(socket.AF_INET, *sock.getsockname())
    assert server.send([(b"x,1", bad), (b"y,2", good)]) == 1
    assert server.send_failures == 1
    assert server.last_error is not None
    assert sock.recv(64) == b"y,2"
    sock.close()


def test_raw_addresses_read_back_as_host_and_port() -> None:
    assert peer_of(sockaddr_of(socket.AF_INET, "10.1.2.3", 8000)) == ("10.1.2.3", 8000)
    assert peer_of(sockaddr_of(socket.AF_INET6, "2001:db8::7", 5060)) == ("2001:db8::7", 5060)
    assert peer_of(b"\x01\x00garbage") is None
    assert peer_of(b"") is None


def test_usual_keys_are_read_on_the_way_in_as_the_codec_reads_them() -> None:
    codec = build_codec("vos3000-text", ";", ["utf-8", "gbk"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    server = BatchSocket(sock, slots=8, key_separator=codec.key_separator)
    reports = [
        b"abc-1;7;OK;1;2;;3;menu",
        b" padded ;7;OK;1;2;;3;menu",  # the codec strips it: Python reads this one
        "\u547c\u53eb;7;OK;1;2;;3;menu".encode("gbk"),
        b"no-separators",
    ]
    sender = client()
    for report in reports:
        sender.sendto(report, sock.getsockname())
    got = {data: (key, answer) for data, _, key, answer in receive_all(server, len(reports))}
    compiled = udpbatch._RECEIVE is not None
    assert got[reports[0]] == ((("abc-1", 7), b"abc-1;7") if compiled else (None, None))
    for unusual in reports[1:]:
        assert got[unusual] == (None, None)
    assert codec.read_key(reports[0]) == (("abc-1", 7), b"abc-1;7")
    sender.close()
    sock.close()
