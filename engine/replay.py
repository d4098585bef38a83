"""`callsentry replay`: event files through the same intake, journal and lake writer as
live traffic, minus the socket. Rows are taken in event-time order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Settings
from engine.eventfiles import read_event_files
from engine.events import Reject
from engine.journal import JSON_RECORDS, json_payload
from engine.lake import record_of
from engine.lakewriter import ItemListener, LakeWriter
from engine.service import open_store, settings_codec
from engine.stats import Stats

log = logging.getLogger(__name__)

# Replay commits in large batches: one fsync per this many rows.
REPLAY_BATCH = 20_000


@dataclass
class ReplayReport:
    stats: Stats
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    rejects: list[Reject] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.rejects and not self.file_errors


def replay(
    paths: Sequence[Path], settings: Settings, on_items: ItemListener | None = None
) -> ReplayReport:
    items, file_errors = read_event_files(paths)
    store, intake, stats = open_store(settings, settings_codec(settings), unkeyed_quota=False)
    report = ReplayReport(stats, read=len(items), file_errors=file_errors)
    writer = LakeWriter(
        settings.store.data_dir,
        compact_target_bytes=settings.store.compact_target_bytes,
        on_items=on_items,
    )
    try:
        # Anything a crashed run left sealed goes first, as it would under serve.
        writer.drain()
        size = min(REPLAY_BATCH, settings.store.max_pending_reports)
        for start in range(0, len(items), size):
            for item in items[start : start + size]:
                intake.offer(item.key, None, record_of(item), item.ts)
            batch = intake.seal()
            if batch is None:
                continue
            store.commit(JSON_RECORDS, batch.first_seq, json_payload(batch.records))
            intake.durable(batch)
            store.seal()
            result = writer.drain(collect_rejects=True)
            report.stored += result.reports
            report.rejects.extend(result.rejects or [])
        writer.compact()
    finally:
        store.close()
    writer.drain()
    report.duplicates = stats.duplicates
    return report
