"""Datagrams in batches: Linux `recvmmsg`/`sendmmsg` through ctypes.

An event loop's datagram transport costs one Python callback and one system
call per datagram received, and one call plus one system call per answer sent.
At tens of thousands of reports a second that overhead, not the work, is most of
the receiver's time. `recvmmsg` reads up to `slots` datagrams in one call and
`sendmmsg` sends a whole group commit's answers in one; both are plain libc
functions, so ctypes reaches them without a compiled extension.

Buffers are allocated once; each message header and its iovec point at a fixed
slot, so a call only updates lengths. Addresses stay raw `sockaddr` bytes: the
receiver caches what each means, and an answer goes back to exactly the bytes a
report came from.

Linux on a 64-bit platform only (the `mmsghdr` layout below is LP64); elsewhere
`supported()` is False and the receiver uses the event loop's transport.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from engine.core.events import MAX_CALL_ID_BYTES, MAX_SERIAL_DIGITS
from engine.ingest import native
from engine.ingest.codec import RECEIVE_BYTES

# struct mmsghdr on LP64 Linux: msghdr {name*, namelen u32 (+4), iov*, iovlen,
# control*, controllen, flags i32 (+4)} then msg_len u32 (+4): 64 bytes.
_MMSGHDR = struct.Struct("<QI4xQQQQi4xI4x")
_IOVEC = struct.Struct("<QQ")
_U32_PER_HEADER = _MMSGHDR.size // 4
_NAMELEN, _FLAGS, _MSG_LEN = 2, 12, 14
_NAME_BYTES = 128  # sizeof(struct sockaddr_storage)
_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20

# Answers carry call_id (<= 128 bytes), a separator and serial (<= 18 digits).
ANSWER_SLOT_BYTES = 256


def _libc_functions() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fd, buffer, count, flags = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    recvmmsg.argtypes = [fd, buffer, count, flags, ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [fd, buffer, count, flags]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_FUNCTIONS = _libc_functions()


def supported() -> bool:
    return _FUNCTIONS is not None


def sockaddr_of(family: int, host: str, port: int) -> bytes:
    """The raw sockaddr the kernel reports for (host, port): for tests and tools."""
    if family == socket.AF_INET:
        return struct.pack("<H", family) + struct.pack(">H4s8x", port, socket.inet_aton(host))
    packed = socket.inet_pton(socket.AF_INET6, host)
    return struct.pack("<H", family) + struct.pack(">HI16sI", port, 0, packed, 0)


def peer_of(raw: bytes) -> tuple[str, int] | None:
    """(host, port) of a raw sockaddr_in / sockaddr_in6, None for anything else."""
    if len(raw) >= 8 and int.from_bytes(raw[:2], "little") == socket.AF_INET:
        return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
    if len(raw) >= 24 and int.from_bytes(raw[:2], "little") == socket.AF_INET6:
        host = str(ipaddress.IPv6Address(raw[8:24]))
        scope = int.from_bytes(raw[24:28], "little") if len(raw) >= 28 else 0
        return (f"{host}%{scope}" if scope else host), int.from_bytes(raw[2:4], "big")
    return None


class _Slots:
    """`count` message headers, each with one iovec over a fixed slot of `slot_bytes`."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.count = count
        self.slot_bytes = slot_bytes
        self.data = ctypes.create_string_buffer(count * slot_bytes)
        self.names = ctypes.create_string_buffer(count * _NAME_BYTES)
        self.iovecs = ctypes.create_string_buffer(count * _IOVEC.size)
        self.headers = ctypes.create_string_buffer(count * _MMSGHDR.size)
        data, names = ctypes.addressof(self.data), ctypes.addressof(self.names)
        iovecs = ctypes.addressof(self.iovecs)
        for i in range(count):
            _IOVEC.pack_into(self.iovecs, i * _IOVEC.size, data + i * slot_bytes, slot_bytes)
            _MMSGHDR.pack_into(
                self.headers,
                i * _MMSGHDR.size,
                names + i * _NAME_BYTES,
                _NAME_BYTES,
                iovecs + i * _IOVEC.size,
                1,
                0,
                0,
                0,
                0,
            )
        self.address = ctypes.addressof(self.headers)
        self.data_view = memoryview(self.data).cast("B")
        self.name_view = memoryview(self.names).cast("B")
        self.header_u32 = memoryview(self.headers).cast("B").cast("I")
        self.iovec_u64 = memoryview(self.iovecs).cast("B").cast("Q")


# A datagram read: its bytes, the sender's raw sockaddr, and its (call_id, serial)
# key and answer when read on the way in (else None: the caller reads them).
Received = tuple[bytes, bytes, tuple[str, int] | None, bytes | None]


def _compiled_receive() -> Callable[..., tuple[list[Received], int]] | None:
    fastio = native.load("_fastio")
    if fastio is None:  # not built here, or stale: the ctypes path below
        return None
    function: Callable[..., tuple[list[Received], int]] = fastio.receive
    return function


_RECEIVE = _compiled_receive()


class BatchSocket:
    """A bound, non-blocking UDP socket read and answered in batches.

    With `key_separator` (and the compiled helper), each datagram's usual key is
    read as it is copied out of the buffer, as `Codec.read_key` would read it.
    """

    def __init__(
        self,
        sock: socket.socket,
        slots: int = 256,
        datagram_bytes: int = RECEIVE_BYTES,
        key_separator: bytes | None = None,
    ) -> None:
        if _FUNCTIONS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _FUNCTIONS
        self.sock = sock
        self.fd = sock.fileno()
        self.slots = slots
        self._in = _Slots(slots, datagram_bytes)
        self._out = _Slots(slots, ANSWER_SLOT_BYTES)
        # The event loop (copies of stored reports) and the committer thread
        # (a batch's answers) both send; they share the outgoing slots.
        self._sending = threading.Lock()
        # Answers that could not be sent (send buffer full, unreachable sender).
        self.send_failures = 0
        self.last_error: OSError | None = None
        self._separator = key_separator[0] if key_separator and len(key_separator) == 1 else -1

    def receive(self) -> list[Received]:
        """Up to `slots` waiting datagrams; [] when none wait.

        A datagram longer than the slot comes back cut to the slot size, which is
        still longer than any report may be, so the codec rejects it as oversized.
        """
        slots = self._in
        if _RECEIVE is not None:
            batch, code = _RECEIVE(
                self.fd,
                slots.address,
                slots.count,
                _NAME_BYTES,
                self._separator,
                MAX_CALL_ID_BYTES,
                MAX_SERIAL_DIGITS,
            )
            if code and code != errno.EINTR:
                self.last_error = OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
            return batch
        got = self._recvmmsg(self.fd, slots.address, slots.count, _MSG_DONTWAIT, None)
        if got <= 0:
            if got < 0:
                code = ctypes.get_errno()
                if code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    self.last_error = OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
            return []
        header, data, names = slots.header_u32, slots.data_view, slots.name_view
        size, per = slots.slot_bytes, _U32_PER_HEADER
        received: list[Received] = []
        append = received.append
        for i in range(got):
            at = i * per
            start = i * size
            name_start = i * _NAME_BYTES
            append(
                (
                    bytes(data[start : start + min(header[at + _MSG_LEN], size)]),
                    bytes(names[name_start : name_start + header[at + _NAMELEN]]),
                    None,
                    None,
                )
            )
            # The kernel wrote the sender's address length over the buffer size.
            header[at + _NAMELEN] = _NAME_BYTES
        return received

    def send(self, answers: list[tuple[bytes, bytes]]) -> int:
        """Send (answer, raw sockaddr) pairs; returns how many left. Never blocks
        on the socket; safe to call from any thread."""
        with self._sending:
            return self._send(answers)

    def _send(self, answers: list[tuple[bytes, bytes]]) -> int:
        slots = self._out
        header, data, names, iovec = (
            slots.header_u32,
            slots.data_view,
            slots.name_view,
            slots.iovec_u64,
        )
        size, per, sent = slots.slot_bytes, _U32_PER_HEADER, 0
        for first in range(0, len(answers), slots.count):
            filled = 0
            for answer, raw in answers[first : first + slots.count]:
                if len(answer) > size or len(raw) > _NAME_BYTES:
                    # Beyond the protocol's limits; cannot come from the codec.
                    self.send_failures += 1
                    continue
                start = filled * size
                data[start : start + len(answer)] = answer
                iovec[filled * 2 + 1] = len(answer)
                name_start = filled * _NAME_BYTES
                names[name_start : name_start + len(raw)] = raw
                header[filled * per + _NAMELEN] = len(raw)
                filled += 1
            done = 0
            while done < filled:
                count = self._sendmmsg(
                    self.fd, slots.address + done * _MMSGHDR.size, filled - done, _MSG_DONTWAIT
                )
                if count <= 0:
                    code = ctypes.get_errno()
                    if code == errno.EINTR:
                        continue
                    # The message at `done` failed (its sender gone, or the buffer
                    # full): skip it; the switch retries and is answered again.
                    self.last_error = OSError(code, f"sendmmsg: {errno.errorcode.get(code, code)}")
                    self.send_failures += 1
                    done += 1
                    continue
                done += count
                sent += count
        return sent
