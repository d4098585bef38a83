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
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from engine.apps.health import Health, OperatorEndpoint, ReportClock
from engine.apps.lakewriter import LakeWriterProcess, check_rules
from engine.apps.settings import Settings
from engine.core.addresses import parse_hostport
from engine.core.runtime import tune_gc_for_receiver
from engine.ingest.codec import Codec, build_codec
from engine.ingest.intake import Intake, SeenReports
from engine.ingest.receiver import AllowList, ReportServer
from engine.ingest.stats import Stats
from engine.ingest.store import EventStore

log = logging.getLogger(__name__)

# Keys brought back from the store at start-up, remembered in runs of this many.
_RECOVERED_RUN = 10_000


def settings_codec(settings: Settings) -> Codec:
    return build_codec(settings.codec.name, settings.codec.separator, settings.codec.encodings)


def open_store(
    settings: Settings,
    codec: Codec,
    *,
    unkeyed_quota: bool = True,
    live: bool = True,
    refresh_keys: Callable[[], None] | None = None,
) -> tuple[EventStore, Intake, Stats]:
    """The store and an intake primed from it (next seq, keys within the dedup horizon).
    `live`: for the receiver, whose answers wait for each commit's fsync.
    `refresh_keys`: see EventStore.open."""
    store_settings = settings.store
    store = EventStore(
        store_settings.data_dir,
        codec,
        fsync=store_settings.fsync,
        dedup_horizon_s=store_settings.dedup_horizon_s,
        preallocate=live and store_settings.preallocate_journal,
    )
    recovery = store.open(refresh_keys)
    stats = Stats()
    seen = SeenReports(store_settings.dedup_horizon_s)
    # In runs, each remembered until event time is past the latest of its run: one
    # entry per run rather than per key (recovery can bring back millions).
    recent = recovery.recent_keys
    for start in range(0, len(recent), _RECOVERED_RUN):
        run = recent[start : start + _RECOVERED_RUN]
        seen.add_batch([(call_id, serial) for call_id, serial, _ in run], max(t for *_, t in run))
    intake = Intake(
        stats,
        seen,
        next_seq=recovery.next_seq,
        max_pending=store_settings.max_pending_reports,
        unkeyed_per_minute=(
            store_settings.quarantine_unkeyed_per_minute if unkeyed_quota else None
        ),
    )
    return store, intake, stats


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
        if settings.detection.enabled:
            # Refuse to start on invalid rules (file:line for each problem); the
            # lake writer loads them again in its own process.
            check_rules(settings.detection.rules_dir)
        self.codec = settings_codec(settings)
        self.writer = LakeWriterProcess(settings)
        try:
            # A key file that cannot be trusted is rebuilt by the lake writer, started
            # early for it.
            self.store, self.intake, self.stats = open_store(
                settings, self.codec, refresh_keys=self.writer.wait_for_keys
            )
        except BaseException:
            self.writer.stop()
            raise
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
        self.health = Health(settings, self.stats, self.writer, self.clock)
        self.housekeeping = Housekeeping(self.store, self.stats, self.writer, settings, self.clock)
        self.operator: OperatorEndpoint | None = None

    async def start(self) -> None:
        try:
            if not self.writer.started:
                self.writer.start()
            await self.server.start()
            if self.settings.metrics.listen:
                host, port = parse_hostport(self.settings.metrics.listen)
                self.operator = OperatorEndpoint(host, port, self.health)
                shown = "http://{}:{}".format(*self.operator.address)
                log.info("metrics on %s/metrics, health on %s/healthz and /readyz", shown, shown)
            self.housekeeping.start()
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
        log.info("analysts: duckdb -readonly %s", data_dir / "callsentry.duckdb")
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
