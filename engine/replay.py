"""`callsentry replay`: event files through the same intake, journal, lake writer and
detection pipeline as live traffic, minus the socket. Rows are taken in event-time order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Settings
from engine.detect.alerts import Alert
from engine.eventfiles import read_event_files
from engine.events import CallEvent, Reject
from engine.journal import JSON_RECORDS, TICK, json_payload, tick_payload
from engine.lake import item_of, record_of
from engine.lakewriter import LakeWriter, make_pipeline
from engine.service import open_store, settings_codec
from engine.stats import Stats
from engine.store import lake_writer_lock

log = logging.getLogger(__name__)

# Replay commits in large batches: one fsync per this many rows.
REPLAY_BATCH = 20_000


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

    @property
    def clean(self) -> bool:
        return not self.rejects and not self.file_errors


def replay(
    paths: Sequence[Path], settings: Settings, rules_dir: Path | None = None
) -> ReplayReport:
    """Raises YamlFileError (before touching the store) when the rules are invalid."""
    pipeline = None
    if settings.detection.enabled:
        pipeline = make_pipeline(settings.detection, rules_dir)
    items, file_errors = read_event_files(paths)
    store, intake, stats = open_store(settings, settings_codec(settings), unkeyed_quota=False)
    writer_lock = lake_writer_lock(settings.store.data_dir)
    writer_lock.acquire(wait_s=300)
    report = ReplayReport(stats, read=len(items), file_errors=file_errors)
    writer = LakeWriter(
        settings.store.data_dir,
        compact_target_bytes=settings.store.compact_target_bytes,
        pipeline=pipeline,
    )

    def drain() -> None:
        result = writer.drain(collect_rejects=True)
        report.stored += result.reports
        report.calls += result.calls
        report.rejects.extend(result.rejects or [])
        report.alerts.extend(result.alerts)

    try:
        # Anything a crashed run left sealed goes first, as it would under serve.
        drain()
        size = min(REPLAY_BATCH, settings.store.max_pending_reports)
        for start in range(0, len(items), size):
            for item in items[start : start + size]:
                intake.offer(item.key, None, record_of(item), item.ts)
            batch = intake.seal()
            if batch is None:
                continue
            store.commit(JSON_RECORDS, batch.first_seq, json_payload(batch.records))
            intake.durable(batch)
            segment = store.seal()
            if segment is not None:
                # The lake writer takes the batch as it is, rather than reading back
                # and decoding the JSON just written: the same reports, in the same order.
                stored = [r if type(r) is CallEvent else item_of(r) for r in batch.records]
                writer.prime(segment, [(batch.first_seq, stored)])
            drain()
        if items:
            # End of input: move event time past the last Bye's settling time, as a
            # quiet switch's ticks would, so the calls that ended are finished.
            last = max(item.ts for item in items)
            store.commit(TICK, 0, tick_payload(last + settings.detection.settle_s))
            store.seal()
            drain()
        writer.compact()
        writer.snapshot()
    finally:
        store.close()
        writer_lock.release()
    report.duplicates = stats.duplicates
    return report
