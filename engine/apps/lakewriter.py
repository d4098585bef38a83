"""The lake writer process: where its parts are wired together from the settings.

`serve` starts it (LakeWriterProcess) beside the receiver; it loads the rules and
models and builds the detection pipeline (engine.apps.detectors), builds the alert
sinks (engine.apps.delivery), prepares the lake (key file, analysts' views), and drains
sealed journal segments into the lake until told to stop, reloading the rules when
their files change.

The receiver's process imports this module for LakeWriterProcess, and must not load
DuckDB, polars, pyarrow, River or SciPy: everything that does is imported inside the
functions that run in the lake writer's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from engine.alerts.sinks import AlertTally
from engine.apps.actiontrail import TrailCopy
from engine.apps.delivery import NatsOutboxSink, load_action_set, make_durable_sinks, make_sinks
from engine.apps.detectors import load_detectors, make_pipeline
from engine.apps.flags import FlagReader, ProcessFlag
from engine.apps.settings import (
    DetectionSettings,
    Settings,
    time_zone,
)
from engine.core.runtime import tune_gc_for_detection
from engine.core.yamlfile import YamlFileError
from engine.ingest.stats import RULES_INVALID, RULES_LOADING, SharedCounters

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from engine.alerts.actions import ActionSink
    from engine.detect.alerts import AlertSink
    from engine.detect.rules import RuleSet
    from engine.lake.parquet import Lake
    from engine.lake.writer import LakeWriter, Outage

log = logging.getLogger(__name__)

T = TypeVar("T")


class _RuleWatcher:
    """Reloads the rules (and the actions beside them) when their files change, or when
    asked (SIGHUP to serve)."""

    def __init__(
        self,
        writer: LakeWriter,
        detection: DetectionSettings,
        asked: FlagReader,
        actions: ActionSink | None = None,
    ) -> None:
        self.writer = writer
        self.detection = detection
        self.asked = asked
        self.actions = actions
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        folder = self.detection.rules_folder
        files = [
            *folder.glob("*.y*ml"),
            *(folder / "lists").glob("*.y*ml"),
            *(folder / "models").glob("*.y*ml"),
            *(folder / "actions").glob("*.y*ml"),
            *(folder / "exceptions").glob("*.y*ml"),
        ]
        stats = []
        for path in sorted(files):
            try:
                info = path.stat()
            except OSError:
                continue
            stats.append((str(path), info.st_mtime_ns, info.st_size))
        return tuple(stats)

    def check(self) -> None:
        asked = self.asked.is_set()
        fingerprint = self._fingerprint()
        changed = self.detection.reload_interval_s > 0 and fingerprint != self.fingerprint
        if not (asked or changed):
            return
        self.asked.clear()
        self.fingerprint = fingerprint
        detection = self.detection
        loaded: list[RuleSet] = []

        def load() -> RuleSet:
            rules = load_detectors(
                detection.rules_folder,
                detection.max_keys_per_rule,
                models=detection.models_enabled,
                zone=time_zone(detection.timezone),
            ).rules
            loaded.append(rules)
            return rules

        swapped = self.writer.reload_rules(load)
        if self.writer.counters is not None:
            count_rule_load(self.writer.counters, len(loaded[0].rules) if swapped else None)
        if self.actions is not None:
            self._reload_actions(self.actions)

    def _reload_actions(self, sink: ActionSink) -> None:
        """The action files again, swapped in whole only if every one is valid."""
        try:
            actions = load_action_set(self.detection)
        except YamlFileError as error:
            log.error(
                "actions not reloaded, the running actions stay:\n  %s",
                "\n  ".join(error.problems),
            )
            return
        sink.actions = actions
        log.info("actions reloaded: %d (%d enabled)", len(actions.actions), len(actions.enabled))


def count_rule_load(counters: SharedCounters, rules: int | None) -> None:
    """A load of the rule set, for the metrics and /readyz: `rules` running after it, or
    None when it was refused (the set that ran before runs on)."""
    if rules is None:
        counters.add("rule_load_failures")
        return
    counters.add("rule_loads")
    counters.set("rule_last_load_ms", int(time.time() * 1000))
    counters.set("rules_running", rules)


def lower_priority(priority: str) -> None:
    """Answers first: under CPU contention the receiver runs and the lake catches up
    in the gaps.

    The receiver is bound by latency more than by CPU: each report waits for a
    group commit, and the switch (and the bench's load) keeps a bounded number
    unanswered. At nice 10 this process still ran whenever a receiver thread
    slept for an instant, and each wake-up of a receiver thread then waited for
    it to be preempted. SCHED_IDLE is preempted at once (figures: bench/README.md,
    "Ingest").
    Policies are per thread on Linux: every thread that exists now is set, and
    threads started later inherit it from the thread that starts them.
    """
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            for task in os.listdir("/proc/self/task"):
                os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
            return
        except (OSError, ValueError) as error:
            log.warning("cannot run the lake writer at idle priority (%s); nice 10", error)
    os.nice(10)


def run(
    settings: Settings,
    poll_interval_s: float,
    stop: FlagReader,
    reload: FlagReader,
    counters_array: Any,
    log_level: int,
    receiver_pid: int,
    progress: Connection,
    alert_counts: Any,
) -> None:
    """The lake writer process: drain sealed segments until told to stop, then once more.
    Says on `progress` when `callsentry.duckdb` is in place ("views") and when the key
    file is rebuilt ("keys"): the receiver may wait for either."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from engine.alerts.actions import ActionSink
    from engine.ingest.senders import SenderDirectory
    from engine.ingest.store import StoreError, lake_writer_lock
    from engine.lake.parquet import Lake
    from engine.lake.writer import LakeWriter, Outage
    from engine.relay.feed import HeldSegments

    # The receiver decides when we stop (after sealing its last segment), so a
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut us short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The receiver's pid comes as an argument: if it was killed while this process
    # was still starting, getppid() would already name init and never change.
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    lower_priority(settings.store.lake_writer_priority)
    tune_gc_for_detection()
    lock = lake_writer_lock(settings.store.data_dir)
    starting = Outage("lake writer start")

    def take_lock() -> bool:
        try:
            lock.acquire(wait_s=5)
        except StoreError:
            return False  # an earlier writer (left by a killed receiver) finishes first
        return True

    # A file system that refuses the lock file (read-only, full) is waited out.
    while not (taken := _until_it_works(starting, take_lock, stop, receiver_pid)):
        if taken is None:
            return
        if os.getppid() != receiver_pid:
            log.error("the receiver is gone before this lake writer could start")
            return
    # Analysts can connect before detection has loaded (LakeWriter publishes them again).
    lake = Lake(settings.store.data_dir)

    def publish() -> Lake:
        lake.prepare()
        lake.publish_views()
        return lake

    if _until_it_works(starting, publish, stop, receiver_pid) is None:
        lock.release()
        return
    _say(progress, "views")
    detection = settings.detection
    counters = SharedCounters(counters_array)
    pipeline = None
    if detection.enabled:
        try:
            pipeline = make_pipeline(detection)
            count_rule_load(counters, len(pipeline.rules.rules))
        except YamlFileError as error:
            # The receiver checked these before starting us; they changed since.
            log.error("rules are invalid, detection is off:\n  %s", "\n  ".join(error.problems))
            count_rule_load(counters, None)
            counters.set("rules_running", RULES_INVALID)
    else:
        counters.set("rules_running", 0)
    # Counts that do not reach the receiver before this process exits are dropped, never
    # waited for: the receiver may be stopping, or killed, and not reading.
    alert_counts.cancel_join_thread()
    tally = AlertTally(alert_counts)
    sinks = [*make_sinks(settings), tally]
    outbox = _until_it_works(
        starting, lambda: make_durable_sinks(settings, pipeline), stop, receiver_pid
    )
    if outbox is None:
        lock.release()
        return
    durable: list[AlertSink] = outbox
    said_keys: list[bool] = []

    def keys_ready() -> None:
        # Once, however many times a start on a full disk is tried.
        if not said_keys:
            said_keys.append(True)
            _say(progress, "keys")

    # With relay targets, a segment in the lake goes to the relay, which deletes it once
    # every target has what it holds (engine.relay.feed).
    release = HeldSegments(settings.store.data_dir).take if settings.relay.enabled else None
    writer = _until_it_works(
        starting,
        lambda: LakeWriter(
            settings.store.data_dir,
            compact_target_bytes=settings.store.compact_target_bytes,
            counters=counters,
            pipeline=pipeline,
            sinks=sinks,
            durable_sinks=durable,
            call_sinks=[sink for sink in durable if isinstance(sink, NatsOutboxSink)],
            dedup_horizon_s=settings.store.dedup_horizon_s,
            max_dedup_keys=settings.store.max_dedup_keys,
            keys_ready=keys_ready,
            release=release,
            senders=SenderDirectory(settings.receiver.switches, settings.receiver.check_senders),
        ),
        stop,
        receiver_pid,
    )
    if writer is None:
        for sink in [*sinks, *durable]:
            sink.close()
        lock.release()
        return
    progress.close()
    # Wall-clock housekeeping of the lake: drain sealed segments, compact, reload rules.
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    scheduler.add_job(
        writer.compact, "interval", seconds=settings.store.compact_interval_s, id="compact"
    )
    retention = settings.store.retention_days
    if retention > 0:
        writer.expire(retention)
        scheduler.add_job(writer.expire, "interval", hours=24, args=[retention], id="retention")
    if pipeline is not None and detection.snapshot_interval_s > 0:
        scheduler.add_job(
            writer.snapshot, "interval", seconds=detection.snapshot_interval_s, id="snapshot"
        )
    if pipeline is not None:
        action_sinks = [sink for sink in durable if isinstance(sink, ActionSink)]
        watcher = _RuleWatcher(writer, detection, reload, action_sinks[0] if action_sinks else None)
        every = detection.reload_interval_s or 1.0
        scheduler.add_job(watcher.check, "interval", seconds=every, id="rules")
    trail = TrailCopy(settings.store.data_dir, lake)
    scheduler.start()
    log.info("lake writer running (detection %s)", "on" if pipeline is not None else "off")
    try:
        # Draining is the main loop (one pass at a time, however long a pass takes).
        while not stop.wait(poll_interval_s):
            writer.drain_logged()
            tally.send()
            trail.copy()
            if os.getppid() != receiver_pid:
                log.error("the receiver is gone (killed?); writing what is sealed and exiting")
                break
    finally:
        scheduler.shutdown(wait=True)
    writer.drain_logged(last=True)
    trail.copy()
    trail.close()
    writer.snapshot()
    for sink in [*sinks, *durable]:
        sink.close()
    lock.release()


def _until_it_works(
    outage: Outage,
    attempt: Callable[[], T],
    stop: FlagReader,
    receiver_pid: int,
) -> T | None:
    """`attempt()`, again after each pause of `outage` while the file system fails it (a
    full disk at the start): the process waits for room, saying so once, rather than
    exiting to be started again every 2 s. None if told to stop, or if the receiver is
    gone, meanwhile."""
    from engine.lake.parquet import storage_errors

    while True:
        try:
            result = attempt()
        except storage_errors() as error:
            outage.failed(error, "the journal keeps the reports")
            if stop.wait(outage.pause_s) or os.getppid() != receiver_pid:
                return None
            continue
        outage.worked()
        return result


def _say(progress: Connection, what: str) -> None:
    # A pipe, not a multiprocessing Event, as engine.apps.flags says.
    with contextlib.suppress(OSError):  # the receiver is gone: nobody to tell
        progress.send(what)


class LakeWriterProcess:
    """Starts, watches and stops the lake writer process for `serve`."""

    def __init__(self, settings: Settings, *, poll_interval_s: float = 0.2) -> None:
        import multiprocessing as mp

        self._context = mp.get_context("spawn")
        self.counters = SharedCounters.create(self._context)
        # Alerts by (rule, severity, mode): the process sends counts, `alert_counts` adds
        # them up here, across restarts.
        self._alert_counts = self._context.Queue()
        self._alerts: Counter[tuple[str, str, str]] = Counter()
        self._alerts_lock = threading.Lock()  # the scrape and the housekeeping both add
        self._stop, self._reload = self._flags()
        # What the running process has said of its start (see `run`), and where it says it.
        self._heard: set[str] = set()
        self._progress: Connection | None = None
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self._process: Any = None
        self._stopping = False
        self.restarts = 0
        self.last_exitcode: int | None = None

    def start(self) -> None:
        if self._stop.handed:
            # Each process is handed ends of its own (a restart, a start after a stop,
            # which raised `stop`, or after a start that failed).
            self._stop.close()
            self._reload.close()
            self._stop, self._reload = self._flags()
        self._stopping = False
        self._heard.clear()
        if self._progress is not None:
            self._progress.close()
        self._progress, progress = self._context.Pipe(duplex=False)
        self.counters.set("rules_running", RULES_LOADING)
        self._process = self._context.Process(
            target=run,
            args=(
                self.settings,
                self.poll_interval_s,
                self._stop.reader,
                self._reload.reader,
                self.counters.array,
                logging.getLogger().level,
                os.getpid(),
                progress,
                self._alert_counts,
            ),
            name="callsentry-lake-writer",
            daemon=False,
        )
        self._process.start()
        progress.close()  # the child's end: once the child is gone, reading says so
        self._stop.handed_over()
        self._reload.handed_over()

    def _flags(self) -> tuple[ProcessFlag, ProcessFlag]:
        # Without serve (gone), the writer stops; nobody will ask it to reload.
        return (
            ProcessFlag(self._context, raised_when_gone=True),
            ProcessFlag(self._context, raised_when_gone=False),
        )

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def exitcode(self) -> int | None:
        """How the process ended (-9: killed by SIGKILL), None while it runs."""
        return self._process.exitcode if self._process is not None else None

    def alert_counts(self) -> dict[tuple[str, str, str], int]:
        """Alerts raised so far by (rule_id, severity, mode), over every run of the process."""
        with self._alerts_lock:
            while True:
                try:
                    counts = self._alert_counts.get_nowait()
                except queue.Empty:
                    break
                self._alerts.update(counts)
            return dict(self._alerts)

    def wait_for_keys(self) -> None:
        """Start the process if it is not running, and return once it has rebuilt the key
        file (engine.ingest.keyfile) from the lake; StoreError if it exits before."""
        self._wait("keys", "rebuild the key file from the lake")

    def wait_for_views(self) -> None:
        """Start the process if it is not running, and return once `callsentry.duckdb`
        is in place; StoreError if it exits before."""
        self._wait("views", "publish the analysts' views")

    def _wait(self, said: str, what: str) -> None:
        from engine.ingest.store import StoreError

        if self._process is None:
            self.start()
        assert self._progress is not None
        while said not in self._heard:
            try:
                self._heard.add(self._progress.recv())
            except EOFError:
                self._process.join()
                self._process = None
                raise StoreError(
                    f"the lake writer exited before it could {what}; its log says why"
                ) from None

    def reload_rules(self) -> None:
        self._reload.set()

    def check(self) -> None:
        """Restart the writer if it died; sealed segments wait for it meanwhile."""
        self.alert_counts()  # read now and then, so the counts never fill their pipe
        if self._process is not None and not self._process.is_alive() and not self._stopping:
            log.error("lake writer exited with code %s; restarting it", self._process.exitcode)
            self.restarts += 1
            self.last_exitcode = self._process.exitcode
            self.start()

    def stop(self, timeout: float = 120.0) -> None:
        if self._process is None or self._process.pid is None:
            self._process = None  # never started
            return
        self._stopping = True
        self._stop.set()  # never waits, whether the process is alive or not
        self._process.join(timeout)
        if self._process.is_alive():
            # The writer ignores SIGTERM (see `run`), so only SIGKILL bounds the stop.
            # Nothing is lost by it: the journal's sealed segments stay until the lake
            # holds them, and the next start writes them.
            log.error(
                "lake writer did not finish in %.0f s; killed it, sealed segments stay for "
                "next start",
                timeout,
            )
            self._process.kill()
            self._process.join()
        self._process = None
