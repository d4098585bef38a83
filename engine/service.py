"""`callsentry serve`: the receiver, the store and the housekeeping jobs, started and
stopped in order (SIGTERM/SIGINT: stop receiving, commit, answer, flush, exit 0)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import start_http_server

from engine.codec import build_codec
from engine.config import Settings, parse_hostport
from engine.ingest import Intake, SeenReports
from engine.receiver import AllowList, BatchListener, ReportServer
from engine.stats import Stats, registry_for
from engine.store import EventStore

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> tuple[EventStore, Intake, Stats]:
    """The store and an intake primed from it (next seq, keys within the dedup horizon)."""
    store_settings = settings.store
    store = EventStore(
        store_settings.data_dir,
        fsync=store_settings.fsync,
        dedup_horizon_s=store_settings.dedup_horizon_s,
        compact_target_bytes=store_settings.compact_target_bytes,
    )
    recovery = store.open()
    stats = Stats()
    seen = SeenReports(store_settings.dedup_horizon_s)
    for call_id, serial, ts in recovery.recent_keys:
        seen.add((call_id, serial), ts)
    intake = Intake(
        stats,
        seen,
        next_seq=recovery.next_seq,
        max_pending=store_settings.max_pending_reports,
        unkeyed_per_minute=store_settings.quarantine_unkeyed_per_minute,
    )
    return store, intake, stats


class Housekeeping:
    """Wall-clock jobs only (flush, compaction, stats). Never detection timers."""

    def __init__(self, store: EventStore, stats: Stats, settings: Settings) -> None:
        self.store = store
        self.stats = stats
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        self.scheduler.add_job(
            self.flush, "interval", seconds=settings.store.flush_interval_s, id="flush"
        )
        self.scheduler.add_job(
            self.compact, "interval", seconds=settings.store.compact_interval_s, id="compact"
        )
        self.scheduler.add_job(
            self.log_stats, "interval", seconds=settings.metrics.log_interval_s, id="stats"
        )
        self._flush_failing = False

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def flush(self) -> None:
        try:
            self.stats.flushed += self.store.flush()
        except OSError as error:
            self.stats.flush_failures += 1
            if not self._flush_failing:
                log.error("lake flush failed (%s); the journal keeps the reports, retrying", error)
            self._flush_failing = True
            return
        if self._flush_failing:
            log.warning("lake flush works again")
            self._flush_failing = False

    def compact(self) -> None:
        try:
            result = self.store.compact()
        except OSError as error:
            log.error("compaction failed (%s); will try again", error)
            return
        if result.written_files:
            log.info(
                "compacted %d segments into %d files", result.merged_files, result.written_files
            )

    def log_stats(self) -> None:
        log.info("stats: %s", self.stats.line())


class Engine:
    """Everything `serve` runs, started and stopped in order; tests drive it directly."""

    def __init__(self, settings: Settings, on_durable: BatchListener | None = None) -> None:
        self.settings = settings
        self.store, self.intake, self.stats = open_store(settings)
        self.codec = build_codec(
            settings.codec.name, settings.codec.separator, settings.codec.encodings
        )
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
            on_durable=on_durable,
        )
        self.housekeeping = Housekeeping(self.store, self.stats, settings)
        self._metrics_server: Any = None

    async def start(self) -> None:
        try:
            await self.server.start()
            if self.settings.metrics.listen:
                host, port = parse_hostport(self.settings.metrics.listen)
                self._metrics_server, _ = start_http_server(
                    port, addr=host, registry=registry_for(self.stats)
                )
                log.info("metrics on http://%s:%d/metrics", host, port)
            self.housekeeping.start()
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

    async def stop(self) -> None:
        """Stop receiving, answer what was accepted, flush the lake, release the data dir."""
        try:
            await self.server.stop()
        finally:
            self.housekeeping.stop()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server = None
            self.store.close()
        log.info("stopped: %s", self.stats.line())


async def serve(settings: Settings, on_durable: BatchListener | None = None) -> int:
    engine = Engine(settings, on_durable)
    await engine.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("stopping: answering what was accepted, then flushing")
    finally:
        await engine.stop()
    return 0
