"""Where the detection snapshot lives in a data dir, and how one written beside it
takes effect: what a process that does not detect needs of it (replay's parent puts
in place the snapshot its detection process prepared). The format is
engine.detect.snapshot's."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "detection.snapshot"


def snapshot_path(data_dir: Path) -> Path:
    return data_dir / "state" / SNAPSHOT_NAME


def partial_path(path: Path) -> Path:
    """Where a snapshot is written before it takes effect."""
    return path.with_name(path.name + ".partial")


def put_in_place(path: Path) -> None:
    os.replace(partial_path(path), path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def set_aside(path: Path) -> str:
    """Move an unusable snapshot out of the way (kept for a look); returns its new name."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError as error:
        log.error("could not set the snapshot aside: %s", error)
    return aside.name
