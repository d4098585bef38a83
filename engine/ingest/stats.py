"""Outcome counters: plain integers on the hot path, read by Prometheus at scrape time.

A prometheus_client Counter takes a lock per increment; a datagram path that
counts several outcomes would pay that tens of thousands of times a second. So
the pipeline bumps attributes and a custom collector (engine.apps.health) reports
them when scraped; nothing here loads prometheus_client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.core.events import RejectReason

# The lake writer's counters, shared with the receiver's process for its metrics (one
# int64 each; the receiver only reads them).
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
    # The rule set: loads that swapped a set in (the first load and each reload) and
    # loads refused (a file invalid: the running set stays), the wall-clock time in
    # milliseconds of the last one that succeeded, and how many rules run. The
    # receiver sets `rules_running` to RULES_LOADING each time it starts a lake writer.
    "rule_loads",
    "rule_load_failures",
    "rule_last_load_ms",
    "rules_running",
)

# `rules_running` while a lake writer is starting and has not loaded its rules.
RULES_LOADING = -1
# `rules_running` when the rules it started with were invalid: detection is off.
RULES_INVALID = -2


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

    def set(self, name: str, value: int) -> None:
        self.array[COUNTERS.index(name)] = value


@dataclass
class Stats:
    received: int = 0
    stored: int = 0
    answered: int = 0
    # Answers the socket refused (send buffer full, sender unreachable); retried by the switch.
    answer_failures: int = 0
    duplicates: int = 0
    # Unkeyed rejects past the per-minute quarantine quota: counted, not stored.
    quarantine_overflow: int = 0
    dropped_sender: int = 0
    dropped_overload: int = 0
    dropped_shutdown: int = 0
    commits: int = 0
    store_stalls: int = 0
    store_failures: int = 0
    # Times the receiver stopped taking new reports because the lake writer was
    # more than store.max_lake_backlog reports behind.
    backlog_holds: int = 0
    # Keys of stored reports forgotten before the dedup horizon because
    # store.max_dedup_keys were held (a copy arriving after is stored again).
    dedup_forgotten_early: int = 0
    pending: int = 0
    # The lake writer's counters (another process), when it runs.
    lake: Any = None

    def lake_count(self, name: str) -> int:
        return int(self.lake.get(name)) if self.lake is not None else 0

    @property
    def flushed(self) -> int:
        return self.lake_count("flushed")

    @property
    def flush_failures(self) -> int:
        return self.lake_count("flush_failures")

    @property
    def calls(self) -> int:
        return self.lake_count("calls")

    @property
    def alerts(self) -> int:
        return self.lake_count("alerts")

    @property
    def evicted_keys(self) -> int:
        return self.lake_count("evicted_keys")

    @property
    def evicted_calls(self) -> int:
        return self.lake_count("evicted_calls")

    @property
    def lake_backlog(self) -> int:
        """Reports stored in the journal and not yet in the lake (read by analysts)."""
        return max(0, self.stored - self.flushed) if self.lake is not None else 0

    def rejected_by_reason(self) -> dict[str, int]:
        counts = {r.value: self.lake_count(f"rejected_{r.value}") for r in RejectReason}
        return {reason: count for reason, count in counts.items() if count}

    def line(self) -> str:
        rejected = sum(self.rejected_by_reason().values())
        return (
            f"received={self.received} stored={self.stored} answered={self.answered} "
            f"duplicates={self.duplicates} rejected={rejected} "
            f"quarantine_overflow={self.quarantine_overflow} "
            f"dropped_sender={self.dropped_sender} dropped_overload={self.dropped_overload} "
            f"store_stalls={self.store_stalls} store_failures={self.store_failures} "
            f"dedup_forgotten_early={self.dedup_forgotten_early} "
            f"flushed={self.flushed} flush_failures={self.flush_failures} "
            f"calls={self.calls} alerts={self.alerts} "
            f"pending={self.pending} lake_backlog={self.lake_backlog}"
        )


COUNTER_HELP = {
    "received": "Datagrams received, from any sender",
    "stored": "Reports made durable in the journal (events and quarantined rejects)",
    "answered": "Answers sent to the switch",
    "answer_failures": "Answers the socket could not send (the switch retries the report)",
    "duplicates": "Copies of an already accepted report (answered again, not processed)",
    "quarantine_overflow": "Unreadable datagrams counted but not stored (quota reached)",
    "dropped_sender": "Datagrams from senders outside the allow-list (unanswered)",
    "dropped_overload": "Reports left unanswered because the store was behind",
    "dropped_shutdown": "Reports left unanswered because the engine was stopping",
    "commits": "Group commits of the journal",
    "store_stalls": "Group commits slower than 100 ms",
    "store_failures": "Group commits that failed (disk full, read-only, I/O error)",
    "backlog_holds": "Times new reports were left unanswered because the lake writer was behind",
    "dedup_forgotten_early": (
        "Keys of stored reports forgotten before the dedup horizon (store.max_dedup_keys held)"
    ),
    "flushed": "Reports decoded and written to the Parquet lake",
    "flush_failures": "Lake writes that failed and will be retried",
    "calls": "Calls rebuilt and finished by the call tracker",
    "alerts": "Alerts raised (not counting shadow rules)",
    "evicted_keys": "Entities dropped from rule state because max_keys_per_rule was reached",
    "evicted_calls": "Calls in progress finished early because max_open_calls was reached",
}
