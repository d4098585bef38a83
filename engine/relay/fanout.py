"""The relay's loop: every UDP target (and NATS, engine.relay.nats) fed from the
journal, cursors saved, held segments released or, past the bounds, given up.

One thread does it all (the relay process's main thread): wait on the targets'
sockets for answers (or 20 ms), take them, read what became durable, send, retry,
save the state now and then. The work per report is a send, a receive and a dict
lookup per target, which one thread does far faster than the switch reports.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from engine.relay.feed import (
    Durable,
    DurableMark,
    FrameCache,
    HeldSegments,
    JournalReader,
    Position,
    Relayable,
    relay_all,
    segment_numbers,
)
from engine.relay.state import (
    RelayState,
    RelayStateError,
    SavedTarget,
    load_state,
    save_state,
    state_path,
)
from engine.relay.udp import UdpTarget, UdpTargetSpec

if TYPE_CHECKING:
    from engine.relay.nats import NatsSpec, NatsTarget, PendingMessages

# A target of the loop: a UDP consumer or NATS.
Target = Union["UdpTarget", "NatsTarget"]

log = logging.getLogger(__name__)

# How long the loop waits for an answer before it looks for new reports.
POLL_S = 0.02


@dataclass(frozen=True)
class RelayBounds:
    # A held segment older than this, or the oldest while all are over `max_held_bytes`,
    # goes: what a target still lacked from it is given up.
    horizon_s: float = 86_400.0
    max_held_bytes: int = 4 << 30
    save_interval_s: float = 0.5
    trim_interval_s: float = 5.0


class UdpRelay:
    """Targets, their cursors and the held segments of one data dir."""

    def __init__(
        self,
        data_dir: Path,
        mark: DurableMark,
        specs: Sequence[UdpTargetSpec],
        *,
        bounds: RelayBounds = RelayBounds(),
        relayable: Relayable = relay_all,
        source_separator: str = ",",
        source_encoding: str = "utf-8",
        publish: Callable[[list[Target]], None] | None = None,
        new_from: Durable | None = None,
        clock: Callable[[], float] = time.monotonic,
        nats: NatsSpec | None = None,
        outbox: PendingMessages | None = None,
    ) -> None:
        """`new_from`: where a target with no saved cursor begins (default: the durable
        end now). `nats`: publication to NATS JetStream too (its calls, alerts and
        reviews from `outbox`)."""
        self.data_dir = data_dir
        self.mark = mark
        self.bounds = bounds
        self.held = HeldSegments(data_dir)
        self.path = state_path(data_dir)
        self.publish = publish
        cache = FrameCache()
        self._state_damaged = False
        saved = self._load()
        start = new_from or mark.get()
        self.targets: list[Target] = []
        named: list[tuple[UdpTargetSpec | NatsSpec, str]] = [(s, s.address) for s in specs]
        if nats is not None:
            named.append((nats, nats.address))
        for spec, address in named:
            known = saved.targets.get(spec.name) if saved is not None else None
            if known is None:
                if saved is None and self._state_damaged:
                    # Unknown where it was: from the oldest segment on disk, sent again
                    # rather than lost.
                    first = min(segment_numbers(data_dir), default=start.segment)
                    position, cursor = Position(first, 0), 0
                else:
                    # A new target starts with the next report stored.
                    position, cursor = Position(start.segment, start.offset), start.head
                    log.info(
                        "relay target %s (%s) is new: it gets reports from seq %d on",
                        spec.name,
                        address,
                        cursor + 1,
                    )
                known = SavedTarget(address, cursor, position)
            reader = JournalReader(
                data_dir, mark, known.position, known.cursor, relayable=relayable, cache=cache
            )
            if isinstance(spec, UdpTargetSpec):
                self.targets.append(
                    UdpTarget(
                        spec,
                        reader,
                        counters=known.counters,
                        source_separator=source_separator,
                        source_encoding=source_encoding,
                        clock=clock,
                    )
                )
            else:
                from engine.relay.nats import NatsTarget

                self.targets.append(
                    NatsTarget(
                        spec,
                        reader,
                        outbox=outbox,
                        horizon_s=bounds.horizon_s,
                        counters=known.counters,
                    )
                )
        # Answers are waited for on the UDP targets' sockets (NATS acks are taken each pass).
        self.sockets = [t for t in self.targets if isinstance(t, UdpTarget)]
        self._saved_at = 0.0
        self._trimmed_at = 0.0

    def _load(self) -> RelayState | None:
        try:
            return load_state(self.path)
        except RelayStateError as error:
            log.error("%s; every target starts from the oldest journal segment kept", error)
            self._state_damaged = True
            return None

    def close(self) -> None:
        for target in self.targets:
            target.close()

    def state(self) -> RelayState:
        held = self.held.segments()
        return RelayState(
            targets={
                t.spec.name: SavedTarget(t.spec.address, t.cursor, t.resume_at, t.counters)
                for t in self.targets
            },
            saved_at=time.time(),
            held_segments=len(held),
            held_bytes=sum(size for _, _, size, _ in held),
        )

    def save(self, *, durable: bool = False) -> bool:
        """Write the cursors and counters; False (logged) when the disk refused."""
        try:
            save_state(self.path, self.state(), durable=durable)
        except OSError as error:
            log.error("cannot save the relay's cursors (%s); retrying", error)
            return False
        return True

    def pass_once(self, wait_s: float = POLL_S) -> None:
        """One turn of the loop: answers, new reports, copies due; the state and the
        held segments when their time has come."""
        targets = self.targets
        if wait_s > 0:
            # Woken by an answer, or after `wait_s` to look for new reports.
            if self.sockets:
                select.select(self.sockets, [], [], wait_s)
            else:
                time.sleep(wait_s)
        for target in targets:
            target.receive()
        for target in targets:
            target.step()
        now = time.monotonic()
        if now - self._trimmed_at >= self.bounds.trim_interval_s:
            self._trimmed_at = now
            self.trim()
        if now - self._saved_at >= self.bounds.save_interval_s:
            self._saved_at = now
            self.save()
            if self.publish is not None:
                self.publish(targets)

    def run(self, stopping: Callable[[], bool]) -> None:
        try:
            while not stopping():
                self.pass_once()
            for target in self.targets:
                if not isinstance(target, UdpTarget):
                    # NATS acknowledges within milliseconds: what is stored goes now.
                    target.finish()
        finally:
            self.save(durable=True)
            if self.publish is not None:
                self.publish(self.targets)
            self.close()

    def trim(self) -> None:
        """Release held segments every target is past; give up those past the bounds."""
        passed = min((t.resume_at.segment for t in self.targets), default=None)
        # The cursors that let held segments go are durable before they go.
        if passed is not None and self.held.segments_before(passed) and self.save(durable=True):
            self.held.release_before(passed)
        bounds = self.bounds
        for segment in self.held.over_bounds(time.time(), bounds.horizon_s, bounds.max_held_bytes):
            for target in self.targets:
                if target.resume_at.segment <= segment:
                    gone = target.give_up_through(segment)
                    log.error(
                        "relay target %s (%s): journal segment %d is past relay.horizon_s "
                        "or relay.max_held_bytes; %d reports it never answered are given up",
                        target.spec.name,
                        target.spec.address,
                        segment,
                        gone,
                    )
            self.held.drop(segment)
