"""Process-wide runtime: the event loop a process runs on, and the garbage
collector's settings for the receiver and for the processes that run detection."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where installed (its datagram transport takes reports
    several times faster than the stock loop's), on the stock loop otherwise."""
    # Here, not at the top: the detection processes (lake writer, replay) that take
    # the gc settings below run no event loop.
    import asyncio

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# CPython's own thresholds.
_DEFAULT_THRESHOLD = (700, 10, 10)


@contextlib.contextmanager
def gc_for_start() -> Iterator[None]:
    """What a command makes while it starts (modules, classes, settings, rules) lives as
    long as its process: a young collection every 700 allocations walks it again and
    again for nothing (figures: bench/README.md, "Process weight"). Every 100,000
    within, until the command says otherwise: the receiver and detection take theirs
    below, a process that serves people (the console) `tune_gc_for_service`. The
    thresholds before are back after."""
    before = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


class _CollectorHold:
    """Who holds the collector off: it is off while any holder is within, and as it
    was before the first one came once the last one leaves (two threads writing
    snapshots at once must not turn it on under each other)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.was_on = False

    def enter(self) -> None:
        with self.lock:
            if self.holders == 0:
                self.was_on = gc.isenabled()
                gc.disable()
            self.holders += 1

    def leave(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0 and self.was_on:
                gc.enable()


_HOLD = _CollectorHold()


@contextlib.contextmanager
def collector_held_off() -> Iterator[None]:
    """No collection within: for work that makes millions of containers, most of which
    live until it is done (a detection snapshot written or read: what is read, and
    what pickling remembers of what it wrote). Each collection would walk them (an
    older generation's, the whole detection state too) finding little to free. The
    collector is on again once every holder has left, if it was before the first."""
    _HOLD.enter()
    try:
        yield
    finally:
        _HOLD.leave()


def tune_gc_for_service() -> None:
    """CPython's own thresholds, with what starting made frozen out of sight: for a
    process that serves requests for hours, whose short-lived objects should go soon."""
    gc.freeze()
    gc.set_threshold(*_DEFAULT_THRESHOLD)


def tune_gc_for_receiver() -> None:
    """Take everything made while starting (modules, settings, the codec) out of the
    collector's sight, and collect the young generation every 50,000 allocations
    rather than every 700.

    Without the freeze, each full collection walks every object the imports
    made, and no answer leaves while it does. The receiver makes a few
    short-lived containers per report (the address and key tuples, the entry
    waiting for its commit) that are gone within a group commit: at 50,000 most
    are gone before a collection comes, and one walks only what is still
    waiting. (Figures: bench/README.md, "Garbage collection".)
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def tune_gc_for_detection() -> None:
    """Fewer, larger young-generation garbage collections.

    Detection keeps millions of long-lived objects (windows, calls in progress,
    models) and makes a few short-lived ones per report. CPython's default runs a
    young collection every 700 allocations, and every tenth of those walks the
    middle generation too, over objects that will live for hours. Objects made
    while starting (modules, rules) are frozen out of it altogether. Not for the
    receiver: its answers' latency would take the longer pauses.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
