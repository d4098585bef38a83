"""The couriers: they deliver what the outbox (engine.alerts.outbox) holds, one courier
per destination (a webhook, a notification channel, one kind of action), each from a
thread of its own.

Guarantees:
- At least once: a delivery is marked delivered only after the endpoint said so; a
  crash in between sends it again. The key travels with it (a webhook's
  `Idempotency-Key` header) so the receiver can drop the second copy.
- One courier per destination: a dead endpoint delays only its own deliveries.
  While it fails, the courier pauses the whole destination (back-off doubling up to
  `max_backoff_s`) instead of retrying each delivery in turn, so once the endpoint
  is back everything waiting goes out oldest first within one pause.
- What is still undelivered `give_up_after_s` after it was enqueued is given up:
  counted, logged once per batch, and listed (`callsentry alerts deliveries`).

The couriers run in `serve`'s main process and notice another process's enqueue
within `poll_s`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.alerts.outbox import Delivery, DestinationCounts, Outbox, OutboxError
from engine.core.text import shown

log = logging.getLogger(__name__)


# -- destinations ---------------------------------------------------------------------


class DeliveryError(Exception):
    """An attempt failed. `refused`: the endpoint answered and refused this delivery
    (others may still go through); otherwise the endpoint is unreachable or failing.
    `final`: no attempt at this delivery can succeed (it is no alert or action, or the
    action's request cannot be made from its alert): given up at once, not tried again
    for a day."""

    def __init__(self, message: str, *, refused: bool = False, final: bool = False) -> None:
        super().__init__(message)
        self.refused = refused or final
        self.final = final


class Destination(Protocol):
    """Where deliveries go: the webhook, a notification channel, an action (an HTTP
    call to the switch's API, a command, a block)."""

    name: str

    def send(self, key: str, payload: bytes) -> None:
        """Deliver `payload` (raise DeliveryError when not delivered)."""
        ...


# -- couriers -------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    give_up_after_s: float = 86_400.0
    first_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    # How soon a delivery enqueued by another process is noticed.
    poll_s: float = 0.25
    # Delivered and given-up rows are kept this long (listing, and de-duplication of
    # a repeated enqueue), then dropped; their counts stay.
    keep_s: float = 7 * 86_400.0

    def backoff(self, failures: int) -> float:
        return float(min(self.first_backoff_s * 2 ** max(0, failures - 1), self.max_backoff_s))


# Deliveries a courier reads per pass.
_BATCH = 100
# How often a courier drops its destination's rows past RetryPolicy.keep_s.
_FORGET_EVERY_S = 3600.0


class Courier:
    """Delivers one destination's deliveries, oldest first, from a thread of its own."""

    def __init__(
        self,
        outbox: Outbox,
        destination: Destination,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.destination = destination
        self.policy = policy
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The endpoint's run of failures (0: working) and when to try it again.
        self.failures = 0
        self._resume_at = 0.0
        self._failing_since: float | None = None
        self._last_error = ""
        self._forget_at = 0.0

    @property
    def name(self) -> str:
        return self.destination.name

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"courier-{self.name}", daemon=True)
        self._thread.start()

    def ask_to_stop(self) -> None:
        """Stop after the attempt in progress (if any) ends."""
        self._stop.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.work()
            except OutboxError as error:
                log.error("%s: %s; trying again", self.name, error)
                wait = self.policy.max_backoff_s
            except Exception:  # a bug must not end deliveries for good
                log.exception("%s: courier failed; trying again", self.name)
                wait = self.policy.max_backoff_s
            self._stop.wait(wait)

    def work(self) -> float:
        """One pass: give up on what is past the horizon, then send what is due until the
        endpoint fails. Returns how long to wait before the next pass."""
        now = self.clock()
        if now >= self._forget_at:
            self.outbox.forget_done_before(now - self.policy.keep_s, self.name)
            self._forget_at = now + _FORGET_EVERY_S
        self._give_up(now)
        if now < self._resume_at:
            return min(self._resume_at - now, self.policy.poll_s)
        batch = self.outbox.due(self.name, now, _BATCH)
        for delivery in batch:
            if self._stop.is_set():
                return 0.0
            try:
                self.destination.send(delivery.key, delivery.payload)
            except DeliveryError as error:
                if error.final:
                    self._give_up_one(delivery, str(error))
                    continue
                if error.refused:
                    retry_at = self.clock() + self.policy.backoff(delivery.attempts + 1)
                    self.outbox.mark_failed(delivery, str(error), retry_at)
                    log.warning(
                        "%s refused delivery %s: %s; trying it again later",
                        self.name,
                        shown(delivery.key),
                        error,
                    )
                    continue
                self.outbox.mark_failed(delivery, str(error))
                self._endpoint_failed(str(error))
                return min(self._resume_at - self.clock(), self.policy.poll_s)
            self.outbox.mark_delivered(delivery)
            self._endpoint_works()
        # A full batch: more may be due at once.
        return 0.0 if len(batch) == _BATCH else self.policy.poll_s

    def _endpoint_failed(self, error: str) -> None:
        now = self.clock()
        self.failures += 1
        self._last_error = error
        self._resume_at = now + self.policy.backoff(self.failures)
        if self._failing_since is None:
            self._failing_since = now
            waiting = self.outbox.counts().get(self.name, DestinationCounts()).pending
            log.error(
                "%s is failing (%s); %d deliveries wait in the outbox, tried again with "
                "back-off up to %g s, given up after %g s",
                self.name,
                error,
                waiting,
                self.policy.max_backoff_s,
                self.policy.give_up_after_s,
            )

    def _endpoint_works(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "%s works again after %.0f s of failures; sending what waited",
                self.name,
                self.clock() - self._failing_since,
            )
        self._failing_since = None
        self.failures = 0
        self._resume_at = 0.0

    def _give_up_one(self, delivery: Delivery, error: str) -> None:
        given = self.outbox.give_up_now(delivery, error)
        if given is None:
            return
        log.error(
            "%s cannot deliver %s: %s; given up (`callsentry alerts deliveries` lists it)",
            self.name,
            shown(delivery.key),
            error,
        )
        told = getattr(self.destination, "given_up", None)
        if callable(told):
            told([given])

    def _give_up(self, now: float) -> None:
        untried = f"not tried: the endpoint was failing ({self._last_error})"
        given = self.outbox.give_up_older_than(
            self.name, now - self.policy.give_up_after_s, untried if self._last_error else ""
        )
        if given:
            # An error one of them met (one never tried may have none of its own).
            errors = [d.last_error for d in given if d.last_error]
            log.error(
                "%s: gave up on %d deliveries after %g s (last error: %s); "
                "`callsentry alerts deliveries` lists them",
                self.name,
                len(given),
                self.policy.give_up_after_s,
                errors[-1] if errors else self._last_error or "never tried",
            )
            # A destination that keeps state of its own about each delivery (actions)
            # is told, so that state does not wait for a delivery that will never come.
            told = getattr(self.destination, "given_up", None)
            if callable(told):
                told(given)


class Dispatch:
    """The couriers of every destination, started and stopped together."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
        elsewhere: Sequence[str] = (),
    ) -> None:
        """`elsewhere`: destinations another process delivers (NATS: the relay's)."""
        self.outbox = outbox
        self.policy = policy
        self.couriers = [Courier(outbox, d, policy, clock=clock) for d in destinations]
        self.clock = clock
        self.elsewhere = list(elsewhere)

    @property
    def destinations(self) -> list[str]:
        return [courier.name for courier in self.couriers]

    def start(self) -> None:
        known = {*self.destinations, *self.elsewhere}
        for name, counts in self.outbox.counts().items():
            if counts.pending and name not in known:
                log.warning(
                    "outbox: %d deliveries wait for %s, which is not configured; they stay",
                    counts.pending,
                    name,
                )
        for courier in self.couriers:
            courier.start()

    def stop(self) -> None:
        for courier in self.couriers:
            courier.ask_to_stop()
        for courier in self.couriers:
            courier.stop()
        with contextlib.suppress(OutboxError):
            for name, counts in self.outbox.counts().items():
                if counts.pending and name not in self.elsewhere:
                    log.warning(
                        "outbox: %d deliveries to %s wait for the next start", counts.pending, name
                    )
