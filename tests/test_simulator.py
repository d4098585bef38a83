"""The switch stand-in and the scenario library."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from engine.core.durations import parse_duration
from engine.core.events import CallEvent, CallState
from engine.core.yamlfile import YamlFileError
from engine.ingest.codec import Vos3000TextCodec
from engine.simulator.scenario import (
    Parts,
    Scenario,
    generate,
    load_scenario,
    write_files,
    write_parts,
)
from engine.simulator.switch import SwitchSettings, SwitchStandIn, _Outstanding
from tests.conftest import RunningEngine

SCENARIOS = sorted(Path("data/scenarios").glob("*.yaml"))
CODEC = Vos3000TextCodec()


class NthCopyReceiver:
    """Answers a report only at its Nth copy; records when each copy arrived."""

    def __init__(self, answer_at_copy: int | None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.answer_at_copy = answer_at_copy
        self.arrivals: dict[bytes, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            key = data.split(b",", 2)
            answer = key[0] + b"," + key[1]
            copies = self.arrivals.setdefault(answer, [])
            copies.append(time.monotonic())
            if self.answer_at_copy is not None and len(copies) == self.answer_at_copy:
                self.sock.sendto(answer, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def one_report(call_id: str = "c1") -> list[CallEvent]:
    return [CallEvent(0.0, call_id, 1, CallState.ANSWERED, None, "1", "2", "", "9", "m")]


@pytest.mark.parametrize("answer_at_copy", [1, 3])
def test_a_report_is_resent_until_answered_and_then_no_more(answer_at_copy: int) -> None:
    receiver = NthCopyReceiver(answer_at_copy)
    try:
        switch = SwitchStandIn(
            CODEC, SwitchSettings(port=receiver.port, retries=6, retry_interval_s=0.2)
        )
        summary = asyncio.run(switch.send(one_report()))
    finally:
        receiver.close()
    # send() returns once the answer is in: no copy after the one answered. (When the
    # copies go is the schedule's, tested on its own clock below.)
    assert len(receiver.arrivals[b"c1,1"]) == answer_at_copy
    assert summary.answered == 1 and summary.given_up == 0
    assert summary.retried == answer_at_copy - 1


class _Wire:
    """Stands for the stand-in's connected UDP transport: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes) -> None:
        self.sent.append(data)


def test_the_retry_schedule_resends_every_interval_never_sooner_then_gives_up() -> None:
    # The schedule on event-like time of its own (the stand-in's retry step is given
    # the time), so what goes when is exact whatever the machine's load.
    switch = SwitchStandIn(CODEC, SwitchSettings(retries=6, retry_interval_s=3.0))
    wire = _Wire()
    switch._transport = wire  # type: ignore[assignment]
    key = ("c1", 1)
    entry = _Outstanding(CODEC.encode(one_report()[0]), 0.0, 0)
    switch._outstanding[key] = entry
    switch._send(key, entry)
    switch._due.append((3.0, key))
    copies_by: dict[int, int] = {}  # hundredths of a second -> copies sent by then
    for tick in range(0, 2_500, 5):  # every 0.05 s for 25 s
        switch._retry_due(tick / 100)
        copies_by[tick] = len(wire.sent)
    # t = 0, 3, 6, ... 18 s: the first send and six retries, each on its interval.
    for n in range(1, 7):
        assert (copies_by[300 * n - 5], copies_by[300 * n]) == (n, n + 1), n
    assert len(wire.sent) == 7 and set(wire.sent) == {entry.payload}
    assert switch.summary.retried == 6
    assert switch.summary.given_up == 1 and switch.summary.given_up_keys == [key]
    assert key not in switch._outstanding


def test_gives_up_after_the_retries_and_says_so() -> None:
    receiver = NthCopyReceiver(None)
    try:
        switch = SwitchStandIn(
            CODEC, SwitchSettings(port=receiver.port, retries=6, retry_interval_s=0.05)
        )
        summary = asyncio.run(switch.send(one_report()))
    finally:
        receiver.close()
    assert len(receiver.arrivals[b"c1,1"]) == 7  # the first send and six retries
    assert summary.given_up == 1 and summary.given_up_keys == [("c1", 1)]


def test_request_loss_gives_the_expected_retries_statistically() -> None:
    receiver = NthCopyReceiver(1)
    events = [
        CallEvent(0.0, f"c{n}", 1, CallState.RINGING, 180, "1", "2", "", "9", "m")
        for n in range(500)
    ]
    try:
        switch = SwitchStandIn(
            CODEC,
            SwitchSettings(
                port=receiver.port,
                retry_interval_s=0.5,
                request_loss=0.3,
                window=100,
                seed=3,
            ),
        )
        summary = asyncio.run(switch.send(events))
    finally:
        receiver.close()
    # Copies per report are geometric: expected retries = p / (1 - p) per report
    # (standard deviation about 17 here; the bound is five of them).
    expected = 500 * 0.3 / 0.7
    assert abs(summary.retried - expected) < 0.4 * expected
    assert summary.lost_requests == summary.retried + summary.given_up
    assert summary.answered + summary.given_up == 500


def test_simulate_says_which_rows_of_an_events_file_it_skipped(
    engine_factory: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    running = engine_factory()
    host, port = running.address
    events = tmp_path / "events.csv"
    events.write_text(
        "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
        "1795860000,c1,1,180,100,200,,7,Main\n"
        "not a row\n"
        "1795860001,c1,2,Busy,100,200,,7,Main\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "engine", "simulate", "--events", str(events), "--send",
         "--host", host, "--port", str(port)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{events}: 1 reports, 2 bad rows skipped"
    assert lines[1].startswith("  events.csv:3: missing_fields: ")
    assert lines[2].startswith("  events.csv:4: bad_state: ")


def test_simulate_cli_sends_a_scenario_and_reports_everything_answered(
    engine_factory: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    running = engine_factory()
    host, port = running.address
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "simulate",
            "--scenario",
            "data/scenarios/demo.yaml",
            "--send",
            "--host",
            host,
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every report was answered" in result.stdout
    sent = int(result.stdout.split("reports sent")[1].split()[0])
    running.stop()
    assert running.engine.stats.stored == sent


def test_simulate_to_file_with_send_writes_and_sends_as_its_help_says(tmp_path: Path) -> None:
    import click

    from engine.apps.cli import main

    command = main.get_command(click.Context(main), "simulate")
    assert command is not None
    (to_file,) = (p for p in command.params if p.name == "to_file")
    said = to_file.get_help_record(click.Context(command))
    assert said is not None and "--send" in said[1] and "send nothing" not in said[1]
    receiver = NthCopyReceiver(1)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "engine", "simulate", "--scenario",
             "data/scenarios/sample.yaml", "--to-file", str(tmp_path / "out"), "--send",
             "--port", str(receiver.port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        receiver.close()
    assert result.returncode == 0, result.stdout + result.stderr
    written = pl.read_csv(tmp_path / "out" / "events.csv")
    assert len(receiver.arrivals) == written.height > 0


def test_scenario_at_twenty_percent_loss_each_way_is_stored_exactly_once(
    engine_factory: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    running = engine_factory()
    host, port = running.address
    events = generate(load_scenario(Path("data/scenarios/demo.yaml"))).events
    switch = SwitchStandIn(
        CODEC,
        SwitchSettings(
            host=host, port=port, retry_interval_s=0.2, request_loss=0.2, answer_loss=0.2
        ),
    )
    summary = asyncio.run(switch.send(events))
    assert summary.retried > 0.3 * len(events)
    running.stop()
    stored = pl.read_parquet(
        tmp_path / "data" / "lake" / "events" / "*" / "*.parquet", hive_partitioning=False
    ).select("call_id", "serial")
    assert stored.is_unique().all(), "a report was stored twice"
    # Everything that reached the engine at least once is stored; with seven
    # copies at 20 % loss, almost every report does.
    assert set(stored.iter_rows()) == summary.delivered_keys
    assert len(summary.delivered_keys) >= len(events) - 2


def test_simulate_refuses_a_remote_target_without_the_flag() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "simulate",
            "--scenario",
            "data/scenarios/demo.yaml",
            "--send",
            "--host",
            "192.0.2.10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenarios_are_deterministic_and_labels_match_the_events(
    path: Path, tmp_path: Path
) -> None:
    scenario = load_scenario(path)
    first, second = generate(scenario), generate(scenario)
    assert first.events == second.events and first.labels == second.labels
    events_path, labels_path = write_files(first, tmp_path)
    frame = pl.read_csv(events_path, infer_schema=False)
    call_ids = set(frame["call_id"])
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    assert len(labels) == len(scenario.incidents)
    for label in labels:
        assert set(label["call_ids"]) <= call_ids
    # (call_id, serial) unique, times within the scenario (calls may end after it).
    assert frame.select("call_id", "serial").is_unique().all()


def calls_of(path: str, incident: str) -> tuple[dict[str, list[CallEvent]], dict[str, object]]:
    generated = generate(load_scenario(Path(path)))
    label = next(label for label in generated.labels if label.incident == incident)
    wanted = set(label.call_ids)
    calls: dict[str, list[CallEvent]] = {}
    for event in generated.events:
        if event.call_id in wanted:
            calls.setdefault(event.call_id, []).append(event)
    return calls, label.as_json()


def talk_seconds(events: list[CallEvent]) -> float | None:
    answered = [e.ts for e in events if e.state is CallState.ANSWERED]
    bye = [e.ts for e in events if e.state is CallState.HANGUP]
    return bye[0] - answered[0] if answered and bye else None


def test_incident_families_have_the_property_they_claim() -> None:
    calls, label = calls_of("data/scenarios/fraud-mix.yaml", "wg-1")
    assert all(talk_seconds(c) is None for c in calls.values()), "Wangiri calls are never answered"
    assert len({c[0].callee for c in calls.values()}) == len(calls), "to distinct callees"
    assert len({c[0].caller for c in calls.values()}) == 1

    calls, label = calls_of("data/scenarios/fraud-mix.yaml", "cb-1")
    talks = [talk_seconds(c) for c in calls.values()]
    assert all(t is not None and t <= 4.0 for t in talks), "callback abuse: short answered calls"

    calls, label = calls_of("data/scenarios/fraud-mix.yaml", "irsf-1")
    assert {c[0].forward for c in calls.values()} == {label["entity"]}
    assert str(label["entity"]).startswith("+882")
    assert len({c[0].caller for c in calls.values()}) > 10, "from many callers"
    assert all((talk_seconds(c) or 0) >= 480 for c in calls.values()), "long calls"

    calls, _ = calls_of("data/scenarios/fraud-mix.yaml", "seq-1")
    callees = [int(c[0].callee) for c in sorted(calls.values(), key=lambda c: c[0].ts)]
    assert callees == list(range(callees[0], callees[0] + len(callees)))

    calls, _ = calls_of("data/scenarios/fraud-mix.yaml", "sim-1")
    starts = sorted(c[0].ts for c in calls.values())
    ends = [c[-1].ts for c in calls.values()]
    assert starts[-1] - starts[0] <= 60 and min(ends) > starts[-1], "all in progress at once"

    calls, label = calls_of("data/scenarios/lookalikes.yaml", "campaign-1")
    answered = sum(talk_seconds(c) is not None for c in calls.values())
    assert label["must_alert"] is False and answered / len(calls) > 0.85


def test_scenario_errors_name_file_line_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "duration: 1h\n"
        "incidents:\n"
        "  - id: a\n"
        "    family: callback_abuse\n"
        "    calls: -3\n"
        "  - id: b\n"
        "    family: no_such_family\n"
        "    colour: blue\n"
    )
    with pytest.raises(YamlFileError) as caught:
        load_scenario(path)
    problems = caught.value.problems
    assert any(
        p.startswith(f"{path}:6: incidents.0.calls: Input should be greater") for p in problems
    ), problems
    assert any(p.startswith(f"{path}:8:") and "no_such_family" in p for p in problems), problems


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("250ms") == 0.25
    for bad in ("soon", "1x", "", "-5s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_scenario_defaults_generate_benign_traffic_with_a_daily_rhythm() -> None:
    generated = generate(Scenario(name="day", duration=86400.0, benign={"calls_per_hour": 600}))
    hours = [0] * 24
    for event in generated.events:
        if event.serial == 1:
            hours[int(event.ts % 86400 // 3600)] += 1
    assert max(hours[13:18]) > 2.5 * min(hours[2:6])
    callers: dict[str, int] = {}
    for event in generated.events:
        if event.serial == 1:
            callers[event.caller] = callers.get(event.caller, 0) + 1
    counts = sorted(callers.values(), reverse=True)
    assert counts[0] > 20 * counts[len(counts) // 2], "a heavy tail: trunks and busy callers"


@pytest.mark.parametrize("scenario_path", SCENARIOS, ids=lambda p: p.stem)
def test_a_scenario_generated_a_part_at_a_time_is_the_scenario(
    scenario_path: Path, tmp_path: Path
) -> None:
    # Parts of ten minutes of event time: calls run across many part ends.
    scenario = load_scenario(scenario_path)
    generated = generate(scenario)
    parts = Parts(scenario, part_s=600.0)
    chunks = list(parts)
    assert len(chunks) > 3
    assert [event for chunk in chunks for event in chunk] == generated.events
    assert parts.calls == generated.calls and parts.labels == generated.labels
    for fmt in ("csv", "jsonl", "parquet"):
        whole, whole_labels = write_files(generated, tmp_path / "whole", fmt)
        streamed, labels = write_parts(Parts(scenario, part_s=900.0), tmp_path / "parts", fmt)
        if fmt == "parquet":
            assert pl.read_parquet(streamed).equals(pl.read_parquet(whole))
        else:
            assert streamed.read_bytes() == whole.read_bytes()
        assert labels.read_bytes() == whole_labels.read_bytes()


def test_the_month_scenario_draws_from_more_than_a_million_callers(tmp_path: Path) -> None:
    # bench/month.yaml's population, over its first hour: numbers past a million
    # callers have eight digits after the prefix.
    month = load_scenario(Path("bench/month.yaml"))
    assert month.benign.callers >= 1_500_000 and month.duration == 30 * 86400
    hour = month.model_copy(update={"duration": 3600.0, "incidents": []})
    events, _ = write_parts(Parts(hour), tmp_path / "hour", "parquet")
    frame = pl.read_parquet(events)
    assert frame.height > 10_000
    assert frame["ts"].is_sorted()
    assert frame["caller"].str.len_chars().max() == len("86138") + 8


def _burst_starts(tmp_path: Path, jitter: str) -> list[float]:
    path = tmp_path / f"burst-{jitter}.yaml"
    path.write_text(
        "name: burst\nstart: 2026-11-02T00:00:00+00:00\nduration: 10m\n"
        "benign: {calls_per_hour: 60}\n"
        "incidents:\n"
        "  - {id: cb, family: callback_abuse, at: 60s, calls: 20, spacing: 5s, callers: 10,"
        f" jitter: {jitter}}}\n",
        encoding="utf-8",
    )
    generated = generate(load_scenario(path))
    wanted = set(next(label for label in generated.labels if label.incident == "cb").call_ids)
    return sorted(e.ts for e in generated.events if e.call_id in wanted and e.serial == 1)


def test_a_callback_burst_keeps_its_pace_to_within_its_jitter(tmp_path: Path) -> None:
    exact = _burst_starts(tmp_path, "0s")
    assert [round(b - a, 3) for a, b in itertools.pairwise(exact)] == [5.0] * 19
    jittered = _burst_starts(tmp_path, "0.1s")
    offsets = [t - (exact[0] + 5.0 * n) for n, t in enumerate(jittered)]
    assert all(abs(o) <= 0.1 + 1e-3 for o in offsets)
    assert len({round(o, 3) for o in offsets}) > 10, "drawn for each call"
