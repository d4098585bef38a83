"""The actions' audit trail into the lake: whoever acts records each step in the
outbox file (engine.alerts.actionbook); the lake writer copies the rows into the lake,
where `callsentry.duckdb` shows them as the `actions` table. Here, not in either
package, because it reads one and writes the other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.alerts.actionbook import ActionBook
    from engine.lake.parquet import Lake

log = logging.getLogger(__name__)


class TrailCopy:
    """The trail's rows after the last the lake holds, copied once per drain pass."""

    def __init__(self, data_dir: Path, lake: Lake) -> None:
        self.data_dir = data_dir
        self.lake = lake
        self.book: ActionBook | None = None
        self.end: int | None = None
        self.failing = False

    def copy(self) -> int:
        """Rows copied (0 also when there is no trail yet, or the copy failed: said once)."""
        import polars as pl

        from engine.alerts.actionbook import ActionBook
        from engine.alerts.outbox import OutboxError, outbox_path
        from engine.lake.parquet import ACTION_SCHEMA, storage_errors

        try:
            if self.book is None:
                if not outbox_path(self.data_dir).exists():
                    return 0
                self.book = ActionBook.of(self.data_dir)
            if self.end is None:
                self.end = self.lake.trail_end()
            rows = self.book.trail(after_seq=self.end)
            if not rows:
                return 0
            columns = {name: [row[name] for row in rows] for name in ACTION_SCHEMA}
            for name in ("recorded_at", "undo_at"):
                columns[name] = [
                    None if v is None else round(float(v) * 1_000_000) for v in columns[name]
                ]
            columns["dry_run"] = [bool(v) for v in columns["dry_run"]]
            frame = pl.DataFrame(
                {
                    name: pl.Series(name, columns[name], pl.Int64).cast(dtype)
                    if name in ("recorded_at", "undo_at")
                    else pl.Series(name, columns[name], dtype)
                    for name, dtype in ACTION_SCHEMA.items()
                }
            )
            self.lake.write_trail(frame)
        except Exception as error:
            if not isinstance(error, (OutboxError, *storage_errors())):
                raise
            if not self.failing:
                log.error("cannot copy the actions' trail into the lake (%s); retrying", error)
            self.failing = True
            return 0
        self.failing = False
        self.end = int(rows[-1]["seq"])
        return len(rows)

    def close(self) -> None:
        if self.book is not None:
            self.book.close()
