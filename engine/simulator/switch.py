"""A stand-in for the switch's side of the protocol: send reports over UDP and retry.

Each report is sent, then sent again every `retry_interval_s` until answered,
at most `retries` more times (VOS3000 defaults: 6 retries, 3 s apart), then
given up for good, as docs/protocol.md describes the switch. Used by
`callsentry simulate --send`, by `make demo` and by the tests; the summary it
returns doubles as a deployment check.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.core.events import CallEvent
from engine.ingest.codec import Codec


@dataclass
class _Outstanding:
    payload: bytes
    first_sent: float
    copies: int


@dataclass
class SendSummary:
    reports: int = 0
    datagrams: int = 0
    answered: int = 0
    given_up: int = 0
    retried: int = 0
    bad_answers: int = 0
    late_answers: int = 0
    lost_requests: int = 0
    lost_answers: int = 0
    latencies_s: list[float] = field(default_factory=list)
    given_up_keys: list[tuple[str, int]] = field(default_factory=list)
    # Reports of which at least one copy left (was not dropped by simulated loss).
    delivered_keys: set[tuple[str, int]] = field(default_factory=set)
    elapsed_s: float = 0.0

    def percentile(self, share: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    def lines(self) -> list[str]:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f} ms"

        rate = self.reports / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return [
            f"reports sent        {self.reports} ({self.datagrams} datagrams, "
            f"{self.retried} retries) in {self.elapsed_s:.1f} s, {rate:.0f} reports/s",
            f"answered            {self.answered}",
            f"given up            {self.given_up}",
            f"bad answers         {self.bad_answers}",
            f"late answers        {self.late_answers}",
            f"simulated loss      {self.lost_requests} requests, {self.lost_answers} answers",
            f"answer latency      p50 {ms(self.percentile(0.5))}, p90 {ms(self.percentile(0.9))}, "
            f"p99 {ms(self.percentile(0.99))}, max {ms(max(self.latencies_s, default=None))}",
        ]


@dataclass(frozen=True)
class SwitchSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    retries: int = 6
    retry_interval_s: float = 3.0
    # Reports per second of wall time; 0 means as fast as `window` allows.
    rate: float = 0.0
    # Reports sent and not yet answered or given up, at most.
    window: int = 1000
    request_loss: float = 0.0
    answer_loss: float = 0.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be 0 or more")
        if self.retry_interval_s <= 0:
            raise ValueError("retry interval must be greater than 0 seconds")
        if self.rate < 0:
            raise ValueError("rate must be 0 (as fast as possible) or more")
        if self.window < 1:
            raise ValueError("window must be at least 1")
        for name in ("request_loss", "answer_loss"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be a share from 0 to below 1")


class _AnswerProtocol(asyncio.DatagramProtocol):
    def __init__(self, switch: SwitchStandIn) -> None:
        self.switch = switch

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.switch.on_answer(data)

    def error_received(self, exc: Exception) -> None:
        # Port unreachable while the receiver restarts: the retries cover it.
        pass


class SwitchStandIn:
    def __init__(self, codec: Codec, settings: SwitchSettings) -> None:
        self.codec = codec
        self.settings = settings
        self.summary = SendSummary()
        self._random = random.Random(settings.seed)
        self._outstanding: dict[tuple[str, int], _Outstanding] = {}
        self._done: set[tuple[str, int]] = set()
        self._due: list[tuple[float, tuple[str, int]]] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._room = asyncio.Event()
        self._separator = getattr(codec, "separator", ",")

    def on_answer(self, data: bytes) -> None:
        if self.settings.answer_loss and self._random.random() < self.settings.answer_loss:
            self.summary.lost_answers += 1
            return
        key = self._parse_answer(data)
        if key is None:
            self.summary.bad_answers += 1
            return
        entry = self._outstanding.pop(key, None)
        if entry is None:
            # An answer to a report already answered (a retry's copy) or given up.
            if key in self._done:
                self.summary.late_answers += 1
            else:
                self.summary.bad_answers += 1
            return
        self._done.add(key)
        self.summary.answered += 1
        self.summary.latencies_s.append(time.monotonic() - entry.first_sent)
        self._room.set()

    def _parse_answer(self, data: bytes) -> tuple[str, int] | None:
        for encoding in getattr(self.codec, "encodings", ("utf-8",)):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            call_id, sep, serial = text.rpartition(self._separator)
            if sep and serial.isdigit():
                return call_id, int(serial)
            return None
        return None

    def _send(self, key: tuple[str, int], entry: _Outstanding) -> None:
        assert self._transport is not None
        entry.copies += 1
        self.summary.datagrams += 1
        if self.settings.request_loss and self._random.random() < self.settings.request_loss:
            self.summary.lost_requests += 1
            return
        self.summary.delivered_keys.add(key)
        self._transport.sendto(entry.payload)

    def _retry_due(self, now: float) -> None:
        interval = self.settings.retry_interval_s
        while self._due and self._due[0][0] <= now:
            _, key = heapq.heappop(self._due)
            entry = self._outstanding.get(key)
            if entry is None:
                continue
            if entry.copies > self.settings.retries:
                del self._outstanding[key]
                self._done.add(key)
                self.summary.given_up += 1
                self.summary.given_up_keys.append(key)
                self._room.set()
                continue
            self.summary.retried += 1
            self._send(key, entry)
            heapq.heappush(self._due, (now + interval, key))

    async def _retry_loop(self) -> None:
        tick = min(0.05, self.settings.retry_interval_s / 4)
        while True:
            await asyncio.sleep(tick)
            self._retry_due(time.monotonic())

    async def send(
        self, events: Sequence[CallEvent], offsets: Sequence[float] | None = None
    ) -> SendSummary:
        """Send every report; `offsets` (seconds after the start, one per event) paces
        them as the switch would, otherwise `rate` or the window does."""
        if offsets is not None and len(offsets) != len(events):
            raise ValueError("one offset per event is needed")
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        # Answers come back in bursts of a whole group commit; the default
        # receive buffer (about 200 KiB, some 270 small datagrams) would drop some.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.connect((self.settings.host, self.settings.port))
        transport, _ = await loop.create_datagram_endpoint(lambda: _AnswerProtocol(self), sock=sock)
        self._transport = transport
        retry_task = asyncio.create_task(self._retry_loop())
        started = time.monotonic()
        try:
            for number, event in enumerate(events):
                due = None
                if offsets is not None:
                    due = started + offsets[number]
                elif self.settings.rate > 0:
                    due = started + number / self.settings.rate
                if due is not None:
                    delay = due - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                while len(self._outstanding) >= self.settings.window:
                    self._room.clear()
                    await self._room.wait()
                key = event.key
                if key in self._outstanding or key in self._done:
                    continue
                now = time.monotonic()
                entry = _Outstanding(self.codec.encode(event), now, 0)
                self._outstanding[key] = entry
                self.summary.reports += 1
                self._send(key, entry)
                heapq.heappush(self._due, (now + self.settings.retry_interval_s, key))
                if number % 256 == 255:
                    await asyncio.sleep(0)  # let answers in
            while self._outstanding:
                self._room.clear()
                await self._room.wait()
        finally:
            retry_task.cancel()
            transport.close()
            self.summary.elapsed_s = time.monotonic() - started
        return self.summary
