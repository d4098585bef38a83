"""Where a reader of the journal has reached: the lake writer, and detection's state
(engine.detect.state's snapshots say up to which report they go)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """The last journal segment and report sequence taken."""

    segment: int
    seq: int
