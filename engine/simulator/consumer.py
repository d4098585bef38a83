"""A stand-in for an existing consumer of the switch's reports (billing, a CRM, an IVR
callback application): it answers each report `call_id,serial` as such a consumer
must, and keeps what it received, so an operator (and the tests) can check a relay
set-up: `callsentry simulate --consume --port P`.

What it tells: reports received, distinct (call_id, serial), duplicates (the
relay, like the switch, sends again what it thinks unanswered), and per call the
serials missing between the lowest and highest received (gaps) and those that came
after a higher one (out of order). `drop` leaves that share of datagrams unread and
unanswered, as a lossy network or a busy consumer would.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.events import CallEvent
from engine.core.text import shown
from engine.ingest.codec import Vos3000TextCodec


@dataclass
class Received:
    datagrams: int = 0
    dropped: int = 0
    malformed: int = 0
    # (call_id, serial) -> copies received (and answered)
    copies: Counter[tuple[str, int]] = field(default_factory=Counter)
    # call_id -> serials in the order they came (first copies only)
    serials: dict[str, list[int]] = field(default_factory=dict)

    @property
    def reports(self) -> int:
        return len(self.copies)

    @property
    def duplicates(self) -> int:
        return sum(self.copies.values()) - len(self.copies)

    def gaps(self) -> dict[str, list[int]]:
        """Per call, serials missing between the lowest and the highest received."""
        missing: dict[str, list[int]] = {}
        for call_id, serials in self.serials.items():
            have = set(serials)
            lacking = [n for n in range(min(have), max(have)) if n not in have]
            if lacking:
                missing[call_id] = lacking
        return missing

    def out_of_order(self) -> int:
        """First copies that came after a higher serial of the same call."""
        late = 0
        for serials in self.serials.values():
            highest = -1
            for serial in serials:
                if serial < highest:
                    late += 1
                highest = max(highest, serial)
        return late

    def lines(self) -> list[str]:
        gaps = self.gaps()
        lines = [
            f"datagrams received  {self.datagrams} ({self.dropped} dropped on purpose, "
            f"{self.malformed} not a report)",
            f"reports             {self.reports} distinct (call_id, serial) in "
            f"{len(self.serials)} calls",
            f"duplicates          {self.duplicates}",
            f"out of order        {self.out_of_order()}",
            f"calls with gaps     {len(gaps)}",
        ]
        for call_id, lacking in list(gaps.items())[:10]:
            shown_serials = ", ".join(map(str, lacking[:10]))
            lines.append(f"  {shown(call_id)}: serials {shown_serials} missing")
        return lines


class ConsumerStandIn:
    """Answers reports on (host, port) from a thread of its own until `stop()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        separator: str = ",",
        encodings: tuple[str, ...] = ("utf-8", "gbk"),
        drop: float = 0.0,
        seed: int | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 <= drop < 1:
            raise ValueError(f"drop {drop} is not a share from 0 to below 1")
        self.codec = Vos3000TextCodec(separator=separator, encodings=encodings)
        self.drop = drop
        self.random = random.Random(seed)
        self.echo = echo
        self.received = Received()
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((host, port))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> ConsumerStandIn:
        self._thread = threading.Thread(target=self.serve, name="consumer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.sock.close()

    def received_keys(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.received.copies)

    def serve(self) -> None:
        """Receive and answer until stopped."""
        received = self.received
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                received.datagrams += 1
                if self.drop and self.random.random() < self.drop:
                    received.dropped += 1
                    continue
                decoded = self.codec.decode(data, 0.0, f"{sender[0]}:{sender[1]}")
                event = decoded.item
                if type(event) is not CallEvent:
                    received.malformed += 1
                    if decoded.answer is None:
                        continue
                else:
                    key = (event.call_id, event.serial)
                    first = key not in received.copies
                    received.copies[key] += 1
                    if first:
                        received.serials.setdefault(event.call_id, []).append(event.serial)
                    if self.echo is not None:
                        self.echo(
                            shown(
                                f"{event.call_id} serial {event.serial} {event.state.name} "
                                f"caller {event.caller} callee {event.callee} "
                                f"menu {event.menu_id} {event.menu_name}"
                            )
                            + ("" if first else " (duplicate)")
                        )
            if decoded.answer is not None:
                with contextlib.suppress(OSError):  # refused: the sender sends again
                    self.sock.sendto(decoded.answer, sender)
