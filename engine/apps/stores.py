"""The event store and its intake, opened as `serve` and `replay` open them (the one
place both wire it: recovery, the dedup keys it brings back, the intake's bounds)."""

from __future__ import annotations

from collections.abc import Callable

from engine.apps.settings import Settings
from engine.ingest.codec import Codec, build_codec
from engine.ingest.intake import Intake, SeenReports
from engine.ingest.stats import Stats
from engine.ingest.store import EventStore

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
    on_durable: Callable[[int, int, int], None] | None = None,
) -> tuple[EventStore, Intake, Stats]:
    """The store and an intake primed from it (next seq, keys within the dedup horizon).
    `live`: for the receiver, whose answers wait for each commit's fsync.
    `refresh_keys`: see EventStore.open. `on_durable`: see Journal.on_durable."""
    store_settings = settings.store
    store = EventStore(
        store_settings.data_dir,
        codec,
        fsync=store_settings.fsync,
        dedup_horizon_s=store_settings.dedup_horizon_s,
        preallocate=live and store_settings.preallocate_journal,
    )
    store.journal.on_durable = on_durable
    recovery = store.open(refresh_keys)
    store.journal.head_seq = recovery.next_seq - 1
    store.journal.announce()
    stats = Stats()
    # Live, the keys held are bounded; a replay keeps every key its files need (a
    # copy of a row a month back in them must still be known).
    seen = SeenReports(
        store_settings.dedup_horizon_s, store_settings.max_dedup_keys if live else None
    )
    # In runs, each remembered until event time is past the latest of its run: one
    # entry per run rather than per key (recovery can bring back millions).
    for recent in recovery.recent_keys.runs():
        for start in range(0, len(recent), _RECOVERED_RUN):
            run = recent[start : start + _RECOVERED_RUN]
            seen.add_batch(
                [(call_id, serial) for call_id, serial, _ in run], max(t for *_, t in run)
            )
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
