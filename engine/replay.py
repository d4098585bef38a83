"""`callsentry replay`: event files through the same intake, store and pipeline as live
traffic, minus the socket. Rows are taken in event-time order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.codec import Decoded
from engine.config import Settings
from engine.eventfiles import read_event_files
from engine.events import Reject
from engine.ingest import Outcome
from engine.receiver import BatchListener
from engine.service import open_store
from engine.stats import Stats

log = logging.getLogger(__name__)

# Replay commits in large batches: one fsync per this many rows.
REPLAY_BATCH = 20_000


@dataclass
class ReplayReport:
    stats: Stats
    read: int = 0
    duplicates: int = 0
    rejects: list[Reject] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.rejects and not self.file_errors


def replay(
    paths: Sequence[Path], settings: Settings, on_durable: BatchListener | None = None
) -> ReplayReport:
    items, file_errors = read_event_files(paths)
    store, intake, stats = open_store(settings)
    report = ReplayReport(stats, read=len(items), file_errors=file_errors)
    try:
        size = min(REPLAY_BATCH, settings.store.max_pending_reports)
        for start in range(0, len(items), size):
            for item in items[start : start + size]:
                outcome, _ = intake.offer(Decoded(item, None))
                if isinstance(item, Reject) and outcome is Outcome.ACCEPTED:
                    report.rejects.append(item)
            batch = intake.seal()
            if batch is None:
                continue
            store.commit(batch.records)
            intake.durable(batch)
            if on_durable is not None:
                on_durable(batch.items)
        stats.flushed += store.flush()
    finally:
        store.close()
    report.duplicates = stats.duplicates
    return report
