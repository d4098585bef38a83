"""`callsentry replay`: event files through the same intake, journal, lake writer and
detection pipeline as live traffic, minus the socket. Rows are taken in event-time order."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.apps.detectors import make_pipeline
from engine.apps.settings import Settings
from engine.apps.stores import open_store, settings_codec
from engine.core.events import CallEvent, Reject
from engine.detect.alerts import Alert
from engine.detect.bounds import Evictions, evictions
from engine.ingest.eventfiles import PART_BYTES, PART_ROWS, EventStream, parquet_rows
from engine.ingest.intake import Intake
from engine.ingest.journal import JSON_RECORDS, TICK, json_payload, sealed_segments, tick_payload
from engine.ingest.records import Item, item_of, pack_events, record_of
from engine.ingest.stats import Stats
from engine.ingest.store import StoreError, lake_writer_lock
from engine.lake.parquet import HeldReports
from engine.lake.views import ViewsFile
from engine.lake.writer import DrainResult, LakeWriter, Step

if TYPE_CHECKING:
    from engine.apps.detectfork import DetectionProcess, Restored
    from engine.detect.pipeline import Pipeline

log = logging.getLogger(__name__)

# Replay commits in large batches: one fsync per this many rows.
REPLAY_BATCH = 20_000
# With detection in a second process, this many journal segments are written to the
# lake as one group (LakeWriter.write_group) ...
GROUP_SEGMENTS = 10
# ... once this many more have been handed to the detection process: it works on them
# while this one writes the group, rather than waiting for the next segment after it.
# The journal keeps the segments not written yet (a crash redoes at most these), and
# their rows are held until then (with the parts read ahead, most of what replay holds
# besides detection's state).
SEGMENTS_AHEAD = 2
# Parts of the event files read ahead of the one being stored (EventStream parts).
PARTS_IN_FLIGHT = 2
PROGRESS_EVERY_S = 10.0
_REMEMBER_RUN = 10_000


class Progress:
    """How far a replay is: rows taken, rows/s, alerts so far. This one logs a line every
    PROGRESS_EVERY_S seconds (where no terminal shows a bar: engine.apps.progress);
    `total` is the rows the files hold when known (Parquet footers), else None."""

    def __init__(self, total: int | None = None, what: str = "replay") -> None:
        self.total = total
        self.what = what
        self.started = self.last = time.monotonic()

    def at(self, done: int, alerts: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            log.info(
                "%s: %d of %d rows (%.0f %%), %.0f rows/s, %d alerts so far",
                self.what,
                done,
                self.total,
                100 * done / self.total,
                rate,
                alerts,
            )
        else:
            log.info("%s: %d rows, %.0f rows/s, %d alerts so far", self.what, done, rate, alerts)

    def close(self) -> None:
        """The replay is over (a bar is taken off the terminal)."""


class _ReadAhead:
    """The event files' parts read on a thread of their own, at most `ahead` of them
    waiting: polars reads and checks a part (leaving the interpreter lock) while the
    previous one is stored and detected. `__iter__` gives the parts in order; a
    failure of the reading thread is raised there."""

    _END = object()

    def __init__(self, stream: EventStream, ahead: int) -> None:
        self._stream = stream
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="event-files", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for part in self._stream:
                while not self._stop.is_set():
                    try:
                        self._queue.put(part, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put(self._END)
        except BaseException as error:
            self._put(error)

    def _put(self, message: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.5)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[list[Item]]:
        while True:
            message = self._queue.get()
            if message is self._END:
                return
            if isinstance(message, BaseException):
                raise message
            yield message

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ReplayReport:
    stats: Stats
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    calls: int = 0
    rejects: list[Reject] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)
    # What detection's bounds (max_keys_per_rule, max_open_calls) cost in this replay.
    evicted: Evictions = field(default_factory=Evictions)
    # Rows of a file out of event-time order by more than a part: taken late (see
    # EventStream), so what detection made of them may differ from a sorted file's.
    late: int = 0

    @property
    def clean(self) -> bool:
        return not self.rejects and not self.file_errors


def _remember_stored(held: HeldReports, intake: Intake, rows: list[Item], horizon_s: float) -> None:
    """Make the intake know the reports of these rows (in event-time order) that the
    lake held before the replay. The store remembers keys for the dedup horizon only
    (an hour before the latest report: the switch retries for 18 s), but a replay
    goes back further: a file replayed twice, or one overlapping what is stored, must
    not store a report again however old it is. Asked a part at a time, for the
    part's call ids and time span (and a horizon either side), from the lake's day
    partitions of that span: what is kept grows with a part, not with the files."""
    if held.empty or not rows:
        return
    call_ids = {row.call_id for row in rows if row.call_id is not None}
    if not call_ids:
        return
    keys = held.keys(call_ids, rows[0].ts - horizon_s, rows[-1].ts + horizon_s)
    # In runs of keys, each remembered until replay's event time is past its last.
    for start in range(0, len(keys), _REMEMBER_RUN):
        run = keys[start : start + _REMEMBER_RUN]
        intake.seen.add_batch([(call_id, serial) for call_id, serial, _ in run], run[-1][2])


def _detectfork_available() -> bool:
    from engine.apps.detectfork import available

    return available()


def replay(
    paths: Sequence[Path],
    settings: Settings,
    rules_dir: Path | None = None,
    *,
    detect_in_child: bool | None = None,
    part_rows: int = PART_ROWS,
    part_bytes: int = PART_BYTES,
    progress: Progress | None = None,
    views: ViewsFile | None = None,
    loading: DetectionProcess | None = None,
) -> ReplayReport:
    """Raises YamlFileError (before touching the store) when the rules are invalid.

    The files are read a part at a time (EventStream: `part_rows` rows of Parquet or
    JSON lines, `part_bytes` of CSV), in event-time order; what is stored and raised
    does not depend on the part sizes. `detect_in_child`: run detection in a forked
    process (see engine.apps.detectfork); by default wherever that is available and
    the files hold more than one batch. The alerts are the same either way.
    `views`: the process that writes the analysts' views file, started by the caller
    before its imports (by default started here); closed here. `loading`: the
    detection process the caller started before its imports (`start_loading`: it
    loads detection meanwhile), for these settings and rules; closed here. Given,
    detection runs there whatever `detect_in_child` says, unless the data dir asks
    for detection to be loaded again in this process (then as `detect_in_child`
    says)."""
    # Started first: it loads DuckDB while the rules load, and is told what to write
    # once the lake is prepared (nothing, if the replay stops before).
    views = views or ViewsFile()
    try:
        pipeline = restored = None
        if loading is not None:
            restored = loading.ready()
        elif settings.detection.enabled:
            pipeline = make_pipeline(settings.detection, rules_dir)
        stream = EventStream(paths, part_rows, part_bytes)
        if progress is None:
            progress = Progress(parquet_rows(paths))
        # The files are read while the store opens (polars leaves the interpreter lock
        # most of the time): nothing below needs the rows before the fork.
        reading = _ReadAhead(stream, PARTS_IN_FLIGHT)
        try:
            plan = _Detection(rules_dir, pipeline, loading, restored)
            return _replay(reading, stream, settings, plan, detect_in_child, progress, views)
        finally:
            reading.close()
            progress.close()
    finally:
        if loading is not None:
            loading.close()
        views.close()


@dataclass
class _Detection:
    """Where replay's detection runs: in this process (`pipeline`), or in the process
    started before the imports (`loading`, the state it `restored`), or nowhere."""

    rules_dir: Path | None
    pipeline: Pipeline | None
    loading: DetectionProcess | None
    restored: Restored | None


def _why_not_carry_on(plan: _Detection, writer: LakeWriter) -> str | None:
    """Why replay cannot carry on with the detection process started early from the
    state it restored, now that this process holds the data dir (None: it can). It
    can when nothing is to be fed again from the lake or the journal and the data dir's
    snapshot is still the one it read; else detection is loaded here, restored and
    caught up as the lake writer does at its start."""
    assert plan.loading is not None and plan.loading.snapshot_file is not None
    snapshot_file = plan.loading.snapshot_file
    if next(iter(sealed_segments(writer.journal_dir)), None) is not None:
        return "a run before this one left journal segments that are not in the lake"
    if plan.loading.snapshot_unusable:
        return "the detection snapshot could not be used (it is set aside here)"
    if plan.restored is None:
        if snapshot_file.exists():
            return "a detection snapshot was written since it was looked for"
        return None
    if not plan.restored.still_current(snapshot_file):
        return "the detection snapshot changed since it was read"
    if writer.keys.max_seq > plan.restored.position.seq:
        return "the lake holds reports after the detection snapshot"
    return None


def _replay(
    reading: _ReadAhead,
    stream: EventStream,
    settings: Settings,
    plan: _Detection,
    detect_in_child: bool | None,
    progress: Progress,
    views: ViewsFile,
) -> ReplayReport:
    def rebuild_keys() -> None:
        # What the lake writer process does at its start, here: replay is the lake writer.
        lock = lake_writer_lock(settings.store.data_dir)
        lock.acquire(wait_s=300)
        try:
            # The views file is the writer's below.
            LakeWriter(
                settings.store.data_dir,
                dedup_horizon_s=settings.store.dedup_horizon_s,
                publish_views=False,
            )
        finally:
            lock.release()

    # Replay answers nobody: one fsync per large batch, no preallocated segments.
    store, intake, stats = open_store(
        settings,
        settings_codec(settings),
        unkeyed_quota=False,
        live=False,
        refresh_keys=rebuild_keys,
    )
    parts = iter(reading)
    writer_lock = lake_writer_lock(settings.store.data_dir)
    writer_lock.acquire(wait_s=300)
    report = ReplayReport(stats, file_errors=stream.errors)
    written = DrainResult(rejects=[])
    pipeline = plan.pipeline
    detection: DetectionProcess | None = None
    held: HeldReports | None = None
    try:
        writer = LakeWriter(
            settings.store.data_dir,
            compact_target_bytes=settings.store.compact_target_bytes,
            pipeline=pipeline,
            dedup_horizon_s=settings.store.dedup_horizon_s,
            publish_views=False,
        )
        # The analysts' views file is written by a process of its own while this one
        # replays. Making a view reads the files it names then: new ones may come
        # meanwhile (each whole, renamed into place), but none may go, so compaction,
        # which removes the files it merged, waits for it.
        views.publish(writer.lake.data_dir, writer.lake.view_statements())
        if plan.loading is not None:
            why_not = _why_not_carry_on(plan, writer)
            if why_not is None:
                detection = plan.loading
                if plan.restored is not None:
                    writer.position = plan.restored.position
                    log.info(
                        "detection state restored (up to report %d; %d rules and models)",
                        plan.restored.position.seq,
                        plan.restored.count,
                    )
            else:
                log.info("detection loaded again in this process: %s", why_not)
                plan.loading.close()
                pipeline = make_pipeline(settings.detection, plan.rules_dir)
                writer.attach(pipeline)
        if detection is not None:
            evicted_before = detection.evictions
        else:
            evicted_before = evictions(pipeline) if pipeline is not None else Evictions()

        def drain() -> None:
            result = writer.drain(collect_rejects=True)
            written.reports += result.reports
            written.calls += result.calls
            written.alerts.extend(result.alerts)
            assert written.rejects is not None
            written.rejects.extend(result.rejects or [])

        # Segments handed to the detection process and not yet in the lake, in order.
        group: list[tuple[int, list[Step]]] = []

        def write_group(segments: int) -> None:
            assert detection is not None
            writer.write_group(group[:segments], detection.result, written)
            del group[:segments]

        def hand_over(segment: int | None, steps: list[Step]) -> None:
            if segment is None:
                # Each commit above writes a frame, so sealing finds one; without its
                # segment, what detection was given would be out of step with the lake.
                raise StoreError("the journal had nothing to seal after a commit")
            if detection is None:
                # The lake writer takes the batch as it is, rather than reading back and
                # decoding the JSON just written: the same reports, in the same order.
                writer.prime(segment, steps)
                drain()
                return
            group.append((segment, steps))
            if len(group) >= GROUP_SEGMENTS + SEGMENTS_AHEAD:
                write_group(GROUP_SEGMENTS)

        # Anything a crashed run left sealed goes first, as it would under serve.
        drain()
        # What the lake holds now is what a row read may be a copy of (the rows this
        # replay writes are known to the intake while they matter: its dedup horizon).
        held = HeldReports(writer.lake)
        first = next(parts, None)
        second = next(parts, None) if first is not None else None
        if detect_in_child is None:
            # One batch or less: nothing to do side by side (nor the fork's module to load).
            detect_in_child = (
                second is not None or (first is not None and len(first) > REPLAY_BATCH)
            ) and _detectfork_available()
        if pipeline is not None and detect_in_child:
            from engine.apps.detectfork import DetectionProcess

            # Detection's state is whole (restored, leftovers fed): its process starts now.
            detection = DetectionProcess(pipeline, writer.snapshot_file)
        size = min(REPLAY_BATCH, settings.store.max_pending_reports)
        done = 0
        last_ts: float | None = None
        pending: list[Item] = []

        def store_batch(rows: list[Item]) -> None:
            intake.offer_read(rows, record_of)
            batch = intake.seal()
            if batch is None:
                return
            if set(map(type, batch.records)) == {CallEvent}:
                stored = batch.records  # reports only, the usual batch
            else:
                stored = [r if type(r) is CallEvent else item_of(r) for r in batch.records]
            if detection is not None:
                # Before the reports are journaled: the detection process works on them
                # meanwhile. Nothing it finds reaches the lake before they are journaled.
                detection.submit([(batch.first_seq, pack_events(stored))])
            store.commit(JSON_RECORDS, batch.first_seq, json_payload(batch.records))
            intake.durable(batch)
            hand_over(store.seal(), [(batch.first_seq, stored)])

        # Held only until taken: a part is let go once stored.
        ahead = [part for part in (first, second) if part is not None]
        first = second = None

        def each_part() -> Iterator[list[Item]]:
            while ahead:
                yield ahead.pop(0)
            yield from parts

        for part in each_part():
            _remember_stored(held, intake, part, settings.store.dedup_horizon_s)
            last_ts = part[-1].ts if last_ts is None else max(last_ts, part[-1].ts)
            # Batches of `size` rows across parts: the same batches whatever the parts.
            if pending:
                pending.extend(part)
            else:
                pending = part
            taken = 0
            while len(pending) - taken >= size:
                store_batch(pending[taken : taken + size])
                taken += size
                done += size
                progress.at(done, len(written.alerts))
            pending = pending[taken:]
        if pending:
            store_batch(pending)
            done += len(pending)
            progress.at(done, len(written.alerts))
            pending = []
        report.read = stream.rows
        report.late = stream.late
        if last_ts is not None:
            # End of input: move event time past the last Bye's settling time, as a
            # quiet switch's ticks would, so the calls that ended are finished.
            until = last_ts + settings.detection.settle_s
            if detection is not None:
                detection.submit([until])
            store.commit(TICK, 0, tick_payload(until))
            hand_over(store.seal(), [until])
        if detection is None:
            views.wait()
            writer.compact()
            writer.snapshot()
        else:
            # The child writes its state once it has detected the last segment, while
            # this process writes the lake; it takes effect after (end_snapshot).
            if detection.snapshot_file is not None:
                detection.begin_snapshot(writer.position_after(group))
            detection.finish()
            if group:
                write_group(len(group))
            views.wait()
            writer.compact()
            if detection.snapshot_file is not None:
                detection.end_snapshot()
    finally:
        if held is not None:
            held.close()
        if detection is not None:
            detection.close()
        views.close()  # done with the data dir before its lock goes
        store.close()
        writer_lock.release()
    report.stored = written.reports
    report.calls = written.calls
    report.alerts = written.alerts
    report.rejects = written.rejects or []
    report.duplicates = stats.duplicates
    if detection is not None:
        report.evicted = detection.evictions.since(evicted_before)
    elif pipeline is not None:
        report.evicted = evictions(pipeline).since(evicted_before)
    return report
