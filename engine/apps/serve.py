"""`callsentry serve`: the receiver, the journal, the lake writer process and the
housekeeping jobs, started and stopped in order.

SIGTERM/SIGINT: stop receiving, commit and answer what was accepted, seal the
journal, let the lake writer write it, exit 0.

This is the receiver's process: it never loads DuckDB, polars, pyarrow, River or
SciPy (tests/test_layout.py holds it to that). The rules are checked in a
short-lived process, the lake is the lake writer's, and recovery reads the key file
the lake writer keeps beside the lake.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from apscheduler.schedulers.background import BackgroundScheduler

from engine.alerts.actionbook import DESTINATIONS as ACTION_DESTINATIONS
from engine.alerts.actionbook import ActionBook
from engine.alerts.actions import action_destinations
from engine.alerts.actionspec import actions_dir
from engine.alerts.couriers import Dispatch, RetryPolicy
from engine.alerts.outbox import Outbox, OutboxError, outbox_path
from engine.apps.build import build_info, uncompiled_parts
from engine.apps.delivery import outbox_destinations
from engine.apps.detectors import check_rules
from engine.apps.health import Health, OperatorEndpoint, ReportClock
from engine.apps.lakewriter import LakeWriterProcess
from engine.apps.relay import RelayProcess, drop_held
from engine.apps.settings import Settings
from engine.apps.stores import open_store, settings_codec
from engine.core.addresses import parse_hostport
from engine.core.runtime import tune_gc_for_receiver
from engine.ingest.native import HELPERS
from engine.ingest.receiver import AllowList, ReportServer
from engine.ingest.stats import Stats
from engine.ingest.store import EventStore
from engine.lake.views import analysts_command

log = logging.getLogger(__name__)


# Keys brought back from the store at start-up, remembered in runs of this many.
def log_compiled_parts() -> None:
    """Say at start whether this install runs its compiled parts, and if not, which run
    as Python (a production install built without a C compiler or mypyc still runs)."""
    missing = uncompiled_parts()
    if not missing:
        log.info("compiled parts in use: detection (mypyc), C helpers %s", ", ".join(HELPERS))
        return
    log.warning("running without compiled parts: %s", "; ".join(missing))


def open_deliveries(settings: Settings) -> Dispatch | None:
    """The couriers of the outbox's destinations (None when there are none and no
    outbox file to report on): the webhook when set, and the actions' when the rule
    folder has actions (or the outbox still holds some)."""
    destinations = outbox_destinations(settings)
    path = outbox_path(settings.store.data_dir)
    acting = settings.detection.enabled and actions_dir(settings.detection.rules_folder).is_dir()
    if not destinations and not acting and not path.exists():
        return None
    outbox = Outbox(path)
    book = ActionBook(outbox)
    if acting or any(name in ACTION_DESTINATIONS.values() for name in outbox.counts()):
        destinations = [*destinations, *action_destinations(book)]
    policy = RetryPolicy(
        give_up_after_s=settings.outbox.give_up_after_s,
        max_backoff_s=settings.outbox.max_backoff_s,
        keep_s=settings.outbox.keep_days * 86_400,
    )
    # NATS deliveries are published by the relay's process (engine.relay.nats).
    elsewhere = ["nats"] if settings.relay.nats.enabled else []
    return Dispatch(outbox, destinations, policy, elsewhere=elsewhere)


def queue_undos(book: ActionBook) -> None:
    try:
        book.queue_due_undos()
    except OutboxError as error:
        log.error("cannot queue the undo of actions due (%s); retrying", error)


class Housekeeping:
    """Wall-clock jobs only (sealing the journal, watching the lake writer, stats).
    Never detection timers: those run on event time."""

    def __init__(
        self,
        store: EventStore,
        stats: Stats,
        writer: LakeWriterProcess,
        settings: Settings,
        clock: ReportClock,
        relay: RelayProcess | None = None,
    ) -> None:
        self.store = store
        self.stats = stats
        self.writer = writer
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        self.scheduler.add_job(
            self.seal, "interval", seconds=settings.store.flush_interval_s, id="seal"
        )
        self.scheduler.add_job(self.writer.check, "interval", seconds=2.0, id="lake-writer")
        if relay is not None:
            self.scheduler.add_job(relay.check, "interval", seconds=2.0, id="relay")
        self.scheduler.add_job(
            self.log_stats, "interval", seconds=settings.metrics.log_interval_s, id="stats"
        )
        # The age of the last report, as /readyz and the metrics give it.
        self.scheduler.add_job(clock.age_s, "interval", seconds=1.0, id="report-clock")
        self._seal_failing = False

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def seal(self) -> None:
        """Hand the journal's current segment to the lake writer (analysts see it next)."""
        try:
            self.store.seal()
        except OSError as error:
            if not self._seal_failing:
                log.error("cannot seal the journal segment (%s); retrying", error)
            self._seal_failing = True
            return
        self._seal_failing = False

    def log_stats(self) -> None:
        log.info("stats: %s", self.stats.line())


class Engine:
    """Everything `serve` runs, started and stopped in order; tests drive it directly."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        log_compiled_parts()
        if settings.detection.enabled:
            # Refuse to start on invalid rules (file:line for each problem); the
            # lake writer loads them again in its own process. A folder that was set
            # and does not exist is such a problem, never a fall back to the shipped.
            folder = settings.detection.rules_folder
            check_rules(folder)
            where = (
                "--rules or detection.rules_dir"
                if settings.detection.rules_dir is not None
                else f"shipped with callsentry {build_info()['version']}; "
                "set detection.rules_dir for your own"
            )
            log.info("rules from %s (%s)", folder.resolve(), where)
        self.codec = settings_codec(settings)
        # Before the lake writer, which enqueues into it: an outbox that cannot be
        # opened stops the start here, in one line (OutboxError).
        self.deliveries = open_deliveries(settings)
        self.writer = LakeWriterProcess(settings)
        self.relay = RelayProcess(settings) if settings.relay.enabled else None
        try:
            # A key file that cannot be trusted is rebuilt by the lake writer, started
            # early for it.
            self.store, self.intake, self.stats = open_store(
                settings,
                self.codec,
                refresh_keys=self.writer.wait_for_keys,
                on_durable=self.relay.on_durable if self.relay is not None else None,
            )
        except BaseException:
            self.writer.stop()
            if self.deliveries is not None:
                self.deliveries.outbox.close()
            raise
        if self.relay is None:
            drop_held(settings.store.data_dir)
        self.allow = AllowList(settings.receiver.allow)
        self.server = ReportServer(
            codec=self.codec,
            store=self.store,
            intake=self.intake,
            stats=self.stats,
            allow=self.allow,
            listen=settings.receiver.listen,
            commit_max_reports=settings.store.commit_max_reports,
            commit_max_delay_ms=settings.store.commit_max_delay_ms,
            socket_buffer_bytes=settings.receiver.socket_buffer_bytes,
            batched_io=settings.receiver.batched_io,
            tick_s=settings.detection.tick_s,
            max_lake_backlog=settings.store.max_lake_backlog,
        )
        self.stats.lake = self.writer.counters
        self.clock = ReportClock(self.stats)
        self.health = Health(
            settings,
            self.stats,
            self.writer,
            self.clock,
            self.relay,
            deliveries=self.deliveries,
        )
        self.housekeeping = Housekeeping(
            self.store, self.stats, self.writer, settings, self.clock, self.relay
        )
        self.operator: OperatorEndpoint | None = None

    async def start(self) -> None:
        try:
            if not self.writer.started:
                self.writer.start()
            if self.relay is not None:
                # Before the first answer: a new target starts at the durable end now.
                self.relay.start()
            await self.server.start()
            if self.settings.metrics.listen:
                host, port = parse_hostport(self.settings.metrics.listen)
                self.operator = OperatorEndpoint(host, port, self.health)
                shown = "http://{}:{}".format(*self.operator.address)
                log.info("metrics on %s/metrics, health on %s/healthz and /readyz", shown, shown)
            if self.deliveries is not None and any(
                name in ACTION_DESTINATIONS.values() for name in self.deliveries.destinations
            ):
                # Actions whose time has come are undone (a block expires): wall clock.
                self.housekeeping.scheduler.add_job(
                    queue_undos, "interval", args=[ActionBook(self.deliveries.outbox)],
                    seconds=1.0, id="action-undos",
                )  # fmt: skip
            self.housekeeping.start()
            if self.deliveries is not None:
                self.deliveries.start()
            if not (self.settings.store.data_dir / "callsentry.duckdb").exists():
                # A new data dir: analysts can connect once serve says it is serving.
                await asyncio.get_running_loop().run_in_executor(None, self.writer.wait_for_views)
        except BaseException:
            await self.stop()
            raise
        listening = ", ".join(f"udp {h}:{p}" for h, p in self.server.addresses)
        data_dir = self.settings.store.data_dir
        log.info(
            "callsentry serving on %s; accepting reports from %s; data in %s",
            listening,
            self.allow.describe(),
            data_dir,
        )
        log.info("analysts: %s", analysts_command(data_dir))
        receiver = self.settings.receiver
        if receiver.switches:
            log.info(
                "switches: %s",
                "; ".join(f"{name} = {', '.join(n)}" for name, n in receiver.switches.items()),
            )
        refused = receiver.checks_refused()
        if refused:
            log.warning(
                "receiver.check_senders %s not within receiver.allow: deployment checks "
                "from there are dropped like everything else from there",
                ", ".join(refused),
            )

    async def stop(self) -> None:
        """Stop receiving, answer what was accepted, seal, let the lake writer finish."""
        try:
            await self.server.stop()
        finally:
            self.housekeeping.stop()
            if self.operator is not None:
                self.operator.stop()
                self.operator = None
            self.store.close()
            self.writer.stop()
            if self.deliveries is not None:
                # After the lake writer: its last drain may have enqueued more. What
                # is not delivered by now waits in the outbox for the next start.
                self.deliveries.stop()
            if self.relay is not None:
                self.relay.stop()
        log.info("stopped: %s", self.stats.line())


async def serve(settings: Settings) -> int:
    engine = Engine(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before the start: answers may leave before it returns (it can wait for the lake
    # writer), and a SIGTERM from then on must stop the engine in order.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, engine.writer.reload_rules)
    await engine.start()
    tune_gc_for_receiver()
    try:
        await stop.wait()
        log.info("stopping: answering what was accepted, then writing the lake")
    finally:
        await engine.stop()
    return 0
