"""The lake writer: sealed journal segments -> decoded reports -> Parquet lake.

It runs in a process of its own beside the receiver (`serve`), so decoding,
Parquet and compaction never hold the receiver's interpreter lock; `replay`
runs the same code inline. A segment is deleted only after its Parquet files
are durable; a crash in between is repaired on the next pass (the segment's
partial files are dropped and written again), so every report lands once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.synchronize
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from engine.events import CallEvent, Reject, RejectReason
from engine.journal import DATAGRAMS, read_segment, sealed_segments, segment_number
from engine.lake import Item, Lake, item_of
from engine.store import codec_of

log = logging.getLogger(__name__)

# Called with each segment's reports, in sequence order (the detection pipeline's seam).
ItemListener = Callable[[Sequence[Item]], None]

# Counters shared with the receiver's process for its metrics (one int64 each).
COUNTERS = (
    "flushed",
    "flushed_segments",
    "flush_failures",
    "compacted_files",
    *(f"rejected_{reason.value}" for reason in RejectReason),
)


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


@dataclass
class DrainResult:
    segments: int = 0
    reports: int = 0
    rejects: list[Reject] | None = None


class LakeWriter:
    def __init__(
        self,
        data_dir: Path,
        *,
        compact_target_bytes: int = 64 * 1024 * 1024,
        counters: SharedCounters | None = None,
        on_items: ItemListener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.lake = Lake(data_dir)
        self.journal_dir = data_dir / "journal"
        self.compact_target_bytes = compact_target_bytes
        self.counters = counters
        self.on_items = on_items
        self._failing = False

    def _count(self, name: str, value: int = 1) -> None:
        if self.counters is not None:
            self.counters.add(name, value)

    def prepare(self) -> None:
        self.lake.prepare()
        self.lake.publish_views()

    def decode_segment(self, path: Path) -> list[tuple[int, list[Item]]]:
        segment = read_segment(path)
        if segment.problem is not None:
            # The receiver seals only whole frames; a problem here is damage after the fact.
            log.error("journal %s: %s; reading the frames before it", path.name, segment.problem)
        codec = codec_of(segment.header)
        batches: list[tuple[int, list[Item]]] = []
        for frame in segment.frames:
            if frame.kind == DATAGRAMS:
                decode = codec.decode
                items: list[Item] = [
                    decode(raw, ts, source)[0] for ts, source, raw in frame.datagrams()
                ]
            else:
                items = [item_of(record) for record in frame.records()]
            batches.append((frame.first_seq, items))
        return batches

    def drain(self, collect_rejects: bool = False) -> DrainResult:
        """Write every sealed segment to the lake, oldest first."""
        result = DrainResult(rejects=[] if collect_rejects else None)
        for path in sealed_segments(self.journal_dir):
            number = segment_number(path)
            assert number is not None
            batches = self.decode_segment(path)
            # A crash may have left part of this segment's Parquet; write it whole again.
            self.lake.drop_segment(number)
            written = self.lake.write_segment(number, batches)
            path.unlink()
            result.segments += 1
            result.reports += written
            self._count("flushed", written)
            self._count("flushed_segments")
            for _, items in batches:
                for item in items:
                    if type(item) is not CallEvent:
                        reject: Reject = item  # type: ignore[assignment]
                        self._count(f"rejected_{reject.reason.value}")
                        if result.rejects is not None:
                            result.rejects.append(reject)
                if self.on_items is not None:
                    self.on_items(items)
        return result

    def drain_logged(self) -> None:
        try:
            self.drain()
        except OSError as error:
            self._count("flush_failures")
            if not self._failing:
                log.error("lake write failed (%s); the journal keeps the reports, retrying", error)
            self._failing = True
            return
        if self._failing:
            log.warning("lake writes work again")
            self._failing = False

    def compact(self) -> None:
        try:
            result = self.lake.compact(self.compact_target_bytes)
        except OSError as error:
            log.error("compaction failed (%s); will try again", error)
            return
        if result.written_files:
            self._count("compacted_files", result.merged_files)
            log.info(
                "compacted %d segments into %d files", result.merged_files, result.written_files
            )


def run(
    data_dir: str,
    compact_target_bytes: int,
    compact_interval_s: float,
    poll_interval_s: float,
    stop: multiprocessing.synchronize.Event,
    counters_array: Any,
    log_level: int,
) -> None:
    """The lake writer process: drain sealed segments until told to stop, then once more."""
    # The receiver decides when we stop (after sealing its last segment), so a
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut us short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    # Answers first: under CPU contention the receiver runs, and the lake (a few
    # seconds behind at most) catches up in the gaps.
    os.nice(10)
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    writer = LakeWriter(
        Path(data_dir),
        compact_target_bytes=compact_target_bytes,
        counters=SharedCounters(counters_array),
    )
    # Wall-clock housekeeping of the lake: drain sealed segments, compact.
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    scheduler.add_job(writer.drain_logged, "interval", seconds=poll_interval_s, id="drain")
    scheduler.add_job(writer.compact, "interval", seconds=compact_interval_s, id="compact")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler.start()
    try:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                log.error("the receiver is gone (killed?); writing what is sealed and exiting")
                break
    finally:
        scheduler.shutdown(wait=True)
    writer.drain_logged()


class LakeWriterProcess:
    """Starts, watches and stops the lake writer process for `serve`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        compact_target_bytes: int,
        compact_interval_s: float,
        poll_interval_s: float = 0.2,
    ) -> None:
        self._context = mp.get_context("spawn")
        self.counters = SharedCounters.create(self._context)
        self._stop = self._context.Event()
        self._args = (
            str(data_dir),
            compact_target_bytes,
            compact_interval_s,
            poll_interval_s,
        )
        self._process: Any = None
        self.restarts = 0

    def start(self) -> None:
        self._process = self._context.Process(
            target=run,
            args=(*self._args, self._stop, self.counters.array, logging.getLogger().level),
            name="callsentry-lake-writer",
            daemon=False,
        )
        self._process.start()

    def check(self) -> None:
        """Restart the writer if it died; sealed segments wait for it meanwhile."""
        if self._process is not None and not self._process.is_alive() and not self._stop.is_set():
            log.error("lake writer exited with code %s; restarting it", self._process.exitcode)
            self.restarts += 1
            self.start()

    def stop(self, timeout: float = 120.0) -> None:
        if self._process is None:
            return
        self._stop.set()
        self._process.join(timeout)
        if self._process.is_alive():
            log.error(
                "lake writer did not finish in %.0f s; sealed segments stay for next start", timeout
            )
            self._process.terminate()
            self._process.join(5)
        self._process = None
