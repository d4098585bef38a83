"""The relay process: every stored live report passed on to `[[relay.udp]]` targets,
and published with calls, alerts and reviews to NATS JetStream (`[relay.nats]`).

Why a process of its own, not a thread of the receiver: the receiver's answers
wait only for the journal's fsync, and a thread of the same interpreter would take
the GIL from them for every datagram sent, received and matched for every target
(three targets triple that). In a process of its own, at idle priority by default
(`relay.priority`), relaying uses the CPU the receiver leaves, and a slow or dead
target can delay nothing but itself. It reads what the receiver stored from the
journal files, up to the durable end the receiver publishes in shared memory after
each fsync (engine.relay.feed), and keeps its cursors in DATA_DIR/relay/state.json.

Only `serve` starts it: `replay` and `backtest` never relay or publish (a month's
replay must not reach billing): they start no relay process, their lake writer has no
outbox sink, and `alerts review` enqueues a verdict for NATS only when [relay.nats]
is on. Check traffic (operations' reserved call-id prefix from allowed
check senders) is not relayed either: `relayable_reports` says which reports are such,
by the rule the lake writer keeps them out of `events` with (engine.ingest.senders).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.apps.flags import FlagReader, ProcessFlag
from engine.apps.lakewriter import lower_priority
from engine.apps.settings import RelaySettings, Settings
from engine.core.addresses import parse_hostport
from engine.core.events import CallEvent
from engine.core.text import shown
from engine.ingest.senders import SenderDirectory
from engine.ingest.store import DataDirLock, StoreError
from engine.relay.feed import Durable, DurableMark, HeldSegments, Relayable
from engine.relay.state import RelayState, load_state, state_path
from engine.relay.udp import COUNTERS, UdpTargetSpec

if TYPE_CHECKING:
    from engine.relay.fanout import Target
    from engine.relay.nats import NatsSpec

log = logging.getLogger(__name__)

# The NATS publication's name among the relay's targets (state.json, metrics).
NATS_TARGET = "nats"


def relayable_reports(settings: Settings) -> Relayable:
    """Which reports are relayed: all but check traffic (docs/protocol.md, "Check
    reports"): a report is a check by the same rule, and the same settings, by which
    the lake writer stores it in `checks` rather than `events`; so what the relay
    passes on is exactly what went into `events`."""
    senders = SenderDirectory(settings.receiver.switches, settings.receiver.check_senders)

    def relayable(event: CallEvent) -> bool:
        return not senders.is_check(event.source, event.call_id)

    return relayable


def nats_spec(relay: RelaySettings, environ: Mapping[str, str] | None = None) -> NatsSpec | None:
    """The NATS publication as the settings say (None: off); its credentials read from
    the variable relay.nats.credentials_env names, here and nowhere else."""
    from engine.relay.nats import NatsCredentials, NatsSpec

    nats = relay.nats
    if not nats.enabled:
        return None
    environ = os.environ if environ is None else environ
    secret = environ.get(nats.credentials_env, "") if nats.credentials_env else ""
    return NatsSpec(
        urls=tuple(nats.urls),
        stream=nats.stream,
        subject_prefix=nats.subject_prefix,
        credentials=NatsCredentials.parse(secret),
        duplicate_window_s=relay.nats_duplicate_window_s,
        create_stream=nats.create_stream,
        window=nats.window,
        ack_timeout_s=nats.ack_timeout_s,
    )


def target_names(relay: RelaySettings) -> list[str]:
    """The loop's targets in its order: the UDP ones, then NATS."""
    names = [spec.name for spec in target_specs(relay)]
    if relay.nats.enabled:
        names.append(NATS_TARGET)
    return names


def target_specs(relay: RelaySettings) -> list[UdpTargetSpec]:
    specs = []
    for target in relay.udp:
        host, port = parse_hostport(target.target)
        specs.append(
            UdpTargetSpec(
                name=target.label,
                host=host,
                port=port,
                retries=target.retries,
                retry_interval_s=target.retry_interval_s,
                separator=target.separator,
                encoding=target.encoding,
                window=target.window,
            )
        )
    return specs


def run(
    settings: Settings,
    mark_array: Any,
    counters_array: Any,
    stop: FlagReader,
    log_level: int,
    receiver_pid: int,
    start: Durable,
) -> None:
    """The relay process: relay until told to stop or the receiver is gone. `start`: the
    durable end when the receiver started, where a new target begins."""
    from engine.relay.fanout import RelayBounds, UdpRelay

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority(settings.relay.priority)
    relay_settings = settings.relay
    # One relay per data dir: one left by a receiver that was killed saves and exits
    # within a pass of its loop once it sees that.
    lock = relay_lock(settings.store.data_dir)
    while True:
        try:
            lock.acquire(wait_s=5)
            break
        except StoreError:
            if os.getppid() != receiver_pid:
                return
    nats = nats_spec(relay_settings)
    outbox: Any = None
    if nats is not None:
        from engine.alerts.outbox import Outbox

        outbox = Outbox.of(settings.store.data_dir)
    relay = UdpRelay(
        settings.store.data_dir,
        DurableMark(mark_array),
        target_specs(relay_settings),
        bounds=RelayBounds(
            horizon_s=relay_settings.horizon_s, max_held_bytes=relay_settings.max_held_bytes
        ),
        relayable=relayable_reports(settings),
        source_separator=settings.codec.separator,
        source_encoding=settings.codec.encodings[0],
        publish=lambda targets: publish(counters_array, targets),
        new_from=start,
        nats=nats,
        outbox=outbox,
    )
    names = ", ".join(f"{t.spec.name} ({t.spec.address})" for t in relay.targets)
    log.info("relaying to %s", names)

    def stopping() -> bool:
        if os.getppid() != receiver_pid:
            log.error("the receiver is gone (killed?); the relay stops, its cursors saved")
            return True
        return stop.is_set()

    try:
        relay.run(stopping)
    finally:
        if outbox is not None:
            outbox.close()
        lock.release()


def relay_lock(data_dir: Path) -> DataDirLock:
    (data_dir / "relay").mkdir(parents=True, exist_ok=True)
    return DataDirLock(data_dir / "relay", ".lock")


def publish(array: Any, targets: Sequence[Target]) -> None:
    """The targets' counters, for the receiver's /metrics."""
    width = len(COUNTERS)
    for index, target in enumerate(targets):
        array[index * width : (index + 1) * width] = target.counters.values()


class RelayProcess:
    """Starts, watches and stops the relay process for `serve`."""

    def __init__(self, settings: Settings) -> None:
        self._context = mp.get_context("spawn")
        self.settings = settings
        self.names = target_names(settings.relay)
        self.mark = DurableMark.create(self._context)
        self.counters = self._context.Array(
            "d", max(1, len(self.names)) * len(COUNTERS), lock=False
        )
        self._stop = ProcessFlag(self._context, raised_when_gone=True)
        self._stopping = False
        self._process: Any = None
        self.restarts = 0
        # The durable end when serve started: where a target new to the data dir begins.
        self._start: Durable | None = None

    def on_durable(self, segment: int, size: int, head: int) -> None:
        self.mark.set(segment, size, head)

    def start(self) -> None:
        if self._start is None:
            self._start = self.mark.get()
        if self._stop.handed:
            # A new flag for a restart or after a stop, as the lake writer's: each
            # process is handed its own end.
            self._stop.close()
            self._stop = ProcessFlag(self._context, raised_when_gone=True)
        self._stopping = False
        self._process = self._context.Process(
            target=run,
            args=(
                self.settings,
                self.mark.array,
                self.counters,
                self._stop.reader,
                logging.getLogger().level,
                os.getpid(),
                self._start,
            ),
            name="callsentry-relay",
            daemon=False,
        )
        self._process.start()
        self._stop.handed_over()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def check(self) -> None:
        """Restart the relay if it died; the journal keeps what it has not sent."""
        if self._process is not None and not self._process.is_alive() and not self._stopping:
            log.error("relay exited with code %s; restarting it", self._process.exitcode)
            self.restarts += 1
            self.start()

    def values(self) -> dict[str, dict[str, float]]:
        """Each target's counters as the process last published them."""
        width = len(COUNTERS)
        return {
            name: dict(zip(COUNTERS, self.counters[i * width : (i + 1) * width], strict=True))
            for i, name in enumerate(self.names)
        }

    def stop(self, timeout: float = 30.0) -> None:
        if self._process is None:
            return
        self._stopping = True
        self._stop.set()  # never waits, whether the process is alive or not
        self._process.join(timeout)
        if self._process.is_alive():
            log.error("relay did not stop in %.0f s; its cursors are as last saved", timeout)
            self._process.terminate()
            self._process.join(5)
        self._process = None


def drop_held(data_dir: Path) -> None:
    """Relaying is off: segments held for targets from an earlier run are let go."""
    dropped = HeldSegments(data_dir).clear()
    if dropped:
        log.warning(
            "relaying is off: %d journal segments held for relay targets were deleted", dropped
        )


def status_lines(data_dir: Path, now: float) -> list[str]:
    """`callsentry relay status`: each target's cursor, state, lag and counts, as saved."""
    state: RelayState | None = load_state(state_path(data_dir))
    if state is None:
        return [f"no relay state in {data_dir} (relaying has never run there)"]
    age = now - state.saved_at
    lines = [
        f"relay state saved {age:.1f} s ago; {state.held_segments} journal segments "
        f"({state.held_bytes / 1e6:.1f} MB) held for targets"
    ]
    for name, saved in state.targets.items():
        c = saved.counters
        if name == NATS_TARGET and saved.address.startswith(("nats://", "tls://")):
            lines.append(
                f"NATS JetStream {shown(saved.address)}: "
                f"{'DOWN (unreachable)' if c.down else 'up'}, cursor seq {saved.cursor}, "
                # `sent` counts what the client took, which it holds while the server is
                # out of reach: only `acked` is stored in the stream.
                f"lag {c.lag_reports} reports / {c.lag_seconds:.1f} s; reports handed to "
                f"the client {c.sent}, acked by the stream {c.answered}, retried "
                f"{c.retried}, given up {c.given_up} "
                f"({c.given_up_horizon} past the horizon); calls, alerts and reviews: "
                "`callsentry alerts deliveries --destination nats --state all`"
            )
            continue
        lines.append(
            f"{shown(name)} {shown(saved.address)}: {'DOWN' if c.down else 'up'}, "
            f"cursor seq {saved.cursor}, "
            f"lag {c.lag_reports} reports / {c.lag_seconds:.1f} s; sent {c.sent}, "
            f"answered {c.answered}, retried {c.retried}, given up {c.given_up} "
            f"({c.given_up_horizon} past the horizon), bad answers {c.bad_answers}"
        )
    return lines


def queue_reviews(
    settings: Settings,
    recorded: Sequence[tuple[str, str]],
    status: str,
    note: str,
    reviewer: str,
) -> None:
    """Verdicts just recorded (alert id, review id), queued for NATS (`PREFIX.reviews`)
    in the outbox, which the relay's process of a running `serve` publishes from. Used
    by `alerts review` and by the console; raises OutboxError."""
    from datetime import UTC, datetime

    from engine.alerts.outbox import Outbox
    from engine.relay.nats import outbox_items, review_message
    from engine.relay.subjects import Subjects

    subjects = Subjects(settings.relay.nats.subject_prefix)
    now = datetime.now(tz=UTC).isoformat()
    messages = [
        review_message(
            {
                "review_id": review_id,
                "alert_id": alert_id,
                "status": status,
                "note": note.strip(),
                "reviewer": reviewer,
                "reviewed_at": now,
            },
            subjects,
        )
        for alert_id, review_id in recorded
    ]
    outbox = Outbox.of(settings.store.data_dir)
    try:
        outbox.enqueue_many(outbox_items(messages))
    finally:
        outbox.close()
