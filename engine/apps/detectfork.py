"""Replay's detection in a forked process, beside the one that reads, journals and
writes the lake: the machine's second core, for the half of replay that detection is.

The child is forked once detection state is restored, so it starts with it in
memory: no imports, no rules to load. The event files are read a part at a time
(engine.ingest.eventfiles.EventStream), so the parent sends the child the reports
each journal segment stored (packed as columns, engine.ingest.records.pack_events)
as soon as it knows them, before it journals them, so the two work side by side
from the first segment on. It receives the calls (as columns) and alerts detection
made of them, then writes both to the lake with the segment, exactly as the
in-process lake writer does.
At the end the child writes the detection snapshot while the parent writes the
lake, and the parent puts it in place once the lake holds everything it has seen.

It runs the same `Pipeline` on the same reports in the same order, so replay's
alerts do not depend on where detection ran (tests/test_replay.py compares both).
The child touches no polars and no DuckDB (neither is safe to use after a fork
from a process whose thread pools have started), only detection, pickle and files.
Used on Linux only; elsewhere, and when detection is off, replay detects in process.

The child can also be forked before detection is loaded (`DetectionProcess.loading`,
`start_loading`): it imports detection, loads the rules and models and restores their
state while the parent imports and prepares the rest (polars, the store, the lake).
This module therefore imports nothing of detection's but the little the parent uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.positions import Position
from engine.core.yamlfile import YamlFileError
from engine.detect.bounds import Evictions, evictions
from engine.detect.snapshotfile import put_in_place, snapshot_path

if TYPE_CHECKING:
    from engine.apps.settings import Settings
    from engine.detect.alerts import Alert
    from engine.detect.pipeline import Pipeline

log = logging.getLogger(__name__)

# One step of a segment as the parent describes it: a tick (event time moves on), or
# (first_seq, reports): the reports it stored from seq first_seq on, packed
# (engine.ingest.records.pack_events: the CallEvents, all detection looks at).
StepSpec = float | tuple[int, bytes]

# How long the parent waits for the child to finish after asking it to stop.
_JOIN_TIMEOUT_S = 30.0
# A segment takes the child a second or so; one it has not answered in this long
# means it hangs, and replay stops with that rather than waiting for ever.
ANSWER_TIMEOUT_S = 600.0


class DetectionProcessError(Exception):
    """The detection process failed or died; the message says how."""


def available() -> bool:
    return sys.platform == "linux" and "fork" in mp.get_all_start_methods()


class _Outbox:
    """Messages written to the pipe by a thread of their own, so that the sender goes
    on meanwhile: a segment's reports, and its calls, are megabytes, more than the
    pipe holds. Written from the main thread, the child's answers kept detection
    waiting until the parent, busy with the lake, read them; and the parent's
    requests kept it waiting until the child had detected the segment before, so the
    two went in step and the child had nothing to do while the parent wrote a group.
    Pickled here, in order; sent in order."""

    def __init__(self, conn: mp.connection.Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._send_all, name=name, daemon=True)
        self._thread.start()

    def send(self, message: Any) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(bytes(ForkingPickler.dumps(message)))

    def close(self) -> None:
        """Wait until everything posted is written (or the other end is gone)."""
        self._queue.put(None)
        self._thread.join()

    def _send_all(self) -> None:
        while (data := self._queue.get()) is not None:
            if self.error is not None:
                continue  # the parent is gone: drop the rest, let close() return
            try:
                self._conn.send_bytes(data)
            except OSError as error:
                self.error = error


# prctl(2): the signal the calling process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def _end_with(parent: int) -> None:
    """The child ends when the parent does, killed or not. Left running it would
    detect for nobody and hold what it inherited, the data dir's locks among them:
    replay run again at once would find the data dir in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the parent ended before the above took effect


@dataclass(frozen=True)
class Restored:
    """The state a loading child restored: up to `position`, `count` rules and models,
    from the snapshot file as it was then (`identity`: inode, size, modification)."""

    position: Position
    count: int
    identity: tuple[int, int, int] | None

    def still_current(self, snapshot_file: Path) -> bool:
        return self.identity is not None and _file_identity(snapshot_file) == self.identity


def _serve(
    conn: mp.connection.Connection,
    pipeline: Pipeline | Callable[[], Pipeline],
    snapshot_file: Path | None,
    parent: int,
    not_ours: Sequence[int],
) -> None:
    """The child: detect segment after segment until told to stop (None) or orphaned.
    Given how to load detection rather than detection loaded, it first loads it and
    restores its state from `snapshot_file`, and says so (`ready`). `not_ours`: file
    descriptors inherited from the parent that this process must not hold open."""
    for fd in not_ours:
        with contextlib.suppress(OSError):
            os.close(fd)
    _end_with(parent)
    # Ctrl-C reaches the whole process group; the parent decides, and closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox = _Outbox(conn, "answers")
    try:
        loaded = _load(outbox, pipeline, snapshot_file) if callable(pipeline) else pipeline
        if loaded is not None:
            _detect_segments(conn, outbox, loaded, snapshot_file)
    except BaseException:
        with contextlib.suppress(OSError):
            outbox.send(("failed", traceback.format_exc()))
    finally:
        outbox.close()


def _load(
    outbox: _Outbox, load: Callable[[], Pipeline], snapshot_file: Path | None
) -> Pipeline | None:
    """Detection loaded and its state restored (then `ready` is answered), or None when
    the rules or models are invalid (`invalid`, with every problem)."""
    from engine.detect.snapshot import restore_into
    from engine.detect.state import SnapshotError

    try:
        pipeline = load()
    except YamlFileError as error:
        outbox.send(("invalid", error.problems))
        return None
    restored = None
    unusable = False
    if snapshot_file is not None:
        # What the file was when read: the parent carries on from this state only if
        # it is still the data dir's once the parent holds the lake writer's lock.
        # This process holds no lock: an unusable snapshot is left for the parent.
        seen = _file_identity(snapshot_file)
        try:
            found = restore_into(pipeline, snapshot_file, set_aside_unusable=False)
        except SnapshotError:
            found, unusable = None, True
        if found is not None:
            restored = Restored(found[0], found[1], seen)
    outbox.send(("ready", restored, tuple(evictions(pipeline)), unusable))
    return pipeline


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def _detect_segments(
    conn: mp.connection.Connection,
    outbox: _Outbox,
    pipeline: Pipeline,
    snapshot_file: Path | None,
) -> None:
    from engine.detect.calls import call_columns
    from engine.detect.pipeline import Output
    from engine.detect.snapshot import prepare as snapshot_prepare
    from engine.detect.state import Snapshot
    from engine.ingest.records import unpack_events

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        if message[0] == "detect":
            _, number, specs = message
            output = Output()
            for spec in specs:
                if isinstance(spec, float):
                    output.extend(pipeline.advance(spec))
                else:
                    output.extend(pipeline.feed(unpack_events(spec[1])))
            outbox.send(
                ("detected", number, call_columns(output.calls), output.alerts, evictions(pipeline))
            )
        elif message[0] == "snapshot":
            _, position = message
            if snapshot_file is None:
                outbox.send(("saved", None, "no snapshot file"))
                continue
            started = time.monotonic()
            try:
                size = snapshot_prepare(
                    snapshot_file, Snapshot(position, pipeline.state(), time.time())
                )
            except OSError as error:
                outbox.send(("saved", None, str(error)))
                continue
            outbox.send(("saved", size, (time.monotonic() - started, position.seq)))


class DetectionProcess:
    """The parent's handle: `submit` segments in order, take each one's `result` in
    the same order, `snapshot`, then `close` (also after an error).

    `pipeline`: detection loaded, its state restored, forked as it is. Or how to load
    it: the child loads it and restores its state from `snapshot_file` while this
    process goes on, and `ready` waits for that."""

    def __init__(
        self,
        pipeline: Pipeline | Callable[[], Pipeline],
        snapshot_file: Path | None,
        not_ours: Sequence[int] = (),
    ) -> None:
        self.snapshot_file = snapshot_file
        context = mp.get_context("fork")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_serve,
            args=(child_conn, pipeline, snapshot_file, os.getpid(), tuple(not_ours)),
            name="callsentry-replay-detection",
            daemon=True,
        )
        # Frozen, what the child inherits is left alone by its collector, so the pages
        # holding detection's state and the loaded modules are shared rather than
        # copied as the collector walks them. Nothing frozen is lost: it is only left
        # out of cycle collection until close().
        gc.freeze()
        try:
            self._process.start()
        except BaseException:
            gc.unfreeze()
            raise
        child_conn.close()
        # Requests are queued for the child, not written while it works on the one
        # before: this process reads and journals the next segments meanwhile.
        self._outbox = _Outbox(self._conn, "requests")
        self._submitted: deque[int] = deque()
        # The child's, as of its last answer (the replay's summary reports them).
        self.evictions = Evictions() if callable(pipeline) else evictions(pipeline)
        self._loaded = not callable(pipeline)
        # Said by `ready`: the data dir's snapshot could not be used (left as it was).
        self.snapshot_unusable = False
        self._asked = 0
        self._finished = False
        self._closed = False

    def ready(self) -> Restored | None:
        """Wait until the child has loaded detection (given how to): the state it
        restored, or None (none to restore: detection starts cold). Raises
        YamlFileError with every problem of invalid rules or models."""
        if self._loaded:
            return None
        self._loaded = True
        message = self._receive()
        if message[0] == "invalid":
            raise YamlFileError(message[1])
        if message[0] != "ready":
            raise DetectionProcessError(f"answered {message[0]!r} to loading detection")
        self.evictions = Evictions(*message[2])
        self.snapshot_unusable = bool(message[3])
        restored: Restored | None = message[1]
        return restored

    @property
    def outstanding(self) -> int:
        return len(self._submitted)

    def submit(self, specs: list[StepSpec]) -> None:
        """Detect the next segment: its steps, in order."""
        self._asked += 1
        self._send(("detect", self._asked, specs))
        self._submitted.append(self._asked)

    def result(self) -> tuple[dict[str, list[Any]], list[Alert]]:
        """(call columns, alerts) of the oldest segment submitted and not yet answered."""
        expected = self._submitted.popleft()
        message = self._receive()
        if message[0] != "detected" or message[1] != expected:
            raise DetectionProcessError(f"answered {message[:2]!r} for request {expected}")
        self.evictions = message[4]
        return message[2], message[3]

    def begin_snapshot(self, position: Position) -> None:
        """Ask for the snapshot once the segments submitted so far are detected (it
        is written beside the snapshot file); `end_snapshot` waits for it and puts
        it in place. Meanwhile the parent writes the lake: the snapshot may only
        take effect once the lake holds every report detection saw (a restart would
        otherwise detect the journal's segments a second time)."""
        self._send(("snapshot", position))

    def end_snapshot(self) -> bool:
        message = self._receive()
        if message[0] != "saved":
            raise DetectionProcessError(f"answered {message[0]!r} to a snapshot")
        _, size, detail = message
        if size is None or self.snapshot_file is None:
            log.error("detection snapshot failed: %s; the previous one stays", detail)
            return False
        try:
            put_in_place(self.snapshot_file)
        except OSError as error:
            log.error("detection snapshot failed: %s; the previous one stays", error)
            return False
        took, seq = detail
        log.info(
            "detection state saved (%.1f MiB in %.1f s, up to report %d)",
            size / 2**20,
            took,
            seq,
        )
        return True

    def finish(self) -> None:
        """Nothing more will be asked: the child ends once it has answered everything
        asked before, rather than when `close` says so (its exit, the freeing of a
        few hundred MiB, then overlaps the parent's last lake write)."""
        if not self._finished:
            self._finished = True
            self._send(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._finished and not self._submitted:
            self._process.join(_JOIN_TIMEOUT_S)
        # Else the replay stopped: the child's state would be thrown away, the segments
        # queued for it are not worth the wait, and its answers nobody reads would keep
        # it from ending.
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        # The child is gone: whatever is still queued for it fails to be written.
        self._outbox.close()
        self._conn.close()
        gc.unfreeze()

    def _send(self, message: Any) -> None:
        if self._finished and message is not None:
            raise DetectionProcessError("asked for more after finish()")
        try:
            self._outbox.send(message)
        except OSError as error:
            raise DetectionProcessError(self._why_gone(f"could not be reached ({error})")) from None

    def _receive(self) -> Any:
        try:
            if not self._conn.poll(ANSWER_TIMEOUT_S):
                raise DetectionProcessError(f"gave no answer in {ANSWER_TIMEOUT_S:g} s")
            message = self._conn.recv()
        except (EOFError, OSError):
            raise DetectionProcessError(self._why_gone("stopped without answering")) from None
        if message[0] == "failed":
            raise DetectionProcessError(f"failed:\n{message[1]}")
        return message

    def _why_gone(self, what: str) -> str:
        self._process.join(1.0)
        code = self._process.exitcode
        if code is not None and code < 0:
            return f"{what}: killed by signal {-code}"
        return f"{what} (exit code {code})"


def start_loading(
    settings: Settings, rules_dir: Path | None, not_ours: Sequence[int] = ()
) -> DetectionProcess | None:
    """Replay's detection process, forked now to load detection (the settings' rules,
    or those under `rules_dir`, and the models) and restore the data dir's detection
    state while the caller loads the rest; None where replay detects in process
    (detection off, or no fork here). `not_ours`: file descriptors the child closes
    (the views process's pipes: `ViewsFile.pipe_ends`)."""
    if not settings.detection.enabled or not available():
        return None
    from engine.apps.detectors import make_pipeline

    def load() -> Pipeline:
        return make_pipeline(settings.detection, rules_dir)

    return DetectionProcess(load, snapshot_path(settings.store.data_dir), not_ours)
