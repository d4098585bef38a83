"""The relay's cursors and counters on disk: DATA_DIR/relay/state.json.

Written whole (a new file renamed into place) about twice a second and at stop, so
after `kill -9` delivery resumes from a cursor at most that old: what was answered
after it is sent again, nothing before it. It is fsync'd before held journal
segments are deleted on its strength (every few seconds) and at stop, so even a
power cut leaves no cursor pointing into a segment already gone. `callsentry relay status` reads
the same file, with or without a running engine.

    {"version": 1, "saved_at": 1795860000.0,
     "targets": {"billing": {"address": "10.1.2.50:8000", "cursor": 1234,
                             "segment": 17, "offset": 40960, "state": "up",
                             "sent": ..., "answered": ..., "retried": ..., "given_up": ...,
                             "given_up_horizon": ..., "bad_answers": ...,
                             "lag_reports": ..., "lag_seconds": ...}},
     "held": {"segments": 3, "bytes": 1048576}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.relay.feed import Position
from engine.relay.udp import COUNTERS, TargetCounters

VERSION = 1


class RelayStateError(Exception):
    """The state file cannot be read; the message says which and why."""


def state_path(data_dir: Path) -> Path:
    return data_dir / "relay" / "state.json"


@dataclass
class SavedTarget:
    address: str
    cursor: int
    position: Position
    counters: TargetCounters = field(default_factory=TargetCounters)


@dataclass
class RelayState:
    targets: dict[str, SavedTarget] = field(default_factory=dict)
    saved_at: float = 0.0
    held_segments: int = 0
    held_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        targets: dict[str, Any] = {}
        for name, saved in self.targets.items():
            counters = saved.counters
            targets[name] = {
                "address": saved.address,
                "cursor": saved.cursor,
                "segment": saved.position.segment,
                "offset": saved.position.offset,
                "state": "down" if counters.down else "up",
                **{
                    key: getattr(counters, key)
                    for key in COUNTERS
                    if key not in ("down", "lag_seconds")
                },
                "lag_seconds": round(counters.lag_seconds, 3),
            }
        return {
            "version": VERSION,
            "saved_at": self.saved_at,
            "targets": targets,
            "held": {"segments": self.held_segments, "bytes": self.held_bytes},
        }


def save_state(path: Path, state: RelayState, *, durable: bool = False) -> None:
    """Write the state whole (a new file renamed into place: a reader, or a `kill -9`,
    sees the old state or the new, never half of one). `durable`: fsync'd, file and
    folder, before returning; done before held segments are deleted on the strength of
    it. Otherwise the page cache keeps it across a crash of the process (not of the
    machine), and the answer path's disk is spared a filesystem journal commit twice a
    second."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    data = json.dumps(state.to_json(), indent=1).encode()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_state(path: Path) -> RelayState | None:
    """The saved state, None when there is none; RelayStateError when it is unreadable."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RelayStateError(f"{path}: {error.strerror}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"not a relay state of version {VERSION}")
        state = RelayState(saved_at=float(data.get("saved_at", 0.0)))
        held = data.get("held") or {}
        state.held_segments = int(held.get("segments", 0))
        state.held_bytes = int(held.get("bytes", 0))
        for name, item in dict(data["targets"]).items():
            counters = TargetCounters(
                **{
                    key: int(item.get(key, 0))
                    for key in COUNTERS
                    if key not in ("down", "lag_seconds")
                },
                lag_seconds=float(item.get("lag_seconds", 0.0)),
                down=item.get("state") == "down",
            )
            state.targets[str(name)] = SavedTarget(
                address=str(item["address"]),
                cursor=int(item["cursor"]),
                position=Position(int(item["segment"]), int(item["offset"])),
                counters=counters,
            )
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise RelayStateError(f"{path}: damaged relay state ({error})") from None
    return state
