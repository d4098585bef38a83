"""The stored formats after `switch` and checks were added: what the release before
wrote still reads (its journal records, its lake, its detection snapshot), rules name
switches, and the sender directory decides as its settings say."""

from __future__ import annotations

import logging
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson
import polars as pl
import pytest
from pydantic import ValidationError

from engine.apps.replay import replay
from engine.core.events import CHECK_CALL_ID_PREFIX, CallEvent, CallState
from engine.detect.schema import RuleSpec
from engine.detect.snapshot import FORMAT as SNAPSHOT_FORMAT
from engine.detect.snapshotfile import snapshot_path
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.journal import JSON_RECORDS, Journal, json_payload
from engine.ingest.records import item_of, record_of
from engine.ingest.senders import SenderDirectory
from engine.ingest.store import codec_header
from engine.lake.parquet import EVENT_SCHEMA, Lake
from engine.lake.writer import LakeWriter
from tests.conftest import make_settings

DATA = Path(__file__).resolve().parent / "data"
# Made by the release before switches (f51c862): `callsentry replay` of the first 400
# rows of data/samples/events.csv, models off: its lake (no `switch` column, no
# `checks` table) and its detection snapshot (calls without a switch).
LAKE_BEFORE = DATA / "lake-before-switch.tar.xz"
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "samples" / "events.csv"


def test_journal_records_of_the_release_before_read_with_no_switch(tmp_path: Path) -> None:
    old = [1.5, "a@1", 1, "RINGING", 180, "861", "400", "", "1", "Main menu", "10.0.0.5:5060"]
    event = item_of(old)
    assert type(event) is CallEvent
    assert (event.caller, event.source, event.switch, event.check) == (
        "861",
        "10.0.0.5:5060",
        "",
        False,
    )
    new = CallEvent(2.0, "b@1", 2, CallState.HANGUP, None, "1", "2", "", "1", "m", "s", "east")
    assert item_of(orjson.loads(json_payload([record_of(new)]))[0]) == new

    # A sealed segment of such records (replay's `J` frames), as that release wrote it.
    data_dir = tmp_path / "data"
    journal = Journal(data_dir / "journal", codec_header(Vos3000TextCodec()), fsync=False)
    journal.start(1)
    journal.append(
        JSON_RECORDS, 1, orjson.dumps([old, [*old[:1], "a@1", 2, "HANGUP", None, *old[5:]]])
    )
    journal.seal()
    journal.close()
    writer = LakeWriter(data_dir, snapshots=False)
    assert writer.drain().reports == 2
    rows = writer.lake.query("SELECT call_id, serial, switch FROM events ORDER BY serial")
    assert rows == [("a@1", 1, ""), ("a@1", 2, "")]


def test_a_lake_and_snapshot_of_the_release_before_carry_on_as_one_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = pl.read_csv(SAMPLE, infer_schema=False)
    second = tmp_path / "second.csv"
    frame.slice(400, 400).write_csv(second)
    both = tmp_path / "both.csv"
    frame.slice(0, 800).write_csv(both)
    data = tmp_path / "upgraded"
    with tarfile.open(LAKE_BEFORE) as archive:
        archive.extractall(data, filter="data")
    old_files = sorted((data / "lake" / "events").glob("day=*/seg-*.parquet"))
    assert old_files and "switch" not in pl.read_parquet_schema(old_files[0])
    detection = {"alerts_jsonl": "off", "models_enabled": False}
    with caplog.at_level(logging.INFO):
        upgraded = replay([second], make_settings(data, detection=detection))
    assert "detection state restored" in caplog.text
    assert "does not fit" not in caplog.text
    assert upgraded.stored == 400
    whole = tmp_path / "whole"
    replay([both], make_settings(whole, detection=detection))

    def tables(data_dir: Path) -> tuple[object, ...]:
        with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
            return (
                con.execute("SELECT count(*), count(switch), min(switch) FROM events").fetchall(),
                con.execute(
                    "SELECT call_id, outcome, reports, switch FROM calls ORDER BY call_id"
                ).fetchall(),
                con.execute("SELECT count(*) FROM checks").fetchall(),
            )

    # Calls that span the cut were finished from the restored state, as in one run.
    assert tables(data) == tables(whole)
    assert tables(data)[0] == [(800, 800, "")]

    # Replay's compaction merged the old files with the new, in today's columns.
    files = sorted((data / "lake" / "events").glob("day=2*/*.parquet"))
    assert [path.name[:4] for path in files] == ["cmp-"]
    assert pl.read_parquet_schema(files[0]) == EVENT_SCHEMA
    assert Lake(data).query("SELECT count(*), count(switch) FROM events") == [(800, 800)]


def test_the_sender_directory_names_switches_and_only_lets_check_senders_check() -> None:
    senders = SenderDirectory(
        {"east": ["10.1.0.0/16"], "east-core": ["10.1.2.3"], "v6": ["2001:db8::/32"]},
        ["127.0.0.0/8", "::1/128", "10.1.0.0/16"],
    )
    assert senders.of("10.1.9.9:5060").switch == "east"
    assert senders.of("10.1.2.3:5060").switch == "east-core"  # the most specific
    assert senders.of("2001:db8::7:5060").switch == "v6"
    assert senders.of("10.2.0.1:5060") == ("", False)
    assert senders.of("replay.csv:12") == ("", False)
    check = CHECK_CALL_ID_PREFIX + "x"
    assert senders.is_check("127.0.0.1:40000", check)
    assert senders.is_check("::1:40000", check)
    assert not senders.is_check("127.0.0.1:40000", "x")
    # A switch's address is never a check sender, even within check_senders.
    assert not senders.is_check("10.1.9.9:5060", check)
    assert senders.of("10.1.9.9:5060") is senders.of("10.1.9.9:5060"), "cached per sender"


def _rule(group_by: object, **aggregate: object) -> dict[str, object]:
    return {
        "id": "r",
        "title": "t",
        "severity": "low",
        "selection": {"switch": "east"},
        "aggregate": {"type": "count", "group_by": group_by, "window": "1m", **aggregate},
        "condition": {"threshold": 3},
    }


def test_rules_select_on_switch_and_group_by_it_alone_or_with_others() -> None:
    spec = RuleSpec.model_validate(_rule(["switch", "caller"]))
    assert spec.aggregate.entity_names == ("switch", "caller")
    assert spec.aggregate.entity_type == "switch/caller"
    assert RuleSpec.model_validate(_rule("switch")).aggregate.entity_type == "switch"
    for bad, why in (
        (["caller", "caller"], "names a field twice"),
        ([], "one to three fields"),
        (["switch", "nosuch"], "Input should be"),
    ):
        with pytest.raises(ValidationError, match=why):
            RuleSpec.model_validate(_rule(bad))
    with pytest.raises(ValidationError, match="sequential dialling is grouped by caller"):
        RuleSpec.model_validate(_rule(["switch", "caller"], type="sequential"))


def test_a_lake_of_the_release_before_reads_before_this_release_writes_to_it(
    tmp_path: Path,
) -> None:
    # `callsentry alerts list` or `checks list` right after an upgrade, before `serve`.
    with tarfile.open(LAKE_BEFORE) as archive:
        archive.extractall(tmp_path, filter="data")
    lake = Lake(tmp_path)
    assert lake.query("SELECT count(*), count(switch), min(switch) FROM events") == [(400, 400, "")]
    assert lake.query("SELECT count(*), min(switch) FROM calls") == [(102, "")]
    assert lake.query("SELECT count(*) FROM checks") == [(0,)]
    assert lake.query("SELECT count(*) FROM alerts_current") == [(0,)]


def test_compaction_runs_give_old_files_and_new_the_same_switch_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Merges of at most COMPACT_MAX_ROWS rows: the first run holds the release
    # before's file (400 rows, no switch column) and two of this release's, the
    # second run this release's only.
    monkeypatch.setattr("engine.lake.parquet.COMPACT_MAX_ROWS", 900)
    with tarfile.open(LAKE_BEFORE) as archive:
        archive.extractall(tmp_path, filter="data")
    lake = Lake(tmp_path)
    lake.prepare()
    noon = datetime(2026, 11, 2, 12, tzinfo=UTC).timestamp()
    # Numbers, menu, source and the switch's name: this release's reports.
    fields = ("861", "400", "", "1", "m", "10.0.0.5:5060", "east")
    for segment in range(2, 6):
        reports = [
            CallEvent(noon + n, f"s{segment}-{n}", 1, CallState.RINGING, 180, *fields)
            for n in range(200)
        ]
        lake.write_segment(segment, [(10_000 * segment, reports)])
    result = lake.compact(64 << 20)
    assert (result.merged_files, result.written_files) == (5, 2)
    day = tmp_path / "lake" / "events" / "day=2026-11-02"
    assert sorted(path.name for path in day.glob("*.parquet")) == [
        "cmp-000000000001-000000000003.parquet",
        "cmp-000000000004-000000000005.parquet",
    ]
    for path in day.glob("*.parquet"):
        assert pl.read_parquet_schema(path) == EVENT_SCHEMA
    by_switch = "SELECT switch, count(*) FROM events GROUP BY switch ORDER BY switch"
    assert lake.query(by_switch) == [("", 400), ("east", 800)]


def test_a_snapshot_of_this_format_keeps_the_switch_of_calls_in_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = pl.read_csv(SAMPLE, infer_schema=False).slice(0, 800)
    named = frame.with_columns(
        switch=pl.when(pl.col("call_id").str.len_bytes() % 2 == 0)
        .then(pl.lit("east"))
        .otherwise(pl.lit("west"))
    )
    first, second, both = tmp_path / "1.csv", tmp_path / "2.csv", tmp_path / "both.csv"
    named.slice(0, 400).write_csv(first)
    named.slice(400, 400).write_csv(second)
    named.write_csv(both)
    detection = {"alerts_jsonl": "off", "models_enabled": False}
    data = tmp_path / "cut"
    replay([first], make_settings(data, detection=detection))
    assert (
        snapshot_path(data)
        .read_bytes()
        .startswith(f"CALLSENTRY-DETECTION-SNAPSHOT v{SNAPSHOT_FORMAT}\n".encode())
    )
    with caplog.at_level(logging.INFO):
        replay([second], make_settings(data, detection=detection))
    assert "detection state restored" in caplog.text
    replay([both], make_settings(tmp_path / "whole", detection=detection))

    def calls(data_dir: Path) -> list[tuple[object, ...]]:
        return Lake(data_dir).query(
            "SELECT call_id, outcome, reports, switch FROM calls ORDER BY call_id"
        )

    assert calls(data) == calls(tmp_path / "whole")
    # Calls begun before the cut and finished after it: their switch came through the
    # snapshot (a call takes it from its first report).
    spanning = set(named.slice(0, 400)["call_id"]) & set(named.slice(400, 400)["call_id"])
    finished = {row[0]: row[3] for row in calls(data) if row[0] in spanning}
    assert finished, "some calls span the cut"
    assert finished == {
        call_id: "east" if len(str(call_id).encode()) % 2 == 0 else "west" for call_id in finished
    }
