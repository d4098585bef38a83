"""Faults of the machine under the engine: a file system that fills up, then has room again.

The disk is a real one: a small tmpfs mounted for the test (root only; skipped, saying
why, where mounting is not permitted), filled to the last byte by a file that is then
deleted.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from engine.apps.detectors import make_pipeline
from engine.apps.lakewriter import LakeWriterProcess
from engine.core.events import CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.journal import DATAGRAMS, datagram_payload, sealed_segments
from engine.ingest.stats import SharedCounters, Stats
from engine.ingest.store import EventStore
from engine.lake.writer import LakeWriter
from tests.conftest import make_settings, wait_for

T0 = 1795860000.0
CODEC = Vos3000TextCodec()
SEGMENTS = 6
CALLS_PER_SEGMENT = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB file system of its own, mounted at a folder under tmp_path."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "needs a small file system of its own: mounting a tmpfs is not permitted here "
            f"(root with CAP_SYS_ADMIN only): {mounted.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """A file taking every free byte of the file system under `folder`."""
    filler = folder / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as out:
        while block:
            try:
                out.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                block = block[: len(block) // 2]
    return filler


def call_reports(n: int) -> list[CallEvent]:
    """A short answered call (caller by n, a few callers calling often)."""
    ts = T0 + 5 * n
    call_id, caller = f"call-{n}", f"10{n % 3}"
    return [
        CallEvent(ts, call_id, 1, CallState.RINGING, 180, caller, "200", "", "7", "m"),
        CallEvent(ts + 1, call_id, 2, CallState.ANSWERED, 200, caller, "200", "", "7", "m"),
        CallEvent(ts + 2, call_id, 3, CallState.HANGUP, None, caller, "200", "", "7", "m"),
    ]


def journal_segments(data_dir: Path) -> int:
    """SEGMENTS sealed journal segments of answered reports; returns how many reports."""
    store = EventStore(data_dir, CODEC)
    store.open()
    seq = 1
    for segment in range(SEGMENTS):
        reports = [
            report
            for n in range(segment * CALLS_PER_SEGMENT, (segment + 1) * CALLS_PER_SEGMENT)
            for report in call_reports(n)
        ]
        datagrams = [(r.ts, "127.0.0.1:5060", CODEC.encode(r)) for r in reports]
        store.commit(DATAGRAMS, seq, datagram_payload(datagrams))
        store.seal()
        seq += len(reports)
    store.close()
    return seq - 1


def lake_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


class Clock:
    """The lake writer's monotonic clock, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_disk_holds_lake_writes_back_said_once_and_counted_then_they_resume(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(small_disk / "data", detection={"models_enabled": False})
    # The same segments with room to spare: what detection and the lake must come to.
    reference_dir = tmp_path / "reference"
    journal_segments(reference_dir)
    reference_pipeline = make_pipeline(settings.detection)
    reference = LakeWriter(reference_dir, pipeline=reference_pipeline, snapshots=False).drain()

    data_dir = small_disk / "data"
    answered = journal_segments(data_dir)
    counters = SharedCounters.create(mp.get_context("spawn"))
    clock = Clock()
    pipeline = make_pipeline(settings.detection)
    writer = LakeWriter(data_dir, counters=counters, pipeline=pipeline, clock=clock)
    filler = fill(small_disk)

    with caplog.at_level(logging.INFO, logger="engine.lake.writer"):
        writer.drain_logged()
        assert counters.get("flush_failures") == 1
        # Backing off: asked again at once (the loop polls every 0.2 s), it does not try.
        for _ in range(50):
            writer.drain_logged()
        assert counters.get("flush_failures") == 1
        clock.now += writer.writes.pause_s
        writer.drain_logged()
        assert counters.get("flush_failures") == 2
        assert writer.writes.pause_s == 2 * writer.writes.first_pause_s
        # Nothing answered is lost meanwhile, nor left half written to fill the disk.
        assert len(sealed_segments(data_dir / "journal")) == SEGMENTS
        assert not list(data_dir.rglob("*.partial"))

        filler.unlink()
        writer.drain_logged()
        assert counters.get("flush_failures") == 2, "not before its pause is over"
        clock.now += writer.writes.pause_s
        writer.drain_logged()

        # Detection's snapshot, on a disk full again: none half written, the old one stays.
        filler = fill(small_disk)
        assert writer.snapshot() is False
        assert not list(data_dir.rglob("*.partial"))
        filler.unlink()
        assert writer.snapshot() is True

    said = [r for r in caplog.records if r.name == "engine.lake.writer"]
    failed = [r.getMessage() for r in said if "lake write failed" in r.getMessage()]
    assert len(failed) == 1 and "No space left on device" in failed[0]
    again = [r.getMessage() for r in said if "lake write works again" in r.getMessage()]
    assert again == ["lake write works again (2 failed tries in 3 s)"]
    assert sum("detection snapshot failed" in r.getMessage() for r in said) == 1
    assert sum("detection snapshot works again" in r.getMessage() for r in said) == 1
    assert not any(r.exc_info for r in caplog.records), "no traceback"

    assert counters.get("flush_failures") == 2
    assert "flush_failures=2" in Stats(lake=counters).line().split()  # serve's stats line
    assert counters.get("flushed") == answered
    assert not sealed_segments(data_dir / "journal")
    # Every report in the lake once, and detection fed each once: what it made is what
    # the run with room to spare made.
    assert lake_rows(
        data_dir, "SELECT count(*), count(DISTINCT (call_id, serial)) FROM events"
    ) == [(answered, answered)]
    assert pipeline.tracker.stats == reference_pipeline.tracker.stats
    assert lake_rows(data_dir, "SELECT count(*) FROM calls") == [(reference.calls,)]
    assert reference.calls > 0 and reference.alerts
    alerts = lake_rows(data_dir, "SELECT rule_id, entity, raised_at FROM alerts ORDER BY ALL")
    assert alerts == lake_rows(
        reference_dir, "SELECT rule_id, entity, raised_at FROM alerts ORDER BY ALL"
    )


def test_the_last_pass_before_the_lake_writer_exits_does_not_wait_out_the_pause(
    small_disk: Path,
) -> None:
    # serve stopping just after room came back: what is sealed goes to the lake now
    # (or stays in the journal for the next start if the disk is still full).
    data_dir = small_disk / "data"
    answered = journal_segments(data_dir)
    counters = SharedCounters.create(mp.get_context("spawn"))
    writer = LakeWriter(data_dir, counters=counters, snapshots=False, clock=Clock())
    filler = fill(small_disk)
    writer.drain_logged()
    writer.drain_logged(last=True)
    assert counters.get("flush_failures") == 2, "tried at once, and failed: still full"
    filler.unlink()
    writer.drain_logged()
    assert counters.get("flushed") == 0, "backing off"
    writer.drain_logged(last=True)
    assert counters.get("flushed") == answered
    assert not sealed_segments(data_dir / "journal")


def test_a_compaction_the_disk_has_no_room_for_leaves_the_segments_and_no_plan(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = small_disk / "data"
    answered = journal_segments(data_dir)
    writer = LakeWriter(data_dir, snapshots=False)
    writer.drain()
    files = sorted(p.name for p in (data_dir / "lake" / "events").rglob("seg-*.parquet"))
    assert len(files) == SEGMENTS
    filler = fill(small_disk)
    with caplog.at_level(logging.INFO, logger="engine.lake.writer"):
        writer.compact()
        writer.compact()
        assert sorted(p.name for p in (data_dir / "lake" / "events").rglob("seg-*")) == files
        assert not list(data_dir.rglob("*.partial"))
        assert not list(data_dir.rglob("compaction.intent.json"))
        filler.unlink()
        writer.compact()
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.lake.writer"]
    assert sum("compaction failed" in m for m in messages) == 1
    assert sum("compaction works again" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records), "no traceback"
    events = (data_dir / "lake" / "events").glob("day=2026-*/*.parquet")
    assert [p.name[:4] for p in events] == ["cmp-"]
    assert lake_rows(data_dir, "SELECT count(*) FROM events") == [(answered,)]


def test_a_lake_writer_started_on_a_full_disk_waits_for_room_rather_than_exit(
    small_disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # What serve's restart of a dead lake writer meets while the disk is full: it
    # waits, saying so once, instead of exiting and being started again every 2 s.
    data_dir = small_disk / "data"
    answered = journal_segments(data_dir)
    filler = fill(small_disk)
    process = LakeWriterProcess(make_settings(data_dir, detection={"enabled": False}))
    process.start()
    said: list[str] = []

    def heard(*texts: str) -> bool:
        said.append(capfd.readouterr().err)
        return any(text in "".join(said) for text in texts)

    try:
        # (A traceback: the process died, as it did before it waited for room.)
        wait_for(lambda: heard("lake writer start failed", "Traceback"), 60, "the start failing")
        assert "Traceback" not in "".join(said)
        process.check()  # serve's job every 2 s: the process is alive, nothing to restart
        assert process.restarts == 0
        filler.unlink()
        process.wait_for_keys()
    finally:
        process.stop()
    heard()
    log = "".join(said)
    assert log.count("lake writer start failed") == 1
    assert "No space left on device" in log
    assert log.count("lake writer start works again") == 1
    assert "Traceback" not in log and "exited with code" not in log
    assert process.counters.get("flushed") == answered
    assert lake_rows(data_dir, "SELECT count(*) FROM events") == [(answered,)]


def test_stopping_a_lake_writer_that_cannot_finish_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The writer ignores SIGTERM (the receiver decides when it stops), so a writer
    # that cannot finish (here: stopped by SIGSTOP) must be killed, not waited for:
    # multiprocessing joins a non-daemon child at exit, so serve would never exit.
    data_dir = tmp_path / "data"
    answered = journal_segments(data_dir)
    process = LakeWriterProcess(make_settings(data_dir, detection={"enabled": False}))
    process.wait_for_keys()
    child = process._process
    os.kill(child.pid, signal.SIGSTOP)
    process.stop(timeout=0.5)
    assert child.exitcode == -signal.SIGKILL
    assert "killed it, sealed segments stay for next start" in caplog.text
    # What it had not written is written by the next start.
    again = LakeWriterProcess(make_settings(data_dir, detection={"enabled": False}))
    again.wait_for_keys()
    try:
        wait_for(
            lambda: lake_rows(data_dir, "SELECT count(*) FROM events") == [(answered,)],
            60,
            "the journal written",
        )
    finally:
        again.stop()


def test_a_replay_onto_a_full_disk_says_so_in_one_line(small_disk: Path, tmp_path: Path) -> None:
    from engine.simulator.scenario import generate, load_scenario, write_files

    events, _ = write_files(
        generate(load_scenario(Path("data/scenarios/fraud-mix.yaml"))), tmp_path / "scenario"
    )
    # Room for the data dir to open, not for the journal of these reports.
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size - (512 << 10))
    assert events.stat().st_size > 1 << 20
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "replay",
            str(events),
            "--data-dir",
            str(small_disk / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "replay stopped: cannot write to" in done.stderr, done.stderr[-2000:]
