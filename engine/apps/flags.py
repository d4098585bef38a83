"""A flag that `serve` raises for a process it started (stop, reload the rules),
through a pipe rather than a `multiprocessing.Event`.

An Event's `set()` takes a lock that the other process takes too (in `is_set`,
`clear` and `wait`), and then waits for every process sleeping in `wait()` to
wake. A process killed at such a moment (kill -9, the OOM killer) never lets go
of the lock or wakes, and `set()` waits for ever: `serve` could not stop, nor
reload its rules. Checking that the process is alive first leaves a window
between the check and the `set()`.

Raising this flag writes one byte to a pipe that is never waited on: a pipe
already full of raises not read yet is raised already, and a reader that is gone
has nobody to tell. The process reading it only polls its end.
"""

from __future__ import annotations

import contextlib
import os
import threading
from multiprocessing.connection import Connection
from typing import Any

# Bytes read off the pipe at a time, clearing the flag.
_DRAIN = 4096


class FlagReader:
    """The end of a `ProcessFlag` handed to the process it is raised for.

    Raised once a byte came. Once the raising end is gone (the process that started
    this one ended), nothing more will be asked: a flag `raised_when_gone` (stop) is
    up from then on, any other (reload) stays as it was."""

    def __init__(self, conn: Connection, raised_when_gone: bool) -> None:
        self._conn = conn
        self._raised = False
        self._gone = False
        self._raised_when_gone = raised_when_gone

    def _up(self) -> bool:
        return self._raised or (self._gone and self._raised_when_gone)

    def _look(self, timeout: float) -> None:
        if self._raised or self._gone:
            return  # a gone end reads as ready at once: never polled again
        if self._conn.poll(timeout):
            data = os.read(self._conn.fileno(), _DRAIN)
            if data:
                self._raised = True
            else:
                self._gone = True

    def is_set(self) -> bool:
        self._look(0.0)
        return self._up()

    def wait(self, timeout: float) -> bool:
        """Whether the flag is raised, waiting up to `timeout` seconds for it (not at
        all once the raising end is gone)."""
        self._look(timeout)
        return self._up()

    def clear(self) -> None:
        """Lower the flag: the raises so far are taken (a raise after this counts)."""
        while not self._gone and self._conn.poll(0.0):
            if not os.read(self._conn.fileno(), _DRAIN):
                self._gone = True
        self._raised = False

    def close(self) -> None:
        self._conn.close()


class ProcessFlag:
    """Raised here (`set`), read in the process its `reader` is handed to.

    `set` and `close` may come from different threads (serve raises `reload` on a
    SIGHUP while its housekeeping replaces a writer that died): a raise is written
    whole before the pipe closes, or not at all after, never to a pipe that took the
    closed one's file descriptor number."""

    def __init__(self, context: Any, *, raised_when_gone: bool) -> None:
        reader, writer = context.Pipe(duplex=False)
        self.reader = FlagReader(reader, raised_when_gone)
        self._writer: Connection = writer
        os.set_blocking(writer.fileno(), False)
        self._lock = threading.Lock()
        # Whether a process was started with `reader`: then it is that process's alone.
        self.handed = False

    def set(self) -> None:
        """Raise the flag; never waits. BlockingIOError: the pipe is full of raises
        not read yet, so the flag is up already. BrokenPipeError: nobody reads it."""
        with self._lock:
            if self._writer.closed:
                return  # replaced: the process it was for has gone
            with contextlib.suppress(OSError):
                os.write(self._writer.fileno(), b"!")

    def handed_over(self) -> None:
        """The process was started with `reader`: this process's copy of that end goes,
        so a raise once that process is gone meets a closed pipe."""
        self.reader.close()
        self.handed = True

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        self.reader.close()
