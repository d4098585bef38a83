"""The lake writer: sealed journal segments -> decoded reports -> Parquet lake.

It runs in a process of its own beside the receiver (`serve`), so decoding,
Parquet and compaction never hold the receiver's interpreter lock; `replay`
runs the same code inline. A segment is deleted only after its Parquet files
are durable; a crash in between is repaired on the next start (the segment's
partial files are dropped and written again), so every report lands once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.synchronize
import os
import signal
import threading
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
from apscheduler.schedulers.background import BackgroundScheduler

from engine.config import DetectionSettings, Settings
from engine.detect.alerts import Alert, AlertSink, JsonLinesSink, LogSink, WebhookSink
from engine.detect.calls import CallTracker, call_columns
from engine.detect.pipeline import Output, Pipeline
from engine.detect.rules import LoadedRules, load_rules
from engine.detect.snapshot import Position, Snapshot, snapshot_path
from engine.detect.snapshot import load as snapshot_load
from engine.detect.snapshot import save as snapshot_save
from engine.events import CallEvent, CallState, Reject, RejectReason
from engine.journal import (
    DATAGRAMS,
    TICK,
    fsync_dir,
    read_segment,
    sealed_path,
    sealed_segments,
    segment_number,
    tick_of,
)
from engine.lake import ALERT_SCHEMA, CALL_SCHEMA, Item, Lake, item_of
from engine.runtime import tune_gc_for_detection
from engine.store import StoreError, codec_of, lake_writer_lock
from engine.yamlfile import YamlFileError

log = logging.getLogger(__name__)


# Counters shared with the receiver's process for its metrics (one int64 each).
COUNTERS = (
    "flushed",
    "flushed_segments",
    "flush_failures",
    "compacted_files",
    "calls",
    "alerts",
    "evicted_keys",
    "evicted_calls",
    *(f"rejected_{reason.value}" for reason in RejectReason),
)


class SharedCounters:
    def __init__(self, array: Any) -> None:
        self.array = array

    @classmethod
    def create(cls, context: Any) -> SharedCounters:
        return cls(context.Array("q", len(COUNTERS), lock=False))

    def add(self, name: str, value: int = 1) -> None:
        self.array[COUNTERS.index(name)] += value

    def get(self, name: str) -> int:
        return int(self.array[COUNTERS.index(name)])


@dataclass
class DrainResult:
    segments: int = 0
    reports: int = 0
    rejects: list[Reject] | None = None
    alerts: list[Alert] = field(default_factory=list)
    calls: int = 0


# A decoded segment, step by step: batches of reports, and ticks (event time moving on).
Step = tuple[int, list[Item]] | float


@dataclass
class DetectedSegment:
    """A segment decoded and run through detection, waiting for its lake write:
    its reports, and the calls (columns, see `call_columns`) and alerts they made."""

    steps: list[Step]
    calls: dict[str, list[Any]]
    alerts: list[Alert]

    @property
    def call_count(self) -> int:
        return len(self.calls["call_id"])


def calls_frame(columns: dict[str, Any]) -> pl.DataFrame:
    """The calls table from `call_columns` (texts as lists, numbers as doubles with
    NaN for unknown, times in epoch seconds)."""
    series = []
    for name, dtype in CALL_SCHEMA.items():
        values = columns[name]
        if dtype == pl.String:
            series.append(pl.Series(name, values, pl.String))
            continue
        numbers = pl.Series(name, np.frombuffer(values, dtype=np.float64)).fill_nan(None)
        if dtype == pl.Datetime("us", "UTC"):
            # As the events table's times: microseconds, rounded half to even.
            numbers = (numbers * 1_000_000).round().cast(pl.Int64).cast(dtype)
        series.append(numbers.cast(dtype))
    return pl.DataFrame(series)


def alerts_frame(alerts: Sequence[Alert]) -> pl.DataFrame:
    times = ("window_start", "window_end", "raised_at")
    data: dict[str, list[Any]] = {name: [] for name in ALERT_SCHEMA}
    for alert in alerts:
        for name in ALERT_SCHEMA:
            value = getattr(alert, name)
            data[name].append(round(value * 1_000_000) if name in times else value)
    schema = {name: (pl.Int64 if name in times else dtype) for name, dtype in ALERT_SCHEMA.items()}
    return pl.DataFrame(data, schema=schema).with_columns(
        pl.col(name).cast(pl.Datetime("us", "UTC")) for name in times
    )


class LakeWriter:
    def __init__(
        self,
        data_dir: Path,
        *,
        compact_target_bytes: int = 64 * 1024 * 1024,
        counters: SharedCounters | None = None,
        pipeline: Pipeline | None = None,
        sinks: Sequence[AlertSink] = (),
        snapshots: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.lake = Lake(data_dir)
        self.journal_dir = data_dir / "journal"
        self.compact_target_bytes = compact_target_bytes
        self.counters = counters
        self.pipeline = pipeline
        self.sinks = list(sinks)
        # Detection must see each report once: a segment whose lake write failed is
        # kept here, already run through the pipeline, and written again as it is.
        self._decoded: dict[int, DetectedSegment] = {}
        self._lock = threading.Lock()
        # Compaction and retention run on the scheduler's threads: one at a time.
        self._housekeeping = threading.Lock()
        self._failing = False
        # Segments whose reports the caller still holds decoded (replay): no need to
        # read them back from the journal.
        self._primed: dict[int, list[Step]] = {}
        self.position = Position(0, 0)
        self.snapshot_file = snapshot_path(data_dir) if snapshots and pipeline else None
        # Before the restore: its catch-up feeds detection what the lake holds.
        self.settle()
        if self.snapshot_file is not None:
            self._restore(self.snapshot_file)

    def _journaled(self) -> list[int]:
        numbers = map(segment_number, sealed_segments(self.journal_dir))
        return [n for n in numbers if n is not None]

    def settle(self) -> None:
        """Put right what a crash left between the lake and the journal: the lake files
        of a segment still in the journal may be partial, and are written again from
        it, so they go now (and detection's catch-up does not see their reports
        twice). A group (`write_group`) lets its journal segments go once every file
        is durable, the last segment first and alone: with that one gone the group
        is whole and the rest of its segments go too; with it there, the group's
        files go and its segments are written again."""
        journaled = set(self._journaled())
        if not journaled:
            return
        for first, last in self.lake.groups():
            if last in journaled:
                log.info("lake files of segments %d-%d may be partial: written again", first, last)
                self.lake.drop_group(first, last)
                continue
            done = [n for n in range(first, last) if n in journaled]
            for number in done:
                sealed_path(self.journal_dir, number).unlink()
                journaled.discard(number)
            if done:
                fsync_dir(self.journal_dir)
        for number in sorted(journaled):
            self.lake.drop_segment(number)

    def _restore(self, path: Path) -> None:
        assert self.pipeline is not None
        snapshot = snapshot_load(path)
        if snapshot is None:
            return
        restored = self.pipeline.restore(snapshot.state)
        self.position = snapshot.position
        caught_up = self._catch_up(snapshot.position.seq)
        log.info(
            "detection state restored from %s (up to report %d; %d rules and models; "
            "%d later reports from the lake fed again)",
            path.name,
            snapshot.position.seq,
            len(restored),
            caught_up,
        )

    def _catch_up(self, after_seq: int) -> int:
        """Reports the lake took after the snapshot (a crash between snapshots) go
        through detection again so its state is whole; what they raised is already
        in the lake, so the output is dropped."""
        assert self.pipeline is not None
        try:
            rows = self.lake.query(
                "SELECT seq, epoch_us(ts), call_id, serial, state, code, caller, callee, "
                "forward, menu_id, menu_name, source FROM events WHERE seq > ? ORDER BY seq",
                [after_seq],
            )
        except duckdb.Error as error:
            log.error("could not read the lake to catch detection up: %s", error)
            return 0
        events = [
            CallEvent(us / 1e6, call_id, serial, CallState(state), code, *rest)
            for _, us, call_id, serial, state, code, *rest in rows
        ]
        self.pipeline.feed(events)
        if rows:
            self.position = Position(self.position.segment, rows[-1][0])
        return len(events)

    def snapshot(self) -> bool:
        """Save detection state between segments (see engine.detect.snapshot)."""
        if self.pipeline is None or self.snapshot_file is None:
            return False
        with self._lock:
            if self._decoded:
                return False  # a segment is detected but not yet in the lake: next time
            started = time.monotonic()
            snapshot = Snapshot(self.position, self.pipeline.state(), time.time())
            try:
                size = snapshot_save(self.snapshot_file, snapshot)
            except OSError as error:
                log.error("detection snapshot failed: %s; the previous one stays", error)
                return False
        log.info(
            "detection state saved (%.1f MiB in %.1f s, up to report %d)",
            size / 2**20,
            time.monotonic() - started,
            self.position.seq,
        )
        return True

    def _count(self, name: str, value: int = 1) -> None:
        if self.counters is not None:
            self.counters.add(name, value)

    def prime(self, segment: int, steps: list[Step]) -> None:
        """Hand over the decoded content of a segment just sealed (exactly what
        `decode_segment` would read back from it)."""
        self._primed[segment] = steps

    def decode_segment(self, path: Path) -> list[Step]:
        segment = read_segment(path)
        if segment.problem is not None:
            # The receiver seals only whole frames; a problem here is damage after the fact.
            log.error("journal %s: %s; reading the frames before it", path.name, segment.problem)
        codec = codec_of(segment.header)
        steps: list[Step] = []
        for frame in segment.frames:
            if frame.kind == DATAGRAMS:
                decode = codec.decode
                items: list[Item] = [
                    decode(raw, ts, source)[0] for ts, source, raw in frame.datagrams()
                ]
            elif frame.kind == TICK:
                steps.append(tick_of(frame))
                continue
            else:
                items = [item_of(record) for record in frame.records()]
            steps.append((frame.first_seq, items))
        return steps

    def _detect(self, steps: list[Step]) -> Output:
        output = Output()
        if self.pipeline is None:
            return output
        for step in steps:
            if isinstance(step, float):
                output.extend(self.pipeline.advance(step))
            else:
                output.extend(self.pipeline.feed(step[1]))
        return output

    def drain(self, collect_rejects: bool = False) -> DrainResult:
        """Write every sealed segment to the lake, oldest first, with what detection made of it."""
        result = DrainResult(rejects=[] if collect_rejects else None)
        for number, path, written in self.detect_sealed():
            self.write_detected(number, path, written, result)
        return result

    def detect_sealed(
        self, exclude: Container[int] = ()
    ) -> list[tuple[int, Path, DetectedSegment]]:
        """Run every sealed segment not yet detected through detection, oldest first;
        each stays held (`_decoded`) until `write_detected` has put it in the lake.
        `exclude`: segments already handed to `write_detected` (being written)."""
        detected: list[tuple[int, Path, DetectedSegment]] = []
        for path in sealed_segments(self.journal_dir):
            number = segment_number(path)
            assert number is not None
            if number in exclude:
                continue
            with self._lock:
                written = self._decoded.get(number)
                if written is None:
                    primed = self._primed.pop(number, None)
                    steps = primed if primed is not None else self.decode_segment(path)
                    output = self._detect(steps)
                    written = self.hold(number, steps, call_columns(output.calls), output.alerts)
            detected.append((number, path, written))
        return detected

    def hold(
        self, number: int, steps: list[Step], calls: dict[str, list[Any]], alerts: list[Alert]
    ) -> DetectedSegment:
        """Keep a detected segment until `write_detected` (detection must see each report
        once: a segment whose lake write fails is written again as it is), and move the
        position detection has reached past it."""
        written = self._decoded[number] = DetectedSegment(steps, calls, alerts)
        self.position = self.position_after([(number, steps)])
        return written

    def position_after(self, segments: list[tuple[int, list[Step]]]) -> Position:
        """Where detection will be once it has seen these segments, in order."""
        position = self.position
        for number, steps in segments:
            last_seq = max(
                (s[0] + len(s[1]) - 1 for s in steps if not isinstance(s, float) and s[1]),
                default=position.seq,
            )
            position = Position(number, max(last_seq, position.seq))
        return position

    def write_detected(
        self, number: int, path: Path, written: DetectedSegment, result: DrainResult
    ) -> None:
        """Put one detected segment in the lake, then let its journal segment go.
        Segments must be written in the order `detect_sealed` gave them."""
        batches = [step for step in written.steps if not isinstance(step, float)]
        alerts = written.alerts
        derived = {
            "calls": calls_frame(written.calls),
            "alerts": alerts_frame([a for a in alerts if a.mode == "alert"]),
            "shadow_alerts": alerts_frame([a for a in alerts if a.mode != "alert"]),
        }
        # A crash may have left part of this segment's Parquet; write it whole again.
        self.lake.drop_segment(number)
        reports = self.lake.write_segment(number, batches, derived)
        path.unlink()
        with self._lock:
            del self._decoded[number]
        self._written(alerts, batches, reports, written.call_count, result, segments=1)

    def write_group(
        self,
        segments: list[tuple[int, list[Step]]],
        detected: Callable[[], tuple[dict[str, list[Any]], list[Alert]]],
        result: DrainResult,
    ) -> None:
        """Replay's lake write: journal segments just sealed, in order, written to the
        lake as one group (Lake.write_group), their reports while detection works
        on them, then what `detected` returns for each segment in turn (its
        calls as columns, and alerts), then the journal segments go. One write
        for many segments instead of one each and a compaction after: compaction
        re-encoded every row at the end of a replay, when nothing else was left."""
        first, last = segments[0][0], segments[-1][0]
        batches = [step for _, steps in segments for step in steps if not isinstance(step, float)]
        reports = self.lake.write_group(first, last, batches)
        held: list[DetectedSegment] = []
        calls: list[pl.DataFrame] = []
        for number, steps in segments:
            columns, alerts = detected()
            held.append(self.hold(number, steps, columns, alerts))
            # Framed now, while detection works on the next segment.
            calls.append(calls_frame(columns))
        alerts = [alert for segment in held for alert in segment.alerts]
        self.lake.write_group(
            first,
            last,
            [],
            {
                "calls": pl.concat(calls),
                "alerts": alerts_frame([a for a in alerts if a.mode == "alert"]),
                "shadow_alerts": alerts_frame([a for a in alerts if a.mode != "alert"]),
            },
        )
        # The last segment first and on its own: gone, it says the group is whole.
        sealed_path(self.journal_dir, last).unlink()
        fsync_dir(self.journal_dir)
        for number, _ in segments[:-1]:
            sealed_path(self.journal_dir, number).unlink()
        fsync_dir(self.journal_dir)
        with self._lock:
            for number, _ in segments:
                del self._decoded[number]
        call_count = sum(segment.call_count for segment in held)
        self._written(alerts, batches, reports, call_count, result, segments=len(segments))

    def _written(
        self,
        alerts: list[Alert],
        batches: list[tuple[int, list[Item]]],
        reports: int,
        calls: int,
        result: DrainResult,
        *,
        segments: int,
    ) -> None:
        """What follows a lake write: sinks, the result, counters, rejects."""
        for sink in self.sinks:
            try:
                sink.deliver(alerts)
            except OSError as error:
                log.error("alert sink %s failed: %s", type(sink).__name__, error)
        result.segments += segments
        result.reports += reports
        result.calls += calls
        result.alerts.extend(alerts)
        self._count("flushed", reports)
        self._count("flushed_segments", segments)
        self._count("calls", calls)
        self._count("alerts", sum(1 for a in alerts if a.mode == "alert"))
        if self.pipeline is not None and self.counters is not None:
            evicted = sum(rule.state.evicted for rule in self.pipeline.rules.rules)
            self.counters.array[COUNTERS.index("evicted_keys")] = evicted
            evicted_calls = self.pipeline.tracker.stats.evicted_calls
            self.counters.array[COUNTERS.index("evicted_calls")] = evicted_calls
        for _, items in batches:
            for item in items:
                if type(item) is not CallEvent:
                    reject: Reject = item  # type: ignore[assignment]
                    self._count(f"rejected_{reject.reason.value}")
                    if result.rejects is not None:
                        result.rejects.append(reject)

    def reload_rules(self, path: Path, max_keys: int, *, models: bool = True) -> bool:
        """Load the rule and model files again; swap them in whole only if every file
        is valid."""
        if self.pipeline is None:
            return False
        try:
            loaded = load_detectors(path, max_keys, models=models)
        except YamlFileError as error:
            log.error(
                "rules not reloaded, the running rules stay:\n  %s",
                "\n  ".join(error.problems),
            )
            return False
        with self._lock:
            kept = self.pipeline.swap_rules(loaded.rules)
        log.info(
            "rules reloaded: %d rules (window state kept for %d unchanged)",
            len(loaded.rules.rules),
            len(kept),
        )
        return True

    def drain_logged(self) -> None:
        try:
            self.drain()
        except OSError as error:
            self._count("flush_failures")
            if not self._failing:
                log.error("lake write failed (%s); the journal keeps the reports, retrying", error)
            self._failing = True
            return
        if self._failing:
            log.warning("lake writes work again")
            self._failing = False

    def expire(self, retention_days: int) -> None:
        """Retention: wall-clock housekeeping, like compaction (detection is unaffected)."""
        if retention_days <= 0:
            return
        before = datetime.now(UTC).date() - timedelta(days=retention_days)
        try:
            with self._housekeeping:
                removed = self.lake.expire(before)
        except OSError as error:
            log.error("retention failed (%s); will try again", error)
            return
        if removed:
            log.info("retention: removed %d day partitions before %s", len(removed), before)

    def compact(self) -> None:
        try:
            with self._housekeeping:
                # Listed before the lake's files (see Lake.compact): a segment whose
                # files are written meanwhile is still in this list.
                journaled = self._journaled()
                result = self.lake.compact(self.compact_target_bytes, journaled)
        except OSError as error:
            log.error("compaction failed (%s); will try again", error)
            return
        if result.written_files:
            self._count("compacted_files", result.merged_files)
            log.info(
                "compacted %d segments into %d files", result.merged_files, result.written_files
            )


def load_detectors(path: Path, max_keys: int, *, models: bool) -> LoadedRules:
    """Rules and models under `path`; raises YamlFileError listing every problem."""
    loaded = load_rules(path, max_keys=max_keys)
    if not models:
        # Rules that ask for a model's score then never fire; say so.
        for rule in loaded.rules.rules:
            if rule.spec.model is not None:
                log.warning(
                    "rule %s needs model %s, and models are off", rule.id, rule.spec.model.model
                )
        loaded.rules.models.models.clear()
    return loaded


def make_pipeline(detection: DetectionSettings, rules_dir: Path | None = None) -> Pipeline:
    """The detection pipeline with the rules under `rules_dir`; raises YamlFileError."""
    loaded = load_detectors(
        rules_dir or detection.rules_dir,
        detection.max_keys_per_rule,
        models=detection.models_enabled,
    )
    tracker = CallTracker(
        settle_s=detection.settle_s,
        ring_timeout_s=detection.ring_timeout_s,
        max_call_s=detection.max_call_s,
        abandon_s=detection.abandon_s,
        max_open_calls=detection.max_open_calls,
    )
    return Pipeline(loaded.rules, tracker)


def make_sinks(settings: Settings) -> list[AlertSink]:
    detection = settings.detection
    sinks: list[AlertSink] = [LogSink()]
    if detection.alerts_jsonl != "off":
        path = Path(detection.alerts_jsonl or settings.store.data_dir / "alerts.jsonl")
        sinks.append(JsonLinesSink(path))
    if detection.webhook_url:
        sinks.append(WebhookSink(detection.webhook_url, token=detection.webhook_token))
    return sinks


class _RuleWatcher:
    """Reloads the rules when their files change, or when asked (SIGHUP to serve)."""

    def __init__(self, writer: LakeWriter, detection: DetectionSettings, asked: Any) -> None:
        self.writer = writer
        self.detection = detection
        self.asked = asked
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        folder = self.detection.rules_dir
        files = [
            *folder.glob("*.y*ml"),
            *(folder / "lists").glob("*.y*ml"),
            *(folder / "models").glob("*.y*ml"),
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
        self.writer.reload_rules(
            self.detection.rules_dir,
            self.detection.max_keys_per_rule,
            models=self.detection.models_enabled,
        )


def lower_priority(priority: str) -> None:
    """Answers first: under CPU contention the receiver runs and the lake catches up
    in the gaps.

    The receiver is bound by latency more than by CPU: each report waits for a
    group commit, and the switch (and the bench's load) keeps a bounded number
    unanswered. At nice 10 this process still ran whenever a receiver thread
    slept for an instant, and each wake-up of a receiver thread then waited for
    it to be preempted. SCHED_IDLE is preempted at once: measured at full speed,
    45,000-50,000 answered/s at nice 10 against 53,000-56,000 idle.
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
    stop: multiprocessing.synchronize.Event,
    reload: multiprocessing.synchronize.Event,
    counters_array: Any,
    log_level: int,
    receiver_pid: int,
) -> None:
    """The lake writer process: drain sealed segments until told to stop, then once more."""
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
    detection = settings.detection
    pipeline = None
    if detection.enabled:
        try:
            pipeline = make_pipeline(detection)
        except YamlFileError as error:
            # The receiver checked these before starting us; they changed since.
            log.error("rules are invalid, detection is off:\n  %s", "\n  ".join(error.problems))
    lock = lake_writer_lock(settings.store.data_dir)
    while True:
        # An earlier writer (left by a receiver that was killed) finishes first.
        try:
            lock.acquire(wait_s=5)
            break
        except StoreError:
            if os.getppid() != receiver_pid:
                log.error("the receiver is gone before this lake writer could start")
                return
    sinks = make_sinks(settings)
    writer = LakeWriter(
        settings.store.data_dir,
        compact_target_bytes=settings.store.compact_target_bytes,
        counters=SharedCounters(counters_array),
        pipeline=pipeline,
        sinks=sinks,
    )
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
        watcher = _RuleWatcher(writer, detection, reload)
        every = detection.reload_interval_s or 1.0
        scheduler.add_job(watcher.check, "interval", seconds=every, id="rules")
    scheduler.start()
    log.info("lake writer running (detection %s)", "on" if pipeline is not None else "off")
    try:
        # Draining is the main loop (one pass at a time, however long a pass takes).
        while not stop.wait(poll_interval_s):
            writer.drain_logged()
            if os.getppid() != receiver_pid:
                log.error("the receiver is gone (killed?); writing what is sealed and exiting")
                break
    finally:
        scheduler.shutdown(wait=True)
    writer.drain_logged()
    writer.snapshot()
    for sink in sinks:
        sink.close()
    lock.release()


class LakeWriterProcess:
    """Starts, watches and stops the lake writer process for `serve`."""

    def __init__(self, settings: Settings, *, poll_interval_s: float = 0.2) -> None:
        self._context = mp.get_context("spawn")
        self.counters = SharedCounters.create(self._context)
        self._stop = self._context.Event()
        self._reload = self._context.Event()
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self._process: Any = None
        self.restarts = 0

    def start(self) -> None:
        self._process = self._context.Process(
            target=run,
            args=(
                self.settings,
                self.poll_interval_s,
                self._stop,
                self._reload,
                self.counters.array,
                logging.getLogger().level,
                os.getpid(),
            ),
            name="callsentry-lake-writer",
            daemon=False,
        )
        self._process.start()

    def reload_rules(self) -> None:
        self._reload.set()

    def check(self) -> None:
        """Restart the writer if it died; sealed segments wait for it meanwhile."""
        if self._process is not None and not self._process.is_alive() and not self._stop.is_set():
            log.error("lake writer exited with code %s; restarting it", self._process.exitcode)
            self.restarts += 1
            self.start()

    def stop(self, timeout: float = 120.0) -> None:
        if self._process is None or self._process.pid is None:
            self._process = None  # never started
            return
        self._stop.set()
        self._process.join(timeout)
        if self._process.is_alive():
            log.error(
                "lake writer did not finish in %.0f s; sealed segments stay for next start", timeout
            )
            self._process.terminate()
            self._process.join(5)
        self._process = None
