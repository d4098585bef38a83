"""The store without sockets: journal recovery, lake segments, compaction, the dir lock."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.apps.stores import open_store
from engine.core.events import CallEvent, CallState, Reject, RejectReason
from engine.detect.calls import CALL_COLUMNS, Call, call_columns
from engine.ingest import journal as journal_module
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.journal import (
    DATAGRAMS,
    HEADER,
    JSON_RECORDS,
    TICK,
    Frame,
    Journal,
    Spares,
    datagram_payload,
    encode_frame,
    json_payload,
    read_segment,
    sealed_segments,
    tick_payload,
)
from engine.ingest.keyfile import (
    ENTRY_KEYS,
    MAGIC,
    KeyFileError,
    RecentKeys,
    key_file_path,
    read_key_file,
)
from engine.ingest.store import EventStore, StoreError, codec_header
from engine.lake import views as views_module
from engine.lake.parquet import CALL_SCHEMA, CompactionResult, HeldReports, Lake
from engine.lake.views import ViewsFile, analysts_command, write_views_file
from engine.lake.writer import LakeWriter, calls_frame
from tests.conftest import make_settings, wait_for

T0 = 1795860000.0
CODEC = Vos3000TextCodec()


def event(n: int, serial: int = 1, ts: float = T0) -> CallEvent:
    return CallEvent(
        ts + n, f"call-{n}", serial, CallState.RINGING, 180, "100", "200", "", "7", "m"
    )


def datagram(n: int) -> tuple[float, str, bytes]:
    e = event(n)
    return (e.ts, "127.0.0.1:5060", CODEC.encode(e))


def count(data_dir: Path, sql: str = "SELECT count(*) FROM events") -> int:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        row = con.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def open_segment_bytes(*frames: bytes) -> bytes:
    header = encode_frame(HEADER, 0, json.dumps(codec_header(CODEC)).encode())
    return header + b"".join(frames)


def store_at(data_dir: Path) -> EventStore:
    return EventStore(data_dir, CODEC)


def write_lake(data_dir: Path) -> int:
    return LakeWriter(data_dir).drain().reports


def test_leftover_journal_is_sealed_recovered_and_a_torn_tail_dropped(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    whole = encode_frame(DATAGRAMS, 1, datagram_payload([datagram(n) for n in range(3)]))
    torn = encode_frame(DATAGRAMS, 4, datagram_payload([datagram(3)]))[:-5]
    (journal / "000000000005.wal").write_bytes(open_segment_bytes(whole, torn))
    store = store_at(data_dir)
    recovery = store.open()
    assert recovery.sealed_segments == 1
    assert recovery.next_seq == 4
    assert [key[:2] for key in recovery.recent_keys] == [
        ("call-0", 1),
        ("call-1", 1),
        ("call-2", 1),
    ]
    assert (journal / "000000000005.sealed").exists()
    assert store.journal.segment == 6
    store.close()
    assert write_lake(data_dir) == 3
    assert count(data_dir) == 3
    assert not list(journal.glob("*.sealed"))


def test_corrupt_frame_is_set_aside_for_inspection(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    good = encode_frame(DATAGRAMS, 1, datagram_payload([datagram(0)]))
    bad = bytearray(encode_frame(DATAGRAMS, 2, datagram_payload([datagram(1)])))
    bad[-3] ^= 0xFF
    (journal / "000000000001.wal").write_bytes(open_segment_bytes(good, bytes(bad), good))
    store = store_at(data_dir)
    store.open()
    store.close()
    write_lake(data_dir)
    assert count(data_dir) == 1
    aside = journal / "000000000001.corrupt"
    assert aside.exists() and aside.stat().st_size == len(bad) + len(good)


def test_keys_and_sequence_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store, intake, _ = open_store(settings, CODEC)
    for n in range(5):
        (key, answer) = CODEC.read_key(datagram(n)[2]) or (None, None)
        intake.offer(key, answer, datagram(n), T0 + n)
    batch = intake.seal()
    assert batch is not None
    store.commit(DATAGRAMS, batch.first_seq, datagram_payload(batch.records))
    intake.durable(batch)
    store.close()
    # Before and after the lake writer has taken the segment.
    for drain in (False, True):
        if drain:
            write_lake(tmp_path / "data")
        store, intake, _ = open_store(settings, CODEC)
        outcome, answer = intake.offer(("call-2", 1), b"call-2,1", datagram(2), T0)
        assert outcome.value == "duplicate" and answer == b"call-2,1"
        assert intake.next_seq == 6
        store.close()


def test_a_key_file_missing_damaged_or_behind_the_lake_is_rebuilt_before_it_is_trusted(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    segments_in_the_lake(data_dir, 2)
    path = key_file_path(data_dir)
    behind = path.read_bytes()  # up to segment 2
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 3, datagram_payload([datagram(2)]))
    store.close()
    write_lake(data_dir)  # segment 3: call-2, seq 3
    whole = path.read_bytes()
    kept = read_key_file(path)
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x20
    for broken, problem in (
        (None, "the lake holds segments up to 3, the file up to 0"),
        (behind, "the lake holds segments up to 3, the file up to 2"),
        (bytes(flipped), "damaged [(]checksum mismatch in the entry at byte 8[)]"),
        # Torn: the last entry's append never finished, yet its segment went (damage).
        (whole[:-7], "the lake holds segments up to 3, the file up to 2"),
    ):
        if broken is None:
            path.unlink()
        else:
            path.write_bytes(broken)
        with pytest.raises(StoreError, match=f"key file .*: {problem}"):
            store_at(data_dir).open()
        rebuilt: list[LakeWriter] = []

        def rebuild(into: list[LakeWriter] = rebuilt) -> None:
            into.append(LakeWriter(data_dir))  # the lake writer's start

        store = store_at(data_dir)
        recovery = store.open(refresh_keys=rebuild)
        store.close()
        assert len(rebuilt) == 1 and recovery.key_file_problem is not None
        assert recovery.next_seq == 4
        assert [key[:2] for key in recovery.recent_keys] == [(f"call-{n}", 1) for n in range(3)]
        assert read_key_file(path) == kept, "rebuilt from the lake as it was kept"
    assert count(data_dir) == 3


# What the lake writer read the keys with before polars did (DuckDB over the views).
KEYS_BY_SQL = (
    "SELECT max(seq), max(epoch_us(ts)) FROM (SELECT seq, ts FROM events "
    "UNION ALL SELECT seq, ts FROM rejects UNION ALL SELECT seq, ts FROM checks)",
    "SELECT call_id, serial, epoch_us(ts) / 1e6 AS t FROM ("
    "SELECT call_id, serial, ts FROM events WHERE ts >= to_timestamp(?) "
    "UNION ALL SELECT call_id, serial, ts FROM checks WHERE ts >= to_timestamp(?) "
    "UNION ALL SELECT call_id, serial, ts FROM rejects "
    "WHERE ts >= to_timestamp(?) AND call_id IS NOT NULL "
    "AND serial IS NOT NULL) ORDER BY t DESC, call_id DESC, serial DESC",
)


@pytest.mark.parametrize("max_keys", [None, 25])
def test_the_key_file_is_rebuilt_with_the_keys_an_sql_query_of_the_lake_gives(
    tmp_path: Path, max_keys: int | None
) -> None:
    # Events, checks and rejects (with a key, with a call id alone, with neither) in two
    # segments 14 hours apart, the second longer than the dedup horizon; a reject's key
    # is kept only when whole.
    data_dir = tmp_path / "data"
    lake = Lake(data_dir)
    lake.prepare()
    start = 1_790_000_000.123456
    seq = 1
    for segment in (1, 2):
        items: list[Any] = []
        for n in range(40):
            ts = start + (segment - 1) * 50_000 + n * 97.000001
            kind = n % 4
            if kind == 3:
                has_key = n % 8 == 3
                items.append(
                    Reject(
                        ts, RejectReason.BAD_SERIAL, "x", b"raw",
                        f"r-{segment}-{n}" if n % 8 in (3, 7) else None, n if has_key else None,
                    )
                )  # fmt: skip
            else:
                items.append(
                    CallEvent(
                        ts, f"c-{segment}-{n}", 1 + n % 3, CallState.ANSWERED, 200, "1", "2", "",
                        "1", "M", check=kind == 2,
                    )
                )  # fmt: skip
        lake.write_segment(segment, [(seq, items)])
        seq += len(items)
    LakeWriter(data_dir, dedup_horizon_s=3600.0, max_dedup_keys=max_keys)  # its start rebuilds
    max_seq, max_us = lake.query(KEYS_BY_SQL[0])[0]
    since = max_us / 1_000_000 - 3600.0
    expected = [tuple(row) for row in lake.query(KEYS_BY_SQL[1], (since, since, since))]
    if max_keys is not None:
        expected = expected[:max_keys]
    expected.reverse()
    kept = read_key_file(key_file_path(data_dir))
    assert kept is not None
    assert (kept.max_seq, kept.max_ts) == (max_seq, max_us / 1_000_000)
    assert [tuple(key) for key in kept.keys] == expected
    # Segment 2 holds 35 keys, 33 of them within the horizon of its last.
    assert len(expected) == (max_keys or 33)
    # Replay's look-up of what is stored: as the SQL it replaced said it, to the last
    # digit of each time (a reject with a call id alone among them).
    first, last = start + 50_000 + 97.000001, start + 50_000 + 20 * 97.000001
    asked = [f"{kind}-2-{n}" for kind in ("c", "r") for n in range(40)]
    held = HeldReports(lake).keys(asked, first, last)
    by_sql = lake.query(
        "SELECT call_id, serial, epoch_us(ts) / 1e6 AS t FROM ("
        "SELECT call_id, serial, ts FROM events WHERE ts BETWEEN to_timestamp(?) AND "
        "to_timestamp(?) UNION ALL SELECT call_id, serial, ts FROM rejects WHERE ts BETWEEN "
        "to_timestamp(?) AND to_timestamp(?) AND call_id IS NOT NULL) "
        "WHERE call_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY t",
        (first, last, first, last, asked),
    )
    assert held == [tuple(row) for row in by_sql]
    assert ("r-2-7", None, pytest.approx(start + 50_000 + 7 * 97.000001)) in held


def test_a_key_file_made_for_a_shorter_dedup_horizon_is_rebuilt(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    segments_in_the_lake(data_dir, 2)
    assert read_key_file(key_file_path(data_dir)) is not None
    store = EventStore(data_dir, CODEC, dedup_horizon_s=7200.0)
    with pytest.raises(StoreError, match="dedup horizon of 3600 s, not 7200 s"):
        store.open()

    def rebuild() -> None:
        LakeWriter(data_dir, dedup_horizon_s=7200.0)

    recovery = store.open(refresh_keys=rebuild)
    store.close()
    assert recovery.next_seq == 3 and len(recovery.recent_keys) == 2


def test_a_crash_between_the_lake_write_and_the_key_file_leaves_the_keys_in_the_journal(
    tmp_path: Path,
) -> None:
    # The lake writer wrote segment 3's Parquet and died before the key file said so:
    # the segment is still journaled, so its keys come from there, no rebuild needed.
    data_dir = tmp_path / "data"
    segments_in_the_lake(data_dir, 2)
    behind = key_file_path(data_dir).read_bytes()
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 3, datagram_payload([datagram(2)]))
    store.close()
    sealed = data_dir / "journal" / "000000000003.sealed"
    journaled = sealed.read_bytes()
    write_lake(data_dir)
    sealed.write_bytes(journaled)
    key_file_path(data_dir).write_bytes(behind)
    store = store_at(data_dir)
    recovery = store.open()
    store.close()
    assert recovery.key_file_problem is None and recovery.next_seq == 4
    assert [key[:2] for key in recovery.recent_keys] == [(f"call-{n}", 1) for n in range(3)]
    assert write_lake(data_dir) == 1 and count(data_dir) == 3, "written again once, not twice"


def test_the_key_file_drops_expired_keys_and_a_torn_last_entry(tmp_path: Path) -> None:
    path = tmp_path / "lake.keys"
    keys = RecentKeys(path, horizon_s=60.0)
    keys.reset(0, 0, 0.0, [])
    for n in range(12):
        batch = [(f"call-{n}-{i:05d}-" + "x" * 20, 1, T0 + 100 * n) for i in range(5_000)]
        keys.add(n + 1, 5_000 * (n + 1), T0 + 100 * n, batch)
        stored = read_key_file(path)
        assert stored is not None and stored.segment == n + 1
        assert stored.max_seq == 5_000 * (n + 1) and stored.max_ts == T0 + 100 * n
        assert batch[0] in stored.keys and batch[-1] in stored.keys
    assert [key for key in stored.keys if key[2] >= stored.max_ts - 60.0] == batch
    assert len(stored.keys) < 6 * 5_000, "expired entries were rewritten away"
    whole = path.read_bytes()
    for torn in (whole + b"\x10\x00\x00", whole + bytes(64)):
        path.write_bytes(torn)
        again = read_key_file(path)
        assert again is not None and again.keys == stored.keys and again.segment == 12


def test_the_key_file_keeps_about_the_newest_max_keys_and_is_read_an_entry_at_a_time(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lake.keys"
    keys = RecentKeys(path, horizon_s=3600.0, max_keys=50_000)
    rebuilt = [(f"old-{i}", 1, T0 + i / 1000) for i in range(2 * ENTRY_KEYS + 10)]
    keys.reset(1, len(rebuilt), rebuilt[-1][2], rebuilt)
    stored = read_key_file(path)
    assert stored is not None and [len(run) for run in stored.runs()] == [
        ENTRY_KEYS,
        ENTRY_KEYS,
        10,
    ], "a rebuild is written, and read back, in entries of at most ENTRY_KEYS keys"
    added: list[tuple[str, int, float]] = []
    for n in range(1, 16):
        batch = [(f"call-{n}-{i}", 1, T0 + 300 + n) for i in range(20_000)]
        keys.add(n + 1, len(rebuilt) + 20_000 * n, T0 + 300 + n, batch)
        added.extend(batch)
        stored = read_key_file(path)
        assert stored is not None and stored.segment == n + 1
        held = stored.keys
        assert set(added[-50_000:]) <= set(held), "the newest max_keys are all kept"
        # Entries go whole, and the file is rewritten once what went outweighs the rest.
        assert len(held) <= 2 * (50_000 + ENTRY_KEYS)
    assert not any(key[0].startswith("old-") for key in held)
    # Everything within the horizon of the newest, nothing else, one entry at a time.
    runs = list(stored.runs(since=T0 + 300 + 14))
    assert [len(run) for run in runs] == [20_000, 20_000]


def test_keys_are_read_from_the_file_as_found_though_a_new_one_replaces_it(
    tmp_path: Path,
) -> None:
    # A lake writer left by a killed receiver may rewrite the key file (a new file
    # renamed over it) between a restarting receiver's two passes over it.
    path = tmp_path / "lake.keys"
    keys = RecentKeys(path, horizon_s=3600.0)
    first = [(f"first-{i}", 1, T0 + i) for i in range(1_000)]
    keys.reset(1, 1_000, T0 + 999, first)
    found = read_key_file(path, keep_open=True)
    assert found is not None
    RecentKeys(path, horizon_s=3600.0).reset(2, 5, T0 + 5_000, [("other", 1, T0 + 5_000)])
    assert [key for run in found.runs() for key in run] == first
    found.close()
    assert read_key_file(path) is not None and read_key_file(path).keys == [  # type: ignore[union-attr]
        ("other", 1, T0 + 5_000)
    ]


def test_a_rewrite_the_disk_refuses_leaves_the_file_and_its_account_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lake.keys"
    keys = RecentKeys(path, horizon_s=100.0)
    keys.reset(0, 0, 0.0, [])
    for n in range(6):  # old keys, soon expired: enough bytes to make a rewrite due
        keys.add(n + 1, n + 1, T0 + n, [(f"old-{n}-{i}", 1, T0 + n) for i in range(20_000)])
    keys.add(7, 7, T0 + 60, [("kept", 1, T0 + 60)])
    keys.add(8, 8, T0 + 61, [])  # a segment of ticks only: no keys
    real = RecentKeys._replace
    calls = {"n": 0}

    def full_once(self: RecentKeys, content: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real(self, content)

    monkeypatch.setattr(RecentKeys, "_replace", full_once)
    segment = [("late", 1, T0 + 155)]  # the old keys leave the horizon; "kept" not
    with pytest.raises(OSError):
        keys.add(9, 9, T0 + 155, segment)  # the rewrite is due, and refused
    keys.add(9, 9, T0 + 155, segment)  # the lake writer tries the segment again
    keys.add(10, 10, T0 + 156, [("next", 1, T0 + 156)])
    assert calls["n"] >= 2, "the rewrite was done once it could be"
    stored = read_key_file(path)
    assert stored is not None
    held = {key[0] for key in stored.keys}
    assert {"kept", "late", "next"} <= held
    assert not any(name.startswith("old-") for name in held)


def test_a_key_file_that_is_not_one_is_said_so(tmp_path: Path) -> None:
    path = tmp_path / "lake.keys"
    for data in (b"", b"garbage" * 10, MAGIC + bytes(8)):
        path.write_bytes(data)
        with pytest.raises(KeyFileError):
            read_key_file(path)


def segments_in_the_lake(data_dir: Path, segments: int) -> LakeWriter:
    """`segments` journal segments of one report each, written to the lake."""
    store = store_at(data_dir)
    store.open()
    for n in range(segments):
        store.commit(DATAGRAMS, n + 1, datagram_payload([datagram(n)]))
        store.seal()
    store.close()
    writer = LakeWriter(data_dir)
    writer.drain()
    return writer


def test_compaction_merges_segments_and_keeps_every_row(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    writer = segments_in_the_lake(data_dir, 6)
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    assert len(list(day.glob("*.parquet"))) == 6
    result = writer.lake.compact(64 << 20)
    assert result.merged_files == 6 and result.written_files == 1
    names = [p.name for p in day.glob("*.parquet")]
    assert len(names) == 1 and names[0].startswith("cmp-")
    assert count(data_dir) == 6


def test_a_merge_takes_at_most_its_rows_and_a_merged_file_is_not_merged_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.lake.parquet.COMPACT_MAX_ROWS", 4)
    data_dir = tmp_path / "data"
    writer = segments_in_the_lake(data_dir, 7)  # a row each
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    result = writer.lake.compact(64 << 20)
    assert (result.merged_files, result.written_files) == (7, 2)
    assert sorted(p.name for p in day.glob("*.parquet")) == [
        "cmp-000000000001-000000000004.parquet",
        "cmp-000000000005-000000000007.parquet",
    ]
    again = writer.lake.compact(64 << 20)
    assert (again.merged_files, again.written_files) == (0, 0), "each holds half the bound"
    assert count(data_dir) == 7


def test_compaction_leaves_alone_the_segments_still_in_the_journal(tmp_path: Path) -> None:
    # Written to the lake but not yet let go from the journal (the writer is between
    # the two, or died there): a restart writes such a segment again, so merged
    # into another file its rows would be there twice.
    data_dir = tmp_path / "data"
    writer = segments_in_the_lake(data_dir, 4)
    journal = data_dir / "journal"
    (journal / "000000000009.sealed").write_bytes(b"")  # stands for one still there
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    segment_3 = day / "seg-000000000003.parquet"
    segment_3.rename(day / "seg-000000000009.parquet")
    writer.compact()
    assert sorted(p.name for p in day.glob("*.parquet")) == [
        "cmp-000000000001-000000000004.parquet",
        "seg-000000000009.parquet",
    ]


def test_a_journaled_tick_is_recovered_like_any_frame(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 1, datagram_payload([datagram(1)]))
    store.commit(TICK, 0, tick_payload(T0 + 60))
    store.seal()
    store.close()
    store = store_at(data_dir)
    store.open()  # the tick is no report: no key, no sequence number
    store.close()
    assert write_lake(data_dir) == 1


def test_an_interrupted_compaction_is_finished_on_the_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    writer = segments_in_the_lake(data_dir, 2)
    day = data_dir / "lake" / "events" / "day=2026-11-28"
    inputs = sorted(p.name for p in day.glob("*.parquet"))
    writer.lake.compact(64 << 20)
    # Put the inputs back as a crash between writing the merged file and deleting them would.
    merged = next(day.glob("cmp-*.parquet"))
    for name in inputs:
        pl.read_parquet(merged, hive_partitioning=False).head(1).write_parquet(day / name)
    (day / "compaction.intent.json").write_text(
        json.dumps({"target": merged.name, "inputs": inputs})
    )
    LakeWriter(data_dir)  # the lake writer's start
    assert count(data_dir) == 2


def test_one_process_per_data_dir(tmp_path: Path) -> None:
    first = store_at(tmp_path / "data")
    first.open()
    with pytest.raises(StoreError, match="in use by another callsentry process"):
        store_at(tmp_path / "data").open()
    first.close()
    second = store_at(tmp_path / "data")
    second.open()
    second.close()


def test_views_are_republished_while_an_analyst_holds_the_database_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 1, datagram_payload([datagram(0)]))
    store.close()
    write_lake(data_dir)
    analyst = duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True)
    LakeWriter(data_dir)  # its start rewrites callsentry.duckdb while the analyst is connected
    assert analyst.execute("SELECT count(*) FROM events").fetchone() == (1,)
    analyst.close()


def test_queries_sharing_one_duckdb_see_the_files_as_they_are_when_they_run(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 1, datagram_payload([datagram(0)]))
    store.seal()
    store.commit(DATAGRAMS, 2, datagram_payload([datagram(1)]))
    store.close()
    writer = LakeWriter(data_dir)
    writer.drain()
    lake = Lake(data_dir)
    sql = "SELECT count(*), max(seq) FROM events"
    with lake.sharing():
        before = lake.query(sql)
        # A segment written after the shared views were made is in the next answer.
        store = store_at(data_dir)
        store.open()
        store.commit(DATAGRAMS, 3, datagram_payload([datagram(2)]))
        store.close()
        writer.drain()
        with lake.sharing():
            nested = lake.query(sql)
        after = lake.query(sql)
    assert before[0][0] >= 1 and after[0][0] == before[0][0] + 1
    assert nested == after == Lake(data_dir).query(sql) == lake.query(sql)


@pytest.mark.parametrize("own_process", [True, False])
def test_the_views_file_is_written_by_its_own_process_or_in_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_process: bool
) -> None:
    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 1, datagram_payload([datagram(0)]))
    store.close()
    writer = LakeWriter(data_dir, publish_views=False)
    writer.drain()
    assert not (data_dir / "callsentry.duckdb").exists()
    if not own_process:
        # An interpreter that cannot name itself starts no other.
        monkeypatch.setattr(views_module.sys, "executable", "")
    views = ViewsFile()
    assert (views._process is not None) is own_process
    views.publish(data_dir, writer.lake.view_statements())
    views.wait()
    assert count(data_dir) == 1
    # Told nothing, the process writes nothing.
    unused = ViewsFile()
    unused.close()
    assert unused.target is None


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="data dir"):
        store_at(blocker / "data").open()


def test_frames_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.wal"
    grams = [datagram(0), datagram(1)]
    path.write_bytes(
        open_segment_bytes(
            encode_frame(DATAGRAMS, 1, datagram_payload(grams[:1])),
            encode_frame(DATAGRAMS, 2, datagram_payload(grams[1:])),
        )
    )
    segment = read_segment(path)
    assert segment.header == codec_header(CODEC)
    assert [(f.first_seq, list(f.datagrams())) for f in segment.frames] == [
        (1, grams[:1]),
        (2, grams[1:]),
    ]
    assert segment.length == path.stat().st_size and segment.problem is None


def test_the_stock_duckdb_cli_reads_the_analysts_database(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("duckdb")
    assert cli.exists() or shutil.which("duckdb"), "the duckdb CLI is a dependency"
    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    store.commit(DATAGRAMS, 1, datagram_payload([datagram(0), datagram(1)]))
    store.close()
    write_lake(data_dir)
    result = subprocess.run(
        [
            str(cli if cli.exists() else "duckdb"),
            "-readonly",
            "-csv",
            str(data_dir / "callsentry.duckdb"),
            "SELECT count(*) AS n FROM events",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["n", "2"]


def test_retention_removes_old_days_of_raw_data_and_keeps_alerts_and_the_newest_day(
    tmp_path: Path,
) -> None:
    from datetime import date, timedelta

    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    day = 86400.0
    # Reports on four days, ten days apart from the newest back.
    for n, age_days in enumerate((30, 20, 10, 0)):
        e = event(n, ts=T0 - age_days * day)
        store.commit(
            DATAGRAMS, n + 1, datagram_payload([(e.ts, "127.0.0.1:5060", CODEC.encode(e))])
        )
        store.seal()
    store.close()
    writer = LakeWriter(data_dir)
    writer.drain()
    writer.lake.publish_views()
    events = data_dir / "lake" / "events"
    alerts_placeholder = data_dir / "lake" / "alerts" / "day=1970-01-01" / "empty.parquet"
    assert count(data_dir) == 4
    newest = date(2026, 11, 28)
    removed = writer.lake.expire(newest - timedelta(days=15))
    assert sorted(p.name for p in removed) == ["day=2026-10-29", "day=2026-11-08"]
    assert sorted(p.name for p in events.glob("day=*")) == [
        "day=1970-01-01",
        "day=2026-11-18",
        "day=2026-11-28",
    ]
    assert count(data_dir) == 2, "analysts see what is left, nothing breaks"
    # However old, the newest day stays (the store recovers its numbering from it).
    writer.lake.expire(newest + timedelta(days=365))
    assert sorted(p.name for p in events.glob("day=*")) == ["day=1970-01-01", "day=2026-11-28"]
    assert alerts_placeholder.exists()
    again, intake, _ = open_store(make_settings(data_dir), CODEC)
    assert intake.next_seq == 5, "numbering carries on after the last stored report"
    again.close()


def test_retention_keeps_the_day_that_holds_the_highest_sequence_number(tmp_path: Path) -> None:
    from datetime import date

    data_dir = tmp_path / "data"
    store = store_at(data_dir)
    store.open()
    # A live day first, then last month's history replayed into the same directory:
    # the highest sequence number lands on the old day.
    for n, ts in enumerate((T0, T0 - 30 * 86400.0)):
        e = event(n, ts=ts)
        store.commit(
            DATAGRAMS, n + 1, datagram_payload([(e.ts, "127.0.0.1:5060", CODEC.encode(e))])
        )
        store.seal()
    store.close()
    writer = LakeWriter(data_dir)
    writer.drain()
    assert writer.lake.expire(date(2026, 11, 20)) == []
    again, intake, _ = open_store(make_settings(data_dir), CODEC)
    assert intake.next_seq == 3
    again.close()


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(
    st.lists(
        st.one_of(
            st.builds(
                CallEvent,
                st.floats(min_value=0, max_value=4e9, allow_nan=False),
                _TEXT,
                st.integers(min_value=0, max_value=10**18),
                st.sampled_from(list(CallState)),
                st.one_of(st.none(), st.sampled_from([180, 183, 200])),
                _TEXT,
                _TEXT,
                _TEXT,
                _TEXT,
                _TEXT,
                _TEXT,
            ),
            st.lists(st.one_of(_TEXT, st.integers(0, 10**18), st.none()), max_size=8),
        ),
        max_size=20,
    )
)
def test_journal_records_are_the_json_they_always_were(records: list[object]) -> None:
    # One format whichever library writes or reads it: journals written with the
    # standard library read back the same, and what orjson writes any JSON reader reads
    # to the same values (floats exactly; only the spelling of an exponent may differ).
    payload = json_payload(records)
    before = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    expected = json.loads(before)
    assert json.loads(payload) == expected
    assert Frame(JSON_RECORDS, 1, payload).records() == expected
    assert Frame(JSON_RECORDS, 1, before).records() == expected


def test_the_calls_columns_detection_hands_over_are_the_calls_table() -> None:
    assert tuple(CALL_SCHEMA) == CALL_COLUMNS
    call = Call("c1", "100", "200", "", "7", "Main", 1_795_860_000.0, ringing_at=1_795_860_000.5)
    call.outcome, call.deadline = "unanswered", 1_795_860_030.0
    frame = calls_frame(call_columns([call]))
    assert frame.schema == pl.Schema(CALL_SCHEMA)
    row = frame.row(0, named=True)
    assert row["ringing_at"].timestamp() == 1_795_860_000.5
    assert row["finished_at"].timestamp() == 1_795_860_030.0
    assert row["ring_s"] is None and row["outcome"] == "unanswered"
    assert calls_frame(call_columns([])).is_empty()


def test_a_segment_across_midnight_is_split_by_day_each_file_in_order(tmp_path: Path) -> None:
    midnight = 1_795_910_400.0  # 2026-11-29T00:00:00Z
    lake = Lake(tmp_path / "data")
    lake.prepare()
    # Seconds either side of midnight, in seq order; the calls come in finish order.
    reports = [event(n, ts=midnight - 2) for n in range(4)]
    calls = []
    for n, started_at in enumerate((midnight + 1, midnight - 30, midnight + 0.5, midnight - 40)):
        call = Call(f"c{n}", "100", "200", "", "7", "Main", started_at)
        call.outcome, call.deadline = "unanswered", midnight + 60
        calls.append(call)
    assert lake.write_segment(7, [(10, reports)], {"calls": calls_frame(call_columns(calls))}) == 4
    for second in (8, 9):  # a later segment of the same two days, for compaction
        later = [event(n, ts=midnight - 2 - 4 * second) for n in range(4 * second, 4 * second + 4)]
        lake.write_segment(second, [(4 * second + 100, later)])

    def rows(table: str, day: str, column: str) -> list[object]:
        files = sorted((lake.root / table / f"day={day}").glob("*.parquet"))
        return [value for f in files for value in pl.read_parquet(f)[column].to_list()]

    assert rows("events", "2026-11-28", "seq") == [10, 11, 132, 133, 136, 137]
    assert rows("events", "2026-11-29", "seq") == [12, 13, 134, 135, 138, 139]
    assert rows("calls", "2026-11-28", "call_id") == ["c3", "c1"]
    assert rows("calls", "2026-11-29", "call_id") == ["c2", "c0"]
    assert lake.compact(64 << 20).written_files == 2
    assert rows("events", "2026-11-28", "seq") == [10, 11, 132, 133, 136, 137]
    assert rows("events", "2026-11-29", "seq") == [12, 13, 134, 135, 138, 139]


def test_files_in_order_are_merged_streamed_and_others_sorted_in_bounded_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Events come in seq order: merged into one file past the bound on what is sorted
    # in memory (streamed, never held whole). Calls come in the order they end: each
    # segment's call started before the one before's, so they are read and sorted, at
    # most COMPACT_SORT_ROWS rows at once.
    monkeypatch.setattr("engine.lake.parquet.COMPACT_SORT_ROWS", 4)
    noon = 1_795_867_200.0  # 2026-11-28T12:00:00Z
    lake = Lake(tmp_path / "data")
    lake.prepare()
    for segment in range(1, 7):
        reports = [event(n, ts=noon + n) for n in range(2 * segment, 2 * segment + 2)]
        call = Call(f"c{segment}", "100", "200", "", "7", "Main", noon - segment)
        call.outcome, call.deadline = "unanswered", noon + 60
        derived = {"calls": calls_frame(call_columns([call]))}
        lake.write_segment(segment, [(10 * segment, reports)], derived)
    assert lake.compact(64 << 20) == CompactionResult(merged_files=12, written_files=3)

    def files(table: str) -> dict[str, list[object]]:
        folder = lake.root / table / "day=2026-11-28"
        column = {"events": "seq", "calls": "call_id"}[table]
        return {f.name: pl.read_parquet(f)[column].to_list() for f in sorted(folder.iterdir())}

    assert files("events") == {
        "cmp-000000000001-000000000006.parquet": [10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61]
    }
    assert files("calls") == {
        "cmp-000000000001-000000000004.parquet": ["c4", "c3", "c2", "c1"],
        "cmp-000000000005-000000000006.parquet": ["c6", "c5"],
    }


# -- preallocated journal segments ------------------------------------------------------


def test_zeros_after_the_last_frame_are_the_clean_end_of_a_preallocated_segment(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    frames = [encode_frame(DATAGRAMS, 1 + n, datagram_payload([datagram(n)])) for n in range(3)]
    written = open_segment_bytes(*frames)
    path = journal / "000000000002.wal"
    path.write_bytes(written + bytes(1 << 16))
    segment = read_segment(path)
    assert segment.problem is None and segment.length == len(written)
    assert [frame.first_seq for frame in segment.frames] == [1, 2, 3]
    store = store_at(data_dir)
    assert store.open().next_seq == 4
    store.close()
    assert (journal / "000000000002.sealed").stat().st_size == len(written), "zeros cut off"


def test_a_last_frame_cut_short_into_the_zeros_is_torn_not_corrupt(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    journal = data_dir / "journal"
    journal.mkdir(parents=True)
    whole = encode_frame(DATAGRAMS, 1, datagram_payload([datagram(0)]))
    cut = encode_frame(DATAGRAMS, 2, datagram_payload([datagram(n) for n in range(1, 40)]))
    # The page cache wrote the frame's start and not its end: zeros where the rest was.
    written = open_segment_bytes(whole) + cut[: len(cut) // 2]
    path = journal / "000000000003.wal"
    path.write_bytes(written + bytes(len(cut) + 4096))
    segment = read_segment(path)
    assert segment.problem is not None and segment.torn
    store = store_at(data_dir)
    assert store.open().next_seq == 2
    store.close()
    assert not list(journal.glob("*.corrupt"))
    # The same frame with written bytes after it is damage, set aside as before.
    path = journal / "000000000009.wal"
    path.write_bytes(written + bytes(len(cut)) + whole)
    assert read_segment(path).problem is not None and not read_segment(path).torn


def test_a_segment_is_sealed_at_its_size_bound_with_no_spare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lake writer takes a segment whole: under a flood with no spare ready (or
    # none made: preallocate off), a segment must still end at MAX_SEGMENT_BYTES.
    monkeypatch.setattr(Journal, "MAX_SEGMENT_BYTES", 3 * Spares.MIN_SEGMENT_BYTES)
    journal = Journal(tmp_path / "journal", codec_header(CODEC), preallocate=False)
    journal.start(1)
    big = datagram_payload([datagram(n) for n in range(24_000)])
    assert Spares.MIN_SEGMENT_BYTES < len(big) < 2 * Spares.MIN_SEGMENT_BYTES
    for n in range(7):
        journal.append(DATAGRAMS, 1 + n * 24_000, big)
    sealed = sealed_segments(tmp_path / "journal")
    assert len(sealed) >= 2
    assert all(path.stat().st_size < 4 * Spares.MIN_SEGMENT_BYTES for path in sealed)
    frames = [f.first_seq for path in sealed for f in read_segment(path).frames]
    assert frames == sorted(frames) and frames[0] == 1


def test_segments_start_from_spares_under_load_and_are_read_back_whole(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory, codec_header(CODEC), preallocate=True)
    journal.start(1)
    spares = journal.spares
    assert spares is not None
    big = datagram_payload([datagram(n) for n in range(24_000)])
    assert len(big) > Spares.MIN_SEGMENT_BYTES

    def spare_ready() -> None:
        wait_for(lambda: bool(spares.ready), 30, "a spare made")
        assert spares.ready >= Spares.MIN_SPARE_BYTES

    # Load with no spare yet: the segment grows as written; sealing it asks for one.
    journal.append(DATAGRAMS, 1, big)
    assert journal.seal() == 1 and spares.used == 0
    spare_ready()
    # The next loaded segment switches to the spare as soon as it passes a MiB.
    journal.append(DATAGRAMS, 24_001, big)
    assert journal.segment == 3 and spares.used == 1
    opened = journal.path(3)
    assert opened.stat().st_size >= Spares.MIN_SPARE_BYTES, "the open segment is the spare"
    journal.append(DATAGRAMS, 48_001, big)
    journal.append(DATAGRAMS, 72_001, big)
    assert journal.segment == 3, "within its zeros: no switch"
    assert [f.first_seq for f in read_segment(opened).frames] == [48_001, 72_001]
    spare_ready()
    # A crash now: the next start cuts the zeros off and keeps every frame.
    journal.close()
    again = Journal(directory, codec_header(CODEC), preallocate=True)
    again.seal_leftovers()
    recovered = read_segment(opened.with_suffix(".sealed"))
    assert recovered.problem is None
    assert [f.first_seq for f in recovered.frames] == [48_001, 72_001]
    for path in sorted(directory.glob("*.sealed")):
        assert path.stat().st_size == read_segment(path).length, "sealed without the zeros"
    journal.stop()
    # A quiet segment leaves a spare where it is, for when load comes.
    again.start(4)
    spares = again.spares
    assert spares is not None
    again.append(DATAGRAMS, 96_001, big)
    assert again.seal() == 4
    spare_ready()
    again.append(DATAGRAMS, 120_001, datagram_payload([datagram(0)]))
    assert again.seal() == 5
    assert spares.used == 0 and spares.ready, "the quiet segment left the spare alone"
    assert again.path(6).stat().st_size < 4096, "and the next one starts small"
    again.stop()
    assert not list(directory.glob("spare*")), "no spare left behind"


def test_a_frame_undone_after_a_failed_write_leaves_no_gap_before_the_next(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal", codec_header(CODEC))
    journal.start(1)
    first = datagram_payload([datagram(0)])
    journal.append(DATAGRAMS, 1, first)
    assert journal._fd is not None
    os.write(journal._fd, b"CSJ2 half a frame, then the disk failed")
    journal._undo_partial_write()
    journal.append(DATAGRAMS, 2, datagram_payload([datagram(1)]))
    segment = read_segment(journal.path(1))
    assert segment.problem is None
    assert [f.first_seq for f in segment.frames] == [1, 2]
    journal.stop()


def test_a_spare_the_disk_has_no_room_for_is_not_made_and_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spares = Spares(tmp_path)
    spares.start()
    monkeypatch.setattr(
        journal_module.os, "statvfs", lambda path: SimpleNamespace(f_bavail=10, f_frsize=4096)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="engine.ingest.journal"):
            for _ in range(3):
                spares.want(2 * Spares.MIN_SEGMENT_BYTES)
                wait_for(lambda: not spares._wanted, 10, "given up until the next loaded seal")
    finally:
        spares.stop()
    said = [r.getMessage() for r in caplog.records if "spare" in r.getMessage()]
    assert len(said) == 1 and "MiB free" in said[0]
    assert spares.made == 0 and not list(tmp_path.glob("spare*"))


def test_the_analysts_command_names_the_duckdb_cli_beside_this_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The venv's own CLI (the duckdb-cli dependency), which PATH seldom holds; it
    # opens the views file it is given.
    write_views_file(tmp_path, ["CREATE VIEW answer AS SELECT 42 AS n"])
    program, flag, database = shlex.split(analysts_command(tmp_path))
    assert Path(program) == Path(sys.executable).parent / "duckdb" and flag == "-readonly"
    shown = subprocess.run(
        [program, flag, database, "-csv", "SELECT n FROM answer"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.split() == ["n", "42"]
    # Without one beside the interpreter, PATH's; a path with a space stays one word.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no cli" / "python"))
    assert shlex.split(analysts_command(tmp_path / "a b")) == [
        "duckdb",
        "-readonly",
        str(tmp_path / "a b" / "callsentry.duckdb"),
    ]
