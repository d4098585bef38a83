"""The relay to existing UDP consumers, driven in this process: a real store, the real
journal files, real sockets on loopback, the consumer stand-in; time moved by hand
where retries and silence are concerned, so nothing here waits for a retry interval.

The end-to-end runs through `callsentry serve` (a target down for half a run, a lossy
one, kill -9 while relaying) are in tests/test_relay_serve.py.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.apps.relay import relayable_reports, status_lines
from engine.apps.settings import ConfigError, load_settings
from engine.core.events import CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.journal import DATAGRAMS, JSON_RECORDS, datagram_payload, json_payload
from engine.ingest.store import EventStore
from engine.relay.fanout import RelayBounds, UdpRelay
from engine.relay.feed import DurableMark, HeldSegments
from engine.relay.state import load_state, state_path
from engine.relay.udp import UdpTargetSpec
from engine.simulator.consumer import ConsumerStandIn

T0 = 1795860000.0
CODEC = Vos3000TextCodec()


class Clock:
    """Monotonic time moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Journaled:
    """A store whose commits the relay reads, as serve's receiver writes them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.mark = DurableMark.create(mp.get_context("spawn"))
        self.store = EventStore(data_dir, CODEC)
        self.store.journal.on_durable = self.mark.set
        self.next_seq = self.store.open().next_seq
        self.keys: list[tuple[str, int]] = []

    def reports(self, datagrams: list[bytes], source: str = "127.0.0.1:5060") -> None:
        payload = datagram_payload([(T0, source, raw) for raw in datagrams])
        last = self.next_seq + len(datagrams) - 1
        self.store.commit(DATAGRAMS, self.next_seq, payload, last_seq=last)
        self.next_seq = last + 1

    def calls(self, prefix: str, count: int) -> list[tuple[str, int]]:
        """`count` reports, one per call: stored, and their keys in stored order."""
        keys = [(f"{prefix}-{n}", 1) for n in range(count)]
        self.reports([f"{c},{s},OK,100,200,,7,menu".encode() for c, s in keys])
        self.keys += keys
        return keys

    def seal_to_relay(self) -> None:
        """Seal the open segment and hand it over as the lake writer does once it is in
        the lake."""
        sealed = self.store.seal()
        assert sealed is not None
        HeldSegments(self.data_dir).take(self.data_dir / "journal" / f"{sealed:012d}.sealed")

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def journaled(tmp_path: Path) -> Iterator[Journaled]:
    store = Journaled(tmp_path / "data")
    yield store
    store.close()


@pytest.fixture
def consumers() -> Iterator[Callable[..., ConsumerStandIn]]:
    started: list[ConsumerStandIn] = []

    def start(**options: object) -> ConsumerStandIn:
        consumer = ConsumerStandIn("127.0.0.1", 0, **options).start()  # type: ignore[arg-type]
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        consumer.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spec(name: str, port: int, **options: object) -> UdpTargetSpec:
    defaults: dict[str, object] = {"retries": 3, "retry_interval_s": 1.0}
    return UdpTargetSpec(name, "127.0.0.1", port, **{**defaults, **options})  # type: ignore[arg-type]


def relay_for(journaled: Journaled, *specs: UdpTargetSpec, **options: object) -> UdpRelay:
    return UdpRelay(journaled.data_dir, journaled.mark, specs, **options)  # type: ignore[arg-type]


def pump(relay: UdpRelay, until: Callable[[], bool], what: str, passes: int = 3000) -> None:
    """Turn the relay's loop (each turn waits at most 20 ms for answers) until `until()`."""
    for _ in range(passes):
        if until():
            return
        relay.pass_once()
    raise AssertionError(f"{what}: not reached in {passes} passes of the relay's loop")


def test_every_stored_report_reaches_each_target_in_stored_order(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    first, second = consumers(), consumers()
    relay = relay_for(journaled, spec("a", first.address[1]), spec("b", second.address[1]))
    journaled.calls("x", 500)
    journaled.store.seal()  # a sealed segment, then the open one
    journaled.calls("y", 500)
    expected = journaled.keys
    both = (first, second)
    pump(relay, lambda: all(len(c.received_keys()) == 1000 for c in both), "all delivered")
    for consumer in (first, second):
        got = [(call_id, serials[0]) for call_id, serials in consumer.received.serials.items()]
        assert got == expected
        assert consumer.received.duplicates == 0
    pump(relay, lambda: all(t.cursor == journaled.next_seq - 1 for t in relay.targets), "cursor")
    for target in relay.targets:
        assert (target.counters.sent, target.counters.answered) == (1000, 1000)
        assert target.counters.given_up == 0
    relay.close()


def test_only_live_reports_are_relayed_not_replay_rejects_or_checks(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    consumer = consumers()

    def not_a_check(event: CallEvent) -> bool:
        return not event.call_id.startswith("check-")

    relay = relay_for(journaled, spec("a", consumer.address[1]), relayable=not_a_check)
    # A replay's records (JSON frames) in the same journal: never relayed.
    replayed = CallEvent(T0, "replayed-1", 1, CallState.ANSWERED, None, "1", "2", "", "7", "m")
    journaled.store.commit(
        JSON_RECORDS, journaled.next_seq, json_payload([replayed]), last_seq=journaled.next_seq
    )
    journaled.next_seq += 1
    journaled.reports(
        [
            b"live-1,1,OK,100,200,,7,menu",
            b"check-1,1,OK,100,200,,7,menu",  # check traffic, flagged by the hook
            b"broken-1,1,NOT-A-STATE,100,200,,7,menu",  # quarantined, not a report
            b"\xff\xfe",  # not even a key
            b"live-2,1,OK,100,200,,7,menu",
        ]
    )
    pump(relay, lambda: relay.targets[0].cursor == journaled.next_seq - 1, "past everything")
    assert consumer.received_keys() == {("live-1", 1), ("live-2", 1)}
    assert consumer.received.datagrams == 2
    relay.close()


def test_check_reports_from_check_senders_only_are_kept_from_every_target(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    """serve's predicate (engine.apps.relay.relayable_reports): the check prefix counts
    from a check sender only, never from a sender a switch is named for."""
    first, second = consumers(), consumers()
    settings = load_settings(
        None,
        {
            "receiver": {
                "allow": ["127.0.0.0/8", "::1/128", "10.0.0.0/8"],
                "check_senders": ["127.0.0.0/8", "::1/128"],
                "switches": {"east": ["127.0.0.9"]},
            }
        },
        environ={},
    )
    relay = relay_for(
        journaled,
        spec("a", first.address[1]),
        spec("b", second.address[1]),
        relayable=relayable_reports(settings),
    )
    check = b"callsentry-check-1,1,OK,100,200,,7,menu"
    journaled.reports([check, b"live-1,1,OK,100,200,,7,menu"], "127.0.0.1:40000")
    journaled.reports([b"callsentry-check-2,1,OK,100,200,,7,menu"], "::1:40000")
    # The same datagram from a sender that may send no checks, and from a named switch
    # inside the check senders' network: reports like any other.
    journaled.reports([check], "10.0.0.5:5060")
    journaled.reports([b"callsentry-check-3,1,OK,100,200,,7,menu"], "127.0.0.9:5060")
    end = journaled.next_seq - 1
    pump(relay, lambda: all(t.cursor == end for t in relay.targets), "past everything")
    relayed = {("live-1", 1), ("callsentry-check-1", 1), ("callsentry-check-3", 1)}
    for consumer in (first, second):
        assert consumer.received_keys() == relayed
        # callsentry-check-1 came once: from 10.0.0.5, not from 127.0.0.1.
        assert consumer.received.datagrams == 3
    relay.close()


def test_a_target_may_get_its_own_separator_and_encoding(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    consumer = consumers(separator="|", encodings=("gbk",))
    relay = relay_for(journaled, spec("gbk", consumer.address[1], separator="|", encoding="gbk"))
    journaled.reports(["call-1,007,OK,100,200,,7,主菜单, 2".encode()])
    pump(relay, lambda: relay.targets[0].counters.answered == 1, "answered")
    assert consumer.received_keys() == {("call-1", 7)}
    assert consumer.received.malformed == 0
    relay.close()


class Silent:
    """A target that reads and never answers (a consumer hung), or answers all but some."""

    def __init__(self, answer: Callable[[bytes], bool] = lambda data: False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.answer = answer
        self.got: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.got.append(data)
            if self.answer(data):
                self.sock.sendto(b",".join(data.split(b",")[:2]), sender)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_a_silent_target_is_down_gives_up_nothing_and_resumes_from_its_cursor(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    clock = Clock()
    silent = Silent()
    port = silent.port
    relay = relay_for(journaled, spec("late", port, window=50), clock=clock)
    target = relay.targets[0]
    journaled.calls("a", 120)
    pump(relay, lambda: target.counters.sent == 50, "the window sent")
    # Time passes well beyond the retries: no answer at all, so down, not given up.
    for _ in range(20):
        clock.now += 1.0
        relay.pass_once(wait_s=0)
    assert target.down and target.counters.down
    assert target.counters.given_up == 0
    assert target.cursor == 0
    assert target.counters.sent == 50  # nothing new goes to a target that is down

    def all_arrived() -> bool:
        return len(silent.got) == target.counters.sent + target.counters.retried

    pump(relay, all_arrived, "every copy sent arrived")
    copies = len(silent.got)
    clock.now += 1.0
    relay.pass_once(wait_s=0)  # a probe: the oldest report owed, once per interval
    pump(relay, all_arrived, "the probe arrived")
    assert len(silent.got) == copies + 1
    assert silent.got[-1] == b"a-0,1,OK,100,200,,7,menu"
    silent.stop()
    relay.save()
    relay.close()
    # A restart, the consumer back (elsewhere): everything from the saved cursor, in order.
    consumer = consumers()
    relay = relay_for(journaled, spec("late", consumer.address[1], window=50), clock=clock)
    assert relay.targets[0].cursor == 0  # resumed from the saved cursor
    pump(relay, lambda: len(consumer.received_keys()) == 120, "all delivered after the outage")
    got = [(call_id, serials[0]) for call_id, serials in consumer.received.serials.items()]
    assert got == journaled.keys
    assert relay.targets[0].counters.given_up == 0
    relay.close()


def test_a_target_that_comes_back_on_its_own_port_resumes(journaled: Journaled) -> None:
    clock = Clock()
    port = free_port()
    relay = relay_for(journaled, spec("back", port, window=20), clock=clock)
    target = relay.targets[0]
    journaled.calls("a", 60)
    pump(relay, lambda: target.counters.sent == 20, "the window sent")
    for _ in range(10):
        clock.now += 1.0
        relay.pass_once(wait_s=0)
    assert target.down
    consumer = ConsumerStandIn("127.0.0.1", port).start()
    try:
        # The probe (the oldest report owed) is answered: up, and everything follows.
        for _ in range(200):
            if len(consumer.received_keys()) == 60:
                break
            clock.now += 0.25
            relay.pass_once()
        assert not target.down
        assert consumer.received_keys() == set(journaled.keys)
        assert target.counters.given_up == 0
    finally:
        consumer.stop()
        relay.close()


def test_a_report_is_given_up_only_while_the_target_answers_others(
    journaled: Journaled,
) -> None:
    clock = Clock()
    picky = Silent(answer=lambda data: not data.startswith(b"a-3,"))
    relay = relay_for(journaled, spec("picky", picky.port, retries=2), clock=clock)
    target = relay.targets[0]
    journaled.calls("a", 5)
    pump(relay, lambda: target.counters.answered == 4, "the others answered")
    while target.owed:
        clock.now += 1.0
        journaled.calls("more", 1)  # the target keeps answering later reports
        pump(relay, lambda: not target.queue and target.counters.sent == len(journaled.keys), "")
        relay.pass_once()
        pump(relay, lambda: len(target.owed) <= 1, "later ones answered")
    assert not target.down
    assert target.counters.given_up == 1
    assert target.counters.retried == 2  # sent 1 + 2 times, as the switch would
    assert target.cursor == journaled.next_seq - 1
    picky.stop()
    relay.close()


def test_past_the_horizon_what_a_down_target_lacked_is_given_up_and_counted(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    clock = Clock()
    up = consumers()
    # Trimmed only when the test says (below), not by the loop.
    bounds = RelayBounds(horizon_s=60.0, max_held_bytes=1, trim_interval_s=1e12)
    down_port = free_port()
    relay = relay_for(
        journaled,
        spec("up", up.address[1]),
        spec("down", down_port, window=10),
        bounds=bounds,
        clock=clock,
    )
    up_target, down_target = relay.targets
    journaled.calls("old", 30)
    journaled.seal_to_relay()
    journaled.calls("new", 5)
    pump(relay, lambda: up_target.cursor == journaled.next_seq - 1, "the live target has all")
    # The byte bound (1 byte) lets the held segment go at the next trim: the target
    # that never answered loses the 30 reports it held.
    relay.trim()
    assert HeldSegments(journaled.data_dir).segments() == []
    assert down_target.counters.given_up == 30
    assert down_target.counters.given_up_horizon == 30
    assert down_target.cursor >= 30
    assert up_target.counters.given_up == 0
    relay.close()


def test_cursors_are_saved_and_status_shows_them(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    consumer = consumers()
    relay = relay_for(journaled, spec("billing", consumer.address[1]))
    journaled.calls("a", 10)
    pump(relay, lambda: relay.targets[0].cursor == 10, "delivered")
    relay.save()
    relay.close()
    state = load_state(state_path(journaled.data_dir))
    assert state is not None
    saved = state.targets["billing"]
    assert (saved.cursor, saved.counters.sent, saved.counters.answered) == (10, 10, 10)
    lines = status_lines(journaled.data_dir, state.saved_at + 1)
    assert any(line.startswith("billing 127.0.0.1:") and "cursor seq 10" in line for line in lines)
    # A restart resumes there: nothing before the cursor is sent again.
    relay = relay_for(journaled, spec("billing", consumer.address[1]))
    journaled.calls("b", 5)
    pump(relay, lambda: len(consumer.received_keys()) == 15, "the next five")
    assert consumer.received.duplicates == 0
    relay.close()


def test_a_new_target_starts_at_the_next_report_stored(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    journaled.calls("before", 10)
    consumer = consumers()
    relay = relay_for(journaled, spec("new", consumer.address[1]))
    journaled.calls("after", 3)
    pump(relay, lambda: len(consumer.received_keys()) == 3, "the reports after it")
    assert {call_id for call_id, _ in consumer.received_keys()} == {"after-0", "after-1", "after-2"}
    relay.close()


def test_held_segments_go_once_every_target_is_past_them(
    journaled: Journaled, consumers: Callable[..., ConsumerStandIn]
) -> None:
    consumer = consumers()
    relay = relay_for(journaled, spec("a", consumer.address[1]))
    journaled.calls("a", 10)
    journaled.seal_to_relay()
    assert len(HeldSegments(journaled.data_dir).segments()) == 1
    journaled.calls("b", 1)
    pump(relay, lambda: relay.targets[0].cursor == 11, "delivered")
    relay.trim()
    assert HeldSegments(journaled.data_dir).segments() == []
    relay.close()


def test_a_report_goes_out_byte_for_byte_as_the_switch_sent_it(journaled: Journaled) -> None:
    received: list[bytes] = []
    target = Silent(answer=lambda data: received.append(data) is None)
    relay = relay_for(journaled, spec("raw", target.port))
    raw = b" call-9 , 3 ,ok,100,200,,7,Menu, with commas\r\n"
    journaled.reports([raw])
    pump(relay, lambda: relay.targets[0].counters.answered == 1, "answered")
    assert received == [raw]
    target.stop()
    relay.close()


@pytest.mark.parametrize(
    ("relay", "expected"),
    [
        (
            {"udp": [{"target": "10.9.9.9:8000"}]},
            "relay (from a flag): target 10.9.9.9:8000 is not in relay.allow",
        ),
        (
            {"udp": [{"target": "billing.example:8000"}]},
            "relay.udp.0.target (from a flag): 'billing.example:8000': the host must be an "
            "IP address",
        ),
        (
            {
                "udp": [
                    {"target": "127.0.0.1:9000"},
                    {"target": "127.0.0.1:9001", "name": "127.0.0.1_9000"},
                ]
            },
            "two targets are named '127.0.0.1_9000'",
        ),
        ({"udp": [{"target": "127.0.0.1:9000", "name": "../x"}]}, "relay.udp.0.name"),
        ({"udp": [{"target": "127.0.0.1:9000", "encoding": "utf-16"}]}, "does not keep ASCII"),
        ({"allow": ["not-a-network"]}, "'not-a-network' is not an IP address or CIDR network"),
    ],
)
def test_relay_settings_say_what_is_wrong(relay: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"relay": relay}, environ={})
    assert expected in str(caught.value)


def test_a_target_in_the_allowed_networks_is_taken() -> None:
    settings = load_settings(
        None,
        {"relay": {"allow": ["10.1.2.0/24"], "udp": [{"target": "10.1.2.50:8000"}]}},
        environ={},
    )
    assert [t.label for t in settings.relay.udp] == ["10.1.2.50_8000"]


def test_simulate_consume_answers_and_says_what_came(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "simulate", "--consume", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"consuming reports on udp 127.0.0.1:{port}")
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.settimeout(10)
        answers = []
        for datagram in (
            b"c-1,1,180,100,200,,7,menu",
            b"c-1,3,bye,100,200,,7,menu",  # serial 2 never comes: a gap
            b"c-1,3,bye,100,200,,7,menu",  # a copy
            b"c-2,1,ok,100,200,,7,Menu\x1b[2J",
        ):
            sender.sendto(datagram, ("127.0.0.1", port))
            answers.append(sender.recv(100))
        sender.close()
        assert answers == [b"c-1,1", b"c-1,3", b"c-1,3", b"c-2,1"]
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "c-1 serial 3 HANGUP" in out and "(duplicate)" in out
    assert "\\x1b[2J" in out and "\x1b" not in out  # network text shown escaped
    assert "reports             3 distinct" in out
    assert "duplicates          1" in out
    assert "calls with gaps     1" in out and "c-1: serials 2 missing" in out
