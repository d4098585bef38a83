"""What detection's bounds cost, for the processes that report it: light, so that one
which does not detect (replay's parent, its detection in a process of its own) can."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from engine.detect.pipeline import Pipeline


class Evictions(NamedTuple):
    """Entities dropped from rule state at `max_keys_per_rule`, and calls in progress
    finished early at `max_open_calls`, so far."""

    keys: int = 0
    calls: int = 0

    def since(self, before: Evictions) -> Evictions:
        return Evictions(self.keys - before.keys, self.calls - before.calls)


def evictions(pipeline: Pipeline) -> Evictions:
    return Evictions(
        sum(rule.state.evicted for rule in pipeline.rules.rules),
        pipeline.tracker.stats.evicted_calls,
    )
