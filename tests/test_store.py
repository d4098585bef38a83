"""The store without sockets: journal recovery, lake segments, compaction, the dir lock."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from engine.codec import Decoded
from engine.events import CallEvent, CallState
from engine.journal import encode_frame, read_segment, segment_path
from engine.lake import event_record
from engine.service import open_store
from engine.store import EventStore, StoreError
from tests.conftest import make_settings

T0 = 1795860000.0


def event(n: int, serial: int = 1, ts: float = T0) -> CallEvent:
    return CallEvent(
        ts + n, f"call-{n}", serial, CallState.RINGING, 180, "100", "200", "", "7", "m"
    )


def count(data_dir: Path, sql: str = "SELECT count(*) FROM events") -> int:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        row = con.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def test_leftover_journal_is_recovered_into_the_lake_and_a_torn_tail_dropped(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    whole = encode_frame([event_record(n + 1, event(n)) for n in range(3)])
    torn = encode_frame([event_record(4, event(3))])[:-5]
    segment_path(journal, 5).write_bytes(whole + torn)
    store = EventStore(data_dir)
    recovery = store.open()
    assert recovery.recovered_records == 3
    assert recovery.next_seq == 4
    assert [key[:2] for key in recovery.recent_keys] == [
        ("call-0", 1),
        ("call-1", 1),
        ("call-2", 1),
    ]
    assert not segment_path(journal, 5).exists()
    store.close()
    assert count(data_dir) == 3


def test_corrupt_frame_is_set_aside_for_inspection(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    good = encode_frame([event_record(1, event(0))])
    bad = bytearray(encode_frame([event_record(2, event(1))]))
    bad[-3] ^= 0xFF
    segment_path(journal, 1).write_bytes(good + bytes(bad) + good)
    store = EventStore(data_dir)
    store.open()
    store.close()
    assert count(data_dir) == 1
    aside = journal / "000000000001.corrupt"
    assert aside.exists() and aside.stat().st_size == len(bad) + len(good)


def test_keys_and_sequence_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store, intake, _ = open_store(settings)
    for n in range(5):
        intake.offer(Decoded(event(n), b""))
    batch = intake.seal()
    assert batch is not None
    store.commit(batch.records)
    intake.durable(batch)
    store.close()

    store, intake, _ = open_store(settings)
    outcome, answer = intake.offer(Decoded(event(2), b"call-2,1"))
    assert outcome.value == "duplicate" and answer == b"call-2,1"
    assert intake.next_seq == 6
    store.close()


def test_compaction_merges_segments_and_keeps_every_row(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = EventStore(data_dir)
    store.open()
    for n in range(6):
        store.commit([event_record(n + 1, event(n))])
        store.flush()
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    assert len(list(day.glob("*.parquet"))) == 6
    result = store.compact()
    assert result.merged_files == 6 and result.written_files == 1
    assert [p.name for p in day.glob("*.parquet")] == ["cmp-000000000001-000000000006.parquet"]
    store.close()
    assert count(data_dir) == 6


def test_an_interrupted_compaction_is_finished_on_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = EventStore(data_dir)
    store.open()
    for n in range(2):
        store.commit([event_record(n + 1, event(n))])
        store.flush()
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    inputs = sorted(p.name for p in day.glob("*.parquet"))
    store.compact()
    store.close()
    # Put the inputs back as a crash between writing the merged file and deleting them would.
    merged = next(day.glob("cmp-*.parquet"))
    import polars as pl

    for name in inputs:
        pl.read_parquet(merged, hive_partitioning=False).head(1).write_parquet(day / name)
    (day / "compaction.intent.json").write_text(
        json.dumps({"target": merged.name, "inputs": inputs})
    )
    store = EventStore(data_dir)
    store.open()
    store.close()
    assert count(data_dir) == 2


def test_one_process_per_data_dir(tmp_path: Path) -> None:
    first = EventStore(tmp_path / "data")
    first.open()
    with pytest.raises(StoreError, match="in use by another callsentry process"):
        EventStore(tmp_path / "data").open()
    first.close()
    second = EventStore(tmp_path / "data")
    second.open()
    second.close()


def test_views_are_republished_while_an_analyst_holds_the_database_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = EventStore(data_dir)
    store.open()
    store.commit([event_record(1, event(0))])
    store.flush()
    analyst = duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True)
    store.close()
    again = EventStore(data_dir)
    again.open()  # rewrites callsentry.duckdb while the analyst is connected
    again.close()
    assert analyst.execute("SELECT count(*) FROM events").fetchone() == (1,)
    analyst.close()


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="data dir"):
        EventStore(blocker / "data").open()


def test_frames_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.wal"
    records = [event_record(1, event(0)), event_record(2, event(1))]
    path.write_bytes(encode_frame(records[:1]) + encode_frame(records[1:]))
    read, length, problem, torn = read_segment(path)
    assert read == records and length == path.stat().st_size and problem is None and not torn
