"""The flags serve raises for the processes it started (engine.apps.flags): raised
across a real process boundary, and never waiting, whatever became of the process."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.apps.flags import FlagReader, ProcessFlag
from engine.apps.lakewriter import LakeWriterProcess
from engine.ingest.store import StoreError
from tests.conftest import make_settings, wait_for
from tests.test_faults import journal_segments, lake_rows


def _wait_then_say(reader: FlagReader, said: str) -> None:
    # Says whether the flag was up as the process began ("early"), then waits for it.
    Path(said + ".early").write_text("up" if reader.is_set() else "down")
    raised = reader.wait(60.0)
    Path(said).write_text("raised" if raised else "not raised")
    os._exit(0 if raised else 3)


def _read_for_ever(reader: FlagReader, ready: str) -> None:
    Path(ready).touch()
    while True:
        reader.wait(0.001)
        reader.is_set()
        reader.clear()


def _returns_within(seconds: float, work: object) -> bool:
    done = threading.Event()

    def run() -> None:
        work()  # type: ignore[operator]
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_a_flag_raised_here_is_seen_by_the_process_it_was_handed_to(tmp_path: Path) -> None:
    context = mp.get_context("spawn")  # as serve starts the lake writer and the relay
    flag = ProcessFlag(context, raised_when_gone=True)
    said = tmp_path / "said"
    child = context.Process(target=_wait_then_say, args=(flag.reader, str(said)))
    child.start()
    flag.handed_over()
    early = tmp_path / "said.early"
    wait_for(early.exists, 60, "the process started")
    assert early.read_text() == "down", "the flag was up before it was raised"
    assert child.is_alive()
    flag.set()
    child.join(30)
    assert child.exitcode == 0
    assert said.read_text() == "raised"
    flag.close()


def test_raising_a_flag_never_waits_for_a_process_killed_while_it_read_it(
    tmp_path: Path,
) -> None:
    # A multiprocessing.Event's set() waits for a sleeper killed in wait(), or for its
    # lock if the killed process held it: serve's stop would hang. Killed at any moment
    # of its reading, the reader holds nothing the raising end waits for.
    context = mp.get_context("fork")
    for attempt in range(5):
        flag = ProcessFlag(context, raised_when_gone=True)
        ready = tmp_path / f"ready-{attempt}"
        child = context.Process(target=_read_for_ever, args=(flag.reader, str(ready)))
        child.start()
        flag.handed_over()
        wait_for(ready.exists, 30, "the reader running")
        time.sleep(0.01 * attempt)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        assert _returns_within(5.0, flag.set), "raising the flag waited for a dead process"
        flag.close()


def test_a_flag_raised_many_times_unread_or_with_nobody_left_to_read_it_never_waits() -> None:
    context = mp.get_context("fork")
    flag = ProcessFlag(context, raised_when_gone=True)
    # More raises than a pipe holds (64 KiB on Linux), none read: the flag is up already.
    assert _returns_within(30.0, lambda: [flag.set() for _ in range(100_000)])
    assert flag.reader.is_set()
    flag.reader.clear()
    assert not flag.reader.is_set()
    flag.set()  # a raise after the clear counts
    assert flag.reader.wait(5.0)
    flag.reader.clear()
    # Nobody reads it any more: raising meets a closed pipe, and says nothing.
    flag.handed_over()
    flag.set()
    flag.close()


def test_a_stop_flag_whose_raising_end_is_gone_reads_as_raised_and_a_reload_flag_not() -> None:
    # The process that started this one ended: nothing more will be asked, so a
    # process told to stop by the flag stops (serve's processes also watch its pid),
    # and one that reloads its rules when asked is not asked again and again.
    context = mp.get_context("fork")
    for raised_when_gone in (True, False):
        flag = ProcessFlag(context, raised_when_gone=raised_when_gone)
        reader = flag.reader
        assert not reader.wait(0.05)
        flag._writer.close()  # as when serve is gone: the end this process reads stays
        assert reader.wait(5.0) is raised_when_gone
        assert reader.is_set() is raised_when_gone
        reader.clear()
        assert reader.is_set() is raised_when_gone
        started = time.monotonic()
        assert reader.wait(1.0) is raised_when_gone
        assert time.monotonic() - started < 0.5, "a gone end is looked at once, not waited on"
        reader.close()


def test_a_flag_raised_as_another_thread_replaces_it_reaches_the_old_pipe_or_none() -> None:
    # serve raises `reload` on a SIGHUP while its housekeeping may replace a writer that
    # died: a raise is written before the old pipe closes, or not at all after, never
    # into the new pipe that may take the old one's file descriptor number.
    context = mp.get_context("fork")
    for _ in range(50):
        old = ProcessFlag(context, raised_when_gone=False)
        raising = threading.Thread(target=lambda flag=old: [flag.set() for _ in range(200)])
        raising.start()
        old.close()
        new = ProcessFlag(context, raised_when_gone=False)
        raising.join()
        assert not new.reader.is_set(), "a raise meant for the old flag reached the new one"
        new.close()


def test_serve_stops_and_restarts_a_lake_writer_that_was_killed_mid_wait(tmp_path: Path) -> None:
    # Between its passes the writer waits on its stop flag: killed there, it is a
    # sleeper that an Event's set() would wait for. Stopping, and starting it again
    # and stopping that one, each take no longer than the writer's own last pass.
    data_dir = tmp_path / "data"
    answered = journal_segments(data_dir)
    process = LakeWriterProcess(make_settings(data_dir, detection={"enabled": False}))
    process.wait_for_keys()
    first = process._process
    os.kill(first.pid, signal.SIGKILL)
    first.join(30)
    assert _returns_within(30.0, process.reload_rules)
    process.check()  # serve's job every 2 s: the writer died, so it starts again
    assert process.restarts == 1
    process.wait_for_keys()
    assert process.alive()
    second = process._process
    assert _returns_within(60.0, process.stop)
    assert second.exitcode == 0
    assert lake_rows(data_dir, "SELECT count(*) FROM events") == [(answered,)]


def test_a_lake_writer_started_again_after_a_start_that_failed_gets_flags_of_its_own(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    answered = journal_segments(data_dir)
    process = LakeWriterProcess(make_settings(data_dir, detection={"enabled": False}))
    process.start()
    first = process._process
    os.kill(first.pid, signal.SIGKILL)
    first.join(30)
    with pytest.raises(StoreError, match="exited before it could"):
        process.wait_for_keys()
    process.wait_for_keys()  # starts it again, handed new ends
    try:
        wait_for(
            lambda: lake_rows(data_dir, "SELECT count(*) FROM events") == [(answered,)],
            60,
            "the journal written",
        )
    finally:
        assert _returns_within(60.0, process.stop)
