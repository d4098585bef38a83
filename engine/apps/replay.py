"""`callsentry replay`: event files through the same intake, journal, lake writer and
detection pipeline as live traffic, minus the socket. Rows are taken in event-time order."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from engine.apps.detectfork import DetectionProcess, StepSpec, skipped_bitmap
from engine.apps.detectfork import available as detectfork_available
from engine.apps.lakewriter import make_pipeline
from engine.apps.settings import Settings
from engine.apps.stores import open_store, settings_codec
from engine.core.events import CallEvent, Reject
from engine.detect.alerts import Alert
from engine.ingest.eventfiles import read_event_files
from engine.ingest.intake import Intake
from engine.ingest.journal import JSON_RECORDS, TICK, json_payload, tick_payload
from engine.ingest.records import Item, item_of, record_of
from engine.ingest.stats import Stats
from engine.ingest.store import EventStore, StoreError, lake_writer_lock
from engine.lake.parquet import Lake
from engine.lake.writer import DrainResult, Evictions, LakeWriter, Step, evictions

log = logging.getLogger(__name__)

# Replay commits in large batches: one fsync per this many rows.
REPLAY_BATCH = 20_000
# With detection in a second process, this many journal segments (a million
# reports) are written to the lake as one group (LakeWriter.write_group): the
# journal keeps them until then, and a crash redoes at most that much.
GROUP_SEGMENTS = 50
PROGRESS_EVERY_S = 10.0
_REMEMBER_RUN = 10_000


class Progress:
    """A log line every PROGRESS_EVERY_S seconds of a long replay: how far, how fast."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.started = self.last = time.monotonic()

    def at(self, done: int, alerts: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        log.info(
            "replay: %d of %d rows (%.0f %%), %.0f rows/s, %d alerts so far",
            done,
            self.rows,
            100 * done / self.rows,
            done / (now - self.started),
            alerts,
        )


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

    @property
    def clean(self) -> bool:
        return not self.rejects and not self.file_errors


def _remember_stored(lake: Lake, intake: Intake, items: list[Item], horizon_s: float) -> None:
    """Make the intake know the reports of these rows that the lake holds. The store
    remembers keys for the dedup horizon only (an hour before the latest report: the
    switch retries for 18 s), but a replay goes back further: a file replayed twice,
    or one overlapping what is stored, must not store a report again however old it
    is. Only the rows' own call ids are looked up, so what is kept grows with the
    files, not with the lake."""
    if not lake.holds_reports():
        # A new data dir: nothing to ask DuckDB (a query costs more than the first
        # segment's journaling, and the detection process waits for that segment).
        return
    span = (items[0].ts - horizon_s, items[-1].ts + horizon_s)
    stored = (
        "SELECT call_id, serial, ts FROM events WHERE ts BETWEEN to_timestamp(?) AND "
        "to_timestamp(?) UNION ALL SELECT call_id, serial, ts FROM rejects WHERE ts BETWEEN "
        "to_timestamp(?) AND to_timestamp(?) AND call_id IS NOT NULL"
    )
    if not lake.query(f"SELECT count(*) FROM ({stored})", span * 2)[0][0]:
        return  # nothing stored from then: the usual replay into a new data dir
    call_ids = sorted({item.call_id for item in items if item.call_id is not None})
    rows = lake.query(
        f"SELECT call_id, serial, epoch_us(ts) / 1e6 AS t FROM ({stored}) "
        "WHERE call_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY t",
        (*span, *span, call_ids),
    )
    # In runs of keys, each remembered until replay's event time is past its last.
    for start in range(0, len(rows), _REMEMBER_RUN):
        run = rows[start : start + _REMEMBER_RUN]
        intake.seen.add_batch([(call_id, serial) for call_id, serial, _ in run], run[-1][2])


def replay(
    paths: Sequence[Path],
    settings: Settings,
    rules_dir: Path | None = None,
    *,
    detect_in_child: bool | None = None,
) -> ReplayReport:
    """Raises YamlFileError (before touching the store) when the rules are invalid.

    `detect_in_child`: run detection in a forked process (see engine.apps.detectfork);
    by default wherever that is available and the files hold more than one batch.
    The alerts are the same either way."""
    pipeline = None
    if settings.detection.enabled:
        pipeline = make_pipeline(settings.detection, rules_dir)
    opened: list[tuple[EventStore, Intake, Stats]] = []

    def rebuild_keys() -> None:
        # What the lake writer process does at its start, here: replay is the lake writer.
        lock = lake_writer_lock(settings.store.data_dir)
        lock.acquire(wait_s=300)
        try:
            LakeWriter(settings.store.data_dir, dedup_horizon_s=settings.store.dedup_horizon_s)
        finally:
            lock.release()

    def open_the_store() -> None:
        # Replay answers nobody: one fsync per large batch, no preallocated segments.
        opened.append(
            open_store(
                settings,
                settings_codec(settings),
                unkeyed_quota=False,
                live=False,
                refresh_keys=rebuild_keys,
            )
        )

    # The store opens while polars reads and checks the files (both leave the
    # interpreter lock most of the time): nothing below needs the rows before the fork.
    items, file_errors = read_event_files(paths, meanwhile=open_the_store)
    store, intake, stats = opened[0]
    writer_lock = lake_writer_lock(settings.store.data_dir)
    writer_lock.acquire(wait_s=300)
    report = ReplayReport(stats, read=len(items), file_errors=file_errors)
    writer = LakeWriter(
        settings.store.data_dir,
        compact_target_bytes=settings.store.compact_target_bytes,
        pipeline=pipeline,
        dedup_horizon_s=settings.store.dedup_horizon_s,
    )
    written = DrainResult(rejects=[])
    evicted_before = evictions(pipeline) if pipeline is not None else Evictions()

    def drain() -> None:
        result = writer.drain(collect_rejects=True)
        written.reports += result.reports
        written.calls += result.calls
        written.alerts.extend(result.alerts)
        assert written.rejects is not None
        written.rejects.extend(result.rejects or [])

    detection: DetectionProcess | None = None
    # Segments handed to the detection process and not yet in the lake, in order.
    group: list[tuple[int, list[Step]]] = []
    # Rows (from the first) of the segments handed over; of the groups in the lake,
    # which this process needs no more; and of those, how many it has let go.
    handed_over = in_lake = freed = 0

    def detected() -> tuple[dict[str, list[Any]], list[Alert]]:
        # Before waiting for the detection process, let go of rows an earlier group
        # put in the lake, in shares that are all gone by the group's last answer, so
        # freeing them overlaps the detection process's work rather than following it.
        nonlocal freed
        assert detection is not None
        if freed < in_lake:
            share = -(-(in_lake - freed) // max(detection.outstanding, 1))
            end = min(in_lake, freed + max(share, REPLAY_BATCH))
            items[freed:end] = cast(list[Item], [None] * (end - freed))
            freed = end
        return detection.result()

    def write_group() -> None:
        nonlocal in_lake
        writer.write_group(group, detected, written)
        group.clear()
        in_lake = handed_over

    def detect(specs: list[StepSpec]) -> None:
        # Before the reports are journaled: the detection process works on them
        # meanwhile. Nothing it finds reaches the lake before they are in the journal.
        if detection is not None:
            detection.submit(specs)

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
        if len(group) >= GROUP_SEGMENTS:
            write_group()

    try:
        # Anything a crashed run left sealed goes first, as it would under serve.
        drain()
        if detect_in_child is None:
            # One batch or less: nothing to do side by side.
            detect_in_child = detectfork_available() and len(items) > REPLAY_BATCH
        # The rows of written groups are let go (see `detected`): the last one's time now.
        last_ts = items[-1].ts if items else 0.0
        if pipeline is not None and detect_in_child:
            # Detection's state is whole (restored, leftovers fed): its process starts
            # now, and this one finds out meanwhile what the lake holds already.
            detection = DetectionProcess(pipeline, items, writer.snapshot_file)
        if items:
            _remember_stored(writer.lake, intake, items, settings.store.dedup_horizon_s)
        size = min(REPLAY_BATCH, settings.store.max_pending_reports)
        progress = Progress(len(items))
        for start in range(0, len(items), size):
            progress.at(start, len(written.alerts))
            rows = items[start : start + size]
            intake.offer_read(rows, record_of)
            batch = intake.seal()
            if batch is None:
                continue
            if set(map(type, batch.records)) == {CallEvent}:
                stored = batch.records  # reports only, the usual batch
            else:
                stored = [r if type(r) is CallEvent else item_of(r) for r in batch.records]
            if detection is not None:
                skipped = skipped_bitmap(rows, stored)
                detect([(batch.first_seq, start, start + len(rows), skipped)])
            store.commit(JSON_RECORDS, batch.first_seq, json_payload(batch.records))
            intake.durable(batch)
            handed_over = start + len(rows)
            hand_over(store.seal(), [(batch.first_seq, stored)])
        if items:
            # End of input: move event time past the last Bye's settling time, as a
            # quiet switch's ticks would, so the calls that ended are finished.
            # The rows are in event-time order: the last is the latest.
            until = last_ts + settings.detection.settle_s
            detect([until])
            store.commit(TICK, 0, tick_payload(until))
            hand_over(store.seal(), [until])
        if detection is None:
            writer.compact()
            writer.snapshot()
        else:
            # The child writes its state once it has detected the last segment, while
            # this process writes the lake; it takes effect after (end_snapshot).
            if writer.snapshot_file is not None:
                detection.begin_snapshot(writer.position_after(group))
            detection.finish()
            if group:
                write_group()
            writer.compact()
            if writer.snapshot_file is not None:
                detection.end_snapshot()
    finally:
        if detection is not None:
            detection.close()
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
