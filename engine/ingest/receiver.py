"""The UDP receiver: socket I/O, the sender allow-list, and answers after durability.

`ReportServer` owns the sockets and the committer thread; the decisions live in
`Intake` (dedup, batching) and the codec. An answer for a report leaves only
when the group commit holding it has returned from fsync (docs/protocol.md,
obligation 1); a sender outside the allow-list is never answered (obligation 4).

On Linux the sockets are read and answered in batches (`engine.ingest.udpbatch`);
elsewhere, or with `receiver.batched_io = false`, through the event loop's
datagram transport. Both feed `on_datagrams`, so the decisions are the same.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from engine.core.addresses import parse_hostport
from engine.ingest import journal, udpbatch
from engine.ingest.codec import RECEIVE_BYTES, Codec
from engine.ingest.intake import Batch, Intake, Key, Outcome, ReplyTo
from engine.ingest.journal import DATAGRAMS, TICK, AnswersOn, datagram_payload, tick_payload
from engine.ingest.stats import Stats
from engine.ingest.store import EventStore
from engine.ingest.udpbatch import BatchSocket, peer_of

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ACCEPTED = Outcome.ACCEPTED
_UNKNOWN: Any = object()
_BATCHES_PER_WAKEUP = 1
_SLOW_COMMIT_S = 0.1
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0
# How often the receiver compares the lake writer's progress with store.max_lake_backlog.
_BACKLOG_CHECK_S = 0.5


class _OutOfOrder(Exception):
    """A batch reached the committer while an earlier one still waits for its retry.

    Up to two batches are in flight. If the older one's commit fails, the newer
    must not be written first: the journal and the lake keep reports in sequence
    order, and restarts and catch-up rely on it. The refused batch is resubmitted
    with the failed one, in order.
    """


def _log_tick_failure(future: Future[Any]) -> None:
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


class _Endpoint:
    """One listening socket: how its senders' addresses read and how answers leave."""

    def peer(self, addr: Any) -> tuple[str, int] | None:
        raise NotImplementedError

    def send(self, answers: list[tuple[bytes, Any]]) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _BatchEndpoint(_Endpoint):
    """recvmmsg/sendmmsg (Linux): addresses are raw sockaddr bytes."""

    def __init__(self, sock: socket.socket, key_separator: bytes | None) -> None:
        self.io = BatchSocket(sock, key_separator=key_separator)
        self.sock = sock

    def peer(self, addr: Any) -> tuple[str, int] | None:
        return peer_of(addr)

    def send(self, answers: list[tuple[bytes, Any]]) -> int:
        return self.io.send(answers)

    def close(self) -> None:
        self.sock.close()


class _TransportEndpoint(_Endpoint, asyncio.DatagramProtocol):
    """The event loop's datagram transport, one callback per datagram (elsewhere)."""

    def __init__(self, server: ReportServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport quacks like asyncio.DatagramTransport without subclassing it.
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Python 3.11's stock loop reads each datagram into a 256 KiB buffer;
        # a small one is much faster and still shows us an oversized datagram.
        if hasattr(transport, "max_size"):
            transport.max_size = RECEIVE_BYTES

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.on_datagrams([(data, addr, None, None)], self)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable for an answer to a vanished sender: nothing to do.
        log.debug("socket error: %s", exc)

    def peer(self, addr: Any) -> tuple[str, int] | None:
        return str(addr[0]), int(addr[1])

    def send(self, answers: list[tuple[bytes, Any]]) -> int:
        assert self.transport is not None
        sendto = self.transport.sendto
        for answer, addr in answers:
            sendto(answer, addr)
        return len(answers)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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
        batched_io: bool = True,
        tick_s: float = 5.0,
        max_lake_backlog: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec = codec
        self._read_key = codec.read_key
        self.store = store
        self.intake = intake
        self.stats = stats
        self.allow = allow
        self.listen = list(listen)
        self.commit_max_reports = commit_max_reports
        self.commit_max_delay_s = commit_max_delay_ms / 1000.0
        self.socket_buffer_bytes = socket_buffer_bytes
        self.batched_io = batched_io and udpbatch.supported()
        self.clock = clock
        self.tick_s = tick_s
        self.max_lake_backlog = max_lake_backlog
        # The intake's max_pending while new reports are held back for the lake writer.
        self._held_max_pending: int | None = None
        self.addresses: list[tuple[str, int]] = []
        self._endpoints: list[_Endpoint] = []
        # Per sender address (as its socket reports it): "host:port" when allowed,
        # None when not. Read on the datagram path instead of parsing addresses.
        self._peers: dict[Any, str | None] = {}
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="committer")
        self._answerer = ThreadPoolExecutor(1, thread_name_prefix="answerer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._retry_s = _RETRY_FIRST_S
        self._failing_since: float | None = None
        self._closing = False
        self._stopped = False
        self._last_ts = 0.0
        self._warned_senders: set[str] = set()
        self._warned_answers = False
        # The journal takes batches strictly in sequence: after a failed commit the
        # batches behind it are refused until it is written (see `_OutOfOrder`).
        self._next_seq_to_write = intake.open.first_seq
        # Set at start: whether every socket may be answered from the committer thread,
        # and the socket answered within the commit itself, if that can be done.
        self._answers_from_committer = False
        self._answer_fd: int | None = None

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
                # A group commit's answers leave in one burst.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer_bytes)
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
            bound = sock.getsockname()
            if self.batched_io:
                sock.setblocking(False)
                endpoint = _BatchEndpoint(sock, self.codec.key_separator)
                self._loop.add_reader(sock.fileno(), self._on_readable, endpoint)
                self._endpoints.append(endpoint)
            else:
                _, protocol = await self._loop.create_datagram_endpoint(
                    lambda: _TransportEndpoint(self), sock=sock
                )
                self._endpoints.append(protocol)
            self.addresses.append((bound[0], bound[1]))
        self._answers_from_committer = all(isinstance(e, _BatchEndpoint) for e in self._endpoints)
        # One batched socket: its answers leave with the commit's fsync (compiled helper).
        if (
            self._answers_from_committer
            and len(self._endpoints) == 1
            and journal.durable_write is not None
        ):
            self._answer_fd = cast(_BatchEndpoint, self._endpoints[0]).io.fd
        self._loop.call_later(self.tick_s, self._heartbeat)
        if self.max_lake_backlog:
            self._loop.call_later(_BACKLOG_CHECK_S, self._watch_backlog)

    # -- the datagram path (hot) ------------------------------------------------

    def _on_readable(self, endpoint: _BatchEndpoint) -> None:
        io = endpoint.io
        # A bounded number of batches per wakeup, so commit completions interleave.
        for _ in range(_BATCHES_PER_WAKEUP):
            received = io.receive()
            if received:
                self.on_datagrams(received, endpoint)
            if len(received) < io.slots:
                break
        if io.last_error is not None:
            log.debug("socket error: %s", io.last_error)
            io.last_error = None

    def _learn_peer(self, addr: Any, endpoint: _Endpoint) -> str | None:
        peer = endpoint.peer(addr)
        allowed = peer is not None and peer[0] in self.allow
        # A spoofing flood must not grow this cache without bound.
        if len(self._peers) > 65_536:
            self._peers.clear()
        self._peers[addr] = f"{peer[0]}:{peer[1]}" if peer is not None and allowed else None
        if not allowed:
            host = peer[0] if peer is not None else repr(addr)
            if host not in self._warned_senders and len(self._warned_senders) < 100:
                self._warned_senders.add(host)
                log.warning("dropping datagrams from %s: not in the sender allow-list", host)
        return self._peers[addr]

    def on_datagrams(
        self, received: list[tuple[bytes, Any, Key | None, bytes | None]], endpoint: _Endpoint
    ) -> None:
        """Datagrams that arrived together: (bytes, sender address as the endpoint has
        it, and the key and answer if the endpoint read them, else None)."""
        stats = self.stats
        stats.received += len(received)
        # Event time is the arrival time (docs/protocol.md, obligation 6). It never runs
        # backwards, even if the wall clock is stepped back; in whole microseconds, as
        # the lake stores it, so a replay of it is exact. One reading per batch: its
        # datagrams were all waiting at this instant.
        now = round(self.clock(), 6)
        if now < self._last_ts:
            now = self._last_ts
        self._last_ts = now
        peers, read_key, offer = self._peers, self._read_key, self.intake.offer
        closing = self._closing
        take_usual = None if closing else self.intake.take_usual
        answers_now: list[tuple[bytes, Any]] = []
        accepted = False
        index, count = 0, len(received)
        while index < count:
            if take_usual is not None:
                # Runs of new reports from known senders join the batch in one call.
                taken_to = take_usual(received, index, peers, now, endpoint)
                if taken_to > index:
                    accepted = True
                    index = taken_to
                    if index == count:
                        break
            data, addr, key, answer = received[index]
            index += 1
            source = peers.get(addr, _UNKNOWN)
            if source is _UNKNOWN:
                source = self._learn_peer(addr, endpoint)
            if source is None:
                stats.dropped_sender += 1
                continue
            if closing:
                stats.dropped_shutdown += 1
                continue
            # Only the key is read here; the full decode happens in the lake writer.
            if key is None:
                read = read_key(data)
                if read is not None:
                    key, answer = read
            outcome, answer_now = offer(key, answer, (now, source, data), now, (endpoint, addr))
            if answer_now is not None:
                answers_now.append((answer_now, addr))
            elif outcome is _ACCEPTED:
                accepted = True
        if answers_now:
            self._answer(endpoint, answers_now)
        if accepted and self.intake.can_seal:
            self._schedule_commit()

    def _answer(self, endpoint: _Endpoint, answers: list[tuple[bytes, Any]]) -> None:
        self._count_answers(len(answers), endpoint.send(answers))

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

    def _watch_backlog(self) -> None:
        """Stop taking new reports while the lake writer is too far behind; take them
        again once it is within half of the bound. Copies of stored reports are
        still answered; new ones are left for the switch to retry."""
        if self._closing:
            return
        assert self._loop is not None
        self._loop.call_later(_BACKLOG_CHECK_S, self._watch_backlog)
        backlog = self.stats.lake_backlog
        if self._held_max_pending is None:
            if backlog > self.max_lake_backlog:
                self._held_max_pending = self.intake.max_pending
                self.intake.max_pending = 0
                self.stats.backlog_holds += 1
                log.warning(
                    "the lake writer is %d reports behind (store.max_lake_backlog = %d); "
                    "not taking new reports until it is within half of that (the switch "
                    "retries them)",
                    backlog,
                    self.max_lake_backlog,
                )
        elif backlog <= self.max_lake_backlog // 2:
            self.intake.max_pending = self._held_max_pending
            self._held_max_pending = None
            log.warning("the lake writer caught up (%d reports behind); taking reports", backlog)

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

    def _resubmit_in_flight(self) -> None:
        """After a failed commit: that batch and every one sealed after it, in order."""
        for batch in list(self.intake.in_flight):
            self._submit(batch)

    def _write(self, batch: Batch) -> None:
        """On the committer thread: encode the batch and make it durable. With
        batched sockets (safe to send on from any thread) its answers go to the
        answerer thread straight away: they leave while the event loop is still
        getting round to the next batch, and this thread is free for its fsync."""
        if batch.first_seq != self._next_seq_to_write:
            raise _OutOfOrder(batch.first_seq)
        answers_on: AnswersOn | None = None
        if self._answer_fd is not None and batch.answers:
            answers_on = (self._answer_fd, [(answer, to[1]) for answer, to in batch.answers])
        sent = self.store.commit(
            DATAGRAMS,
            batch.first_seq,
            datagram_payload(batch.records),
            answers_on,
            last_seq=batch.first_seq + len(batch) - 1,
        )
        self._next_seq_to_write = batch.first_seq + len(batch)
        if sent is not None:
            # Already on their way: the fsync and the send were one step without the GIL.
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._count_sent, len(batch.answers), *sent)
        elif self._answers_from_committer and batch.answers:
            self._answerer.submit(self._answer_batch, batch.answers)

    def _count_sent(self, due: int, sent: int, send_errno: int) -> None:
        if send_errno and isinstance(self._endpoints[0], _BatchEndpoint):
            io = self._endpoints[0].io
            io.send_failures += due - sent
            io.last_error = OSError(send_errno, f"sendmmsg: {os.strerror(send_errno)}")
        self._count_answers(due, sent)

    def _answer_batch(self, answers: list[tuple[bytes, ReplyTo]]) -> None:
        """On the answerer thread: send a stored batch's answers, count them on the loop."""
        try:
            sent = self._deliver(answers)
        except Exception:
            log.exception("answering a stored batch failed; the switch will retry")
            sent = 0
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._count_answers, len(answers), sent)

    def _deliver(self, answers: list[tuple[bytes, ReplyTo]]) -> int:
        """Send answers to their reply-to addresses; returns how many left."""
        if len(self._endpoints) == 1:
            return self._endpoints[0].send([(answer, to[1]) for answer, to in answers])
        by_endpoint: dict[_Endpoint, list[tuple[bytes, Any]]] = {}
        for answer, (endpoint, addr) in answers:
            by_endpoint.setdefault(endpoint, []).append((answer, addr))
        return sum(endpoint.send(group) for endpoint, group in by_endpoint.items())

    def _count_answers(self, due: int, sent: int, error: OSError | None = None) -> None:
        self.stats.answered += sent
        if sent < due:
            self.stats.answer_failures += due - sent
            if not self._warned_answers:
                self._warned_answers = True
                log.warning(
                    "%d answers could not be sent (%s); their senders retry and are answered again",
                    due - sent,
                    error or self._last_send_error(),
                )

    def _last_send_error(self) -> OSError | None:
        for endpoint in self._endpoints:
            if isinstance(endpoint, _BatchEndpoint) and endpoint.io.last_error is not None:
                return endpoint.io.last_error
        return None

    def _committed(self, future: asyncio.Future[None], batch: Batch, started: float) -> None:
        elapsed = time.monotonic() - started
        error = future.exception()
        if isinstance(error, _OutOfOrder):
            return  # resubmitted behind the failed batch before it
        if error is not None:
            self.stats.store_failures += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("store cannot commit (%s); not answering until it can, retrying", error)
            assert self._loop is not None
            self._loop.call_later(self._retry_s, self._resubmit_in_flight)
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
        if not self._answers_from_committer:
            answers = batch.answers + answers
        # The next batch's fsync can start while this one's late answers leave.
        if self.intake.open.records:
            self._commit()
        self.stats.pending = self.intake.pending
        if answers and not self._stopped:
            self._count_answers(len(answers), self._deliver(answers))

    async def drain(self) -> None:
        """Stop taking reports, make the accepted ones durable and answer them."""
        self._closing = True
        self._commit()
        while self.intake.in_flight or self.intake.open.records:
            if self._failing_since is not None and time.monotonic() - self._failing_since > 5:
                log.error(
                    "store still failing at shutdown: %d accepted reports were not answered "
                    "(the switch will send them again)",
                    self.intake.pending,
                )
                break
            await asyncio.sleep(0.01)
            if self.intake.can_seal:
                self._commit()

    async def stop(self) -> None:
        await self.drain()
        # The answerer thread works in order: once this no-op has run, every stored
        # batch's answers have left, and their counts are queued on the loop.
        await asyncio.wrap_future(self._answerer.submit(int))
        await asyncio.sleep(0)
        self._stopped = True
        for endpoint in self._endpoints:
            if isinstance(endpoint, _BatchEndpoint) and self._loop is not None:
                self._loop.remove_reader(endpoint.sock.fileno())
            endpoint.close()
        self._committer.shutdown(wait=True)
        self._answerer.shutdown(wait=True)
