"""The UDP receiver: socket I/O, the sender allow-list, and answers after durability.

`ReportServer` owns the sockets and the committer thread; the decisions live in
`Intake` (dedup, batching) and the codec. An answer for a report leaves only
when the group commit holding it has returned from fsync.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from engine.codec import Codec
from engine.config import parse_hostport
from engine.ingest import Batch, Intake, Outcome
from engine.journal import DATAGRAMS, TICK, datagram_payload, tick_payload
from engine.stats import Stats
from engine.store import EventStore

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ACCEPTED = Outcome.ACCEPTED
_SLOW_COMMIT_S = 0.1
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0


def _log_tick_failure(future: Future[None]) -> None:
    error = future.exception()
    if error is not None:
        log.debug("tick not journaled: %s", error)


class AllowList:
    """Sender addresses allowed to report; answers are cached per address."""

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.cache: dict[str, bool] = {}

    def __contains__(self, host: str) -> bool:
        allowed = self.cache.get(host)
        if allowed is None:
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            allowed = any(address in network for network in self.networks)
            # A spoofing flood must not grow this cache without bound.
            if len(self.cache) > 65_536:
                self.cache.clear()
            self.cache[host] = allowed
        return allowed

    def describe(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "nobody"


class _ReportProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ReportServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport quacks like asyncio.DatagramTransport without subclassing it.
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Python 3.11's stock loop reads each datagram into a 256 KiB buffer;
        # a small one is much faster and still shows us an oversized datagram.
        if hasattr(transport, "max_size"):
            transport.max_size = 4096

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.server.on_datagram(data, addr, self.transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable for an answer to a vanished sender: nothing to do.
        log.debug("socket error: %s", exc)


class ReportServer:
    def __init__(
        self,
        *,
        codec: Codec,
        store: EventStore,
        intake: Intake,
        stats: Stats,
        allow: AllowList,
        listen: Sequence[str],
        commit_max_reports: int,
        commit_max_delay_ms: float,
        socket_buffer_bytes: int = 8 * 1024 * 1024,
        tick_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec = codec
        self._read_key = codec.read_key
        self.store = store
        self.intake = intake
        self.stats = stats
        self.allow = allow
        # The allow-list's own cache, read directly on the datagram path.
        self._allowed = allow.cache
        self.listen = list(listen)
        self.commit_max_reports = commit_max_reports
        self.commit_max_delay_s = commit_max_delay_ms / 1000.0
        self.socket_buffer_bytes = socket_buffer_bytes
        self.clock = clock
        self.tick_s = tick_s
        self.addresses: list[tuple[str, int]] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="committer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._retry_s = _RETRY_FIRST_S
        self._failing_since: float | None = None
        self._closing = False
        self._stopped = False
        self._last_ts = 0.0
        self._warned_senders: set[str] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for spec in self.listen:
            host, port = parse_hostport(spec)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    # Keep IPv6 sockets IPv6-only so "0.0.0.0:P" and "[::]:P" can both be listed.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer_bytes)
                sock.bind((host, port))
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                # Linux reports twice what it grants for its own bookkeeping.
                if granted // 2 < self.socket_buffer_bytes // 2:
                    log.warning(
                        "%s: receive buffer is %d KiB, asked for %d KiB; bursts may be "
                        "dropped (raise net.core.rmem_max)",
                        spec,
                        granted // 2048,
                        self.socket_buffer_bytes // 1024,
                    )
            except OSError as error:
                sock.close()
                raise OSError(error.errno, f"cannot listen on {spec}: {error.strerror}") from None
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _ReportProtocol(self), sock=sock
            )
            self._transports.append(transport)
            bound = transport.get_extra_info("sockname")
            self.addresses.append((bound[0], bound[1]))
        self._loop.call_later(self.tick_s, self._heartbeat)

    # -- the datagram path (hot) ------------------------------------------------

    def on_datagram(self, data: bytes, addr: Any, transport: asyncio.DatagramTransport) -> None:
        stats = self.stats
        stats.received += 1
        host = addr[0]
        if not self._allowed.get(host, False) and host not in self.allow:
            stats.dropped_sender += 1
            if host not in self._warned_senders and len(self._warned_senders) < 100:
                self._warned_senders.add(host)
                log.warning("dropping datagrams from %s: not in the sender allow-list", host)
            return
        if self._closing:
            stats.dropped_shutdown += 1
            return
        # Event time never runs backwards, even if the wall clock is stepped back; in
        # whole microseconds, as the lake stores it, so a replay of it is exact.
        now = round(self.clock(), 6)
        if now < self._last_ts:
            now = self._last_ts
        self._last_ts = now
        # Only the key is read here; the full decode happens in the lake writer.
        read = self._read_key(data)
        key, answer = read if read is not None else (None, None)
        outcome, answer_now = self.intake.offer(
            key, answer, (now, f"{host}:{addr[1]}", data), now, (transport, addr)
        )
        if answer_now is not None:
            transport.sendto(answer_now, addr)
            stats.answered += 1
        if outcome is _ACCEPTED and self.intake.in_flight is None:
            self._schedule_commit()

    def _schedule_commit(self) -> None:
        # (With a commit in flight, its completion picks the open batch up.)
        if len(self.intake.open) >= self.commit_max_reports:
            self._commit()
        elif self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(self.commit_max_delay_s, self._commit)

    def _heartbeat(self) -> None:
        """While no report comes, journal a tick now and then, so event time (and with
        it call timeouts) moves on in detection; replays of the journal see the same."""
        if self._closing:
            return
        assert self._loop is not None
        self._loop.call_later(self.tick_s, self._heartbeat)
        now = round(self.clock(), 6)
        if now - self._last_ts < self.tick_s:
            return
        self._last_ts = now
        future = self._committer.submit(self.store.commit, TICK, 0, tick_payload(now))
        future.add_done_callback(_log_tick_failure)

    # -- group commit -----------------------------------------------------------

    def _commit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self.intake.seal()
        if batch is None:
            return
        self._submit(batch)

    def _submit(self, batch: Batch) -> None:
        assert self._loop is not None
        self.stats.pending = self.intake.pending
        started = time.monotonic()
        future = self._loop.run_in_executor(self._committer, self._write, batch)
        future.add_done_callback(lambda f: self._committed(f, batch, started))

    def _write(self, batch: Batch) -> None:
        """On the committer thread: encode the batch and make it durable."""
        self.store.commit(DATAGRAMS, batch.first_seq, datagram_payload(batch.records))

    def _committed(self, future: asyncio.Future[None], batch: Batch, started: float) -> None:
        elapsed = time.monotonic() - started
        error = future.exception()
        if error is not None:
            self.stats.store_failures += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("store cannot commit (%s); not answering until it can, retrying", error)
            assert self._loop is not None
            self._loop.call_later(self._retry_s, self._submit, batch)
            self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
            return
        if self._failing_since is not None:
            log.warning(
                "store recovered after %.1f s; answering again",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
            self._retry_s = _RETRY_FIRST_S
        self.stats.commits += 1
        if elapsed > _SLOW_COMMIT_S:
            self.stats.store_stalls += 1
        answers = self.intake.durable(batch)
        if not self._stopped:
            for answer, (transport, addr) in answers:
                transport.sendto(answer, addr)
            self.stats.answered += len(answers)
        self.stats.pending = self.intake.pending
        if self.intake.open.records:
            self._commit()

    async def drain(self) -> None:
        """Stop taking reports, make the accepted ones durable and answer them."""
        self._closing = True
        self._commit()
        while self.intake.in_flight is not None or self.intake.open.records:
            if self._failing_since is not None and time.monotonic() - self._failing_since > 5:
                log.error(
                    "store still failing at shutdown: %d accepted reports were not answered "
                    "(the switch will send them again)",
                    self.intake.pending,
                )
                break
            await asyncio.sleep(0.01)
            if self.intake.in_flight is None:
                self._commit()

    async def stop(self) -> None:
        await self.drain()
        self._stopped = True
        for transport in self._transports:
            transport.close()
        self._committer.shutdown(wait=True)
