"""Deployment checks as stored: the `checks` table read back for `callsentry checks list`.

A check run (`simulate --send --check`) sends from one socket, so its reports share a
source ("host:port"); the runs are listed by it, newest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from engine.lake.parquet import Lake


class CheckListError(Exception):
    """The data dir cannot be read for checks; the message says why."""


def list_checks(data_dir: Path, limit: int) -> list[dict[str, Any]]:
    lake = Lake(data_dir)
    if not (lake.root / "events").is_dir():
        raise CheckListError(f"{data_dir} holds no lake (is it callsentry's data dir?)")
    if not (lake.root / "checks").is_dir():
        return []  # a lake from before checks were kept apart: none stored
    try:
        rows = lake.query(
            "SELECT source, min(ts), max(ts), count(*), count(DISTINCT call_id) FROM checks "
            f"GROUP BY source ORDER BY max(ts) DESC, source LIMIT {int(limit)}"
        )
    except duckdb.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckListError(f"cannot read the lake in {data_dir}: {first}") from None
    keys = ("sender", "first", "last", "reports", "calls")
    return [dict(zip(keys, row, strict=True)) for row in rows]
