"""A progress bar for long runs on a terminal (replay, backtest): rows, rows/s and
alerts so far, drawn by rich on standard error. Where standard error is no terminal,
the runs log a line every so often instead (engine.apps.replay.Progress)."""

from __future__ import annotations

import sys
import time

from engine.apps.replay import Progress as LoggedProgress


def on_terminal() -> bool:
    return sys.stderr.isatty()


class ProgressBar(LoggedProgress):
    """`replay`'s progress drawn as a bar: of `total` rows when known (Parquet
    footers say), else a count; redrawn at most a few times a second."""

    def __init__(self, total: int | None, what: str = "replay") -> None:
        # rich is loaded only when a bar is drawn: a run off a terminal never needs it.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__(total, what)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]:>9,.0f} rows/s"),
            TextColumn("{task.fields[alerts]:,} alerts"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(what, total=total, rate=0.0, alerts=0)
        self._bar.start()

    def at(self, done: int, alerts: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self._bar.update(self._task, completed=done, rate=done / elapsed, alerts=alerts)

    def close(self) -> None:
        self._bar.stop()
