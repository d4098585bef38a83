"""Deployment checks and several switches, end to end: `callsentry serve` as a process,
real UDP on loopback (127.0.0.1, .2 and .3 are all this machine on Linux), the lake
read back through `callsentry.duckdb` as an analyst reads it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from engine.apps.simulate import as_checks
from engine.core.events import CHECK_CALL_ID_PREFIX, CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from engine.simulator.consumer import ConsumerStandIn
from tests.conftest import Switch, wait_for

ROOT = Path(__file__).resolve().parent.parent
CALLER = "8613800000777"

# Three calls started by one caller in a minute: an alert, by the rule below.
BURST_RULE = """
id: {id}
title: Calls in a burst
severity: high
on: call_start
selection: {selection}
aggregate:
  type: count
  group_by: {group_by}
  window: 10m
condition:
  op: ">="
  threshold: 3
suppression:
  duration: 1h
"""


def calls(prefix: str, count: int = 3, caller: str = CALLER) -> list[CallEvent]:
    """`count` answered calls of `caller`, three reports each."""
    now = time.time()
    events = []
    for n in range(count):
        for serial, state in (
            (1, CallState.RINGING),
            (2, CallState.ANSWERED),
            (3, CallState.HANGUP),
        ):
            events.append(
                CallEvent(
                    now + n, f"{prefix}-{n}", serial, state, None, caller, "4008001000", "",
                    "1", "Main menu",
                )
            )  # fmt: skip
    return events


def write_events(path: Path, events: list[CallEvent]) -> Path:
    lines = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    for e in events:
        lines.append(
            f"{e.ts},{e.call_id},{e.serial},{e.state.value},{e.caller},{e.callee},"
            f"{e.forward},{e.menu_id},{e.menu_name}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def send(bind: str, target: tuple[str, int], events: list[CallEvent]) -> None:
    """Each report from `bind`, as the switch would, waiting for its answer."""
    codec = Vos3000TextCodec()
    switch = Switch(target, bind)
    try:
        for event in events:
            answer = switch.ask(codec.encode(event), timeout=10)
            assert answer == f"{event.call_id},{event.serial}".encode(), answer
    finally:
        switch.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def rules_folder(root: Path, rules: dict[str, tuple[str, str]]) -> Path:
    """Rule files named by id, each (selection, group_by) of the burst rule."""
    folder = root / "rules"
    folder.mkdir()
    for rule_id, (selection, group_by) in rules.items():
        (folder / f"{rule_id}.yaml").write_text(
            BURST_RULE.format(id=rule_id, selection=selection, group_by=group_by)
        )
    return folder


SERVE = [sys.executable, "-m", "engine", "serve"]


@contextmanager
def serving(
    root: Path, receiver: str, rules: Path, more: str = ""
) -> Iterator[tuple[tuple[str, int], Path]]:
    """`callsentry serve --config` with `receiver` lines in its [receiver] section (and
    `more` sections after the others); yields the UDP address it answers on and its
    data dir."""
    root.mkdir(exist_ok=True)
    data_dir = root / "data"
    config = root / "callsentry.toml"
    config.write_text(
        f'[receiver]\nlisten = ["127.0.0.1:0"]\n{receiver}\n'
        f'[store]\ndata_dir = "{data_dir}"\nflush_interval_s = 0.2\n'
        f'[detection]\nrules_dir = "{rules}"\nmodels_enabled = false\ntick_s = 0.2\n'
        f'settle_s = 0.2\nalerts_jsonl = "{root / "alerts.jsonl"}"\n{more}'
    )
    log = root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            # Metrics on any free port: another serve on this machine may hold the default.
            [*SERVE, "--config", str(config), "--metrics", "127.0.0.1:0"],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def started() -> bool:
            assert process.poll() is None, log.read_text()
            return "callsentry serving on" in log.read_text()

        wait_for(started, 60, "serve to start")
        found = re.search(r"serving on udp ([\d.]+):(\d+)", log.read_text())
        assert found, log.read_text()
        yield (found.group(1), int(found.group(2))), data_dir
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def query(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def count(data_dir: Path, sql: str) -> int:
    return int(query(data_dir, sql)[0][0])  # type: ignore[call-overload]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *argv],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checks_from_a_check_sender_are_answered_kept_apart_and_never_detected(
    tmp_path: Path,
) -> None:
    rules = rules_folder(tmp_path, {"burst": ("{}", "caller")})
    # Check-marked datagrams that, as reports, make the burst rule alert.
    marked = as_checks(calls("run"))
    assert all(e.call_id.startswith(CHECK_CALL_ID_PREFIX) for e in marked)
    events_file = write_events(tmp_path / "events.csv", calls("run"))

    # Checks only from 127.0.0.1: from .3 the same datagrams are reports like any other.
    receiver = 'check_senders = ["127.0.0.1/32"]'
    with serving(tmp_path / "checked", receiver, rules) as (target, data_dir):
        sent = cli(
            "simulate", "--events", str(events_file), "--send", "--check",
            "--port", str(target[1]), "--retry-interval", "0.5",
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "OK: every report was answered" in sent.stdout
        assert "`callsentry checks list` there" in sent.stdout
        wait_for(lambda: count(data_dir, "SELECT count(*) FROM checks") == 9, 60, "checks stored")
        # Then reports from a sender that may not send checks: once their calls and
        # alert are in, detection has run past the checks (the lake writes in order).
        send("127.0.0.3", target, as_checks(calls("other", count=1)))
        wait_for(lambda: count(data_dir, "SELECT count(*) FROM calls") == 1, 60, "a call finished")
        stored = query(data_dir, "SELECT DISTINCT call_id, source FROM checks ORDER BY 1")
        assert [row[0] for row in stored] == sorted({e.call_id for e in marked})
        assert count(data_dir, "SELECT count(*) FROM events WHERE call_id LIKE '%run%'") == 0
        assert {str(row[1]).rpartition(":")[0] for row in stored} == {"127.0.0.1"}
        assert count(data_dir, "SELECT count(*) FROM events") == 3
        assert query(data_dir, "SELECT DISTINCT source FROM events")[0][0].startswith("127.0.0.3:")
        assert count(data_dir, "SELECT count(*) FROM alerts") == 0, "one call is no burst"
        listed = cli("checks", "list", "--data-dir", str(data_dir))
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"from 127\.0\.0\.1:\d+\s+9 reports, 3 calls", listed.stdout), listed
        assert "127.0.0.3" not in listed.stdout
    alerts_file = tmp_path / "checked" / "alerts.jsonl"
    assert not alerts_file.exists() or not alerts_file.read_text().strip()

    # The same datagrams from a sender that is no check sender: reports, calls, an alert.
    with serving(tmp_path / "unchecked", 'check_senders = ["127.0.0.1/32"]', rules) as (
        target,
        data_dir,
    ):
        send("127.0.0.3", target, marked)
        wait_for(lambda: count(data_dir, "SELECT count(*) FROM calls") == 3, 60, "calls finished")
        assert count(data_dir, "SELECT count(*) FROM events") == 9
        assert count(data_dir, "SELECT count(*) FROM checks") == 0
        assert query(data_dir, "SELECT rule_id, entity FROM alerts") == [("burst", CALLER)]
        assert (tmp_path / "unchecked" / "alerts.jsonl").read_text().count("\n") == 1
        listed = cli("checks", "list", "--data-dir", str(data_dir))
        assert listed.stdout.strip() == "no check reports stored", listed


def test_checks_are_answered_and_stored_but_reach_no_relay_target(tmp_path: Path) -> None:
    rules = rules_folder(tmp_path, {"burst": ("{}", "caller")})
    consumer = ConsumerStandIn("127.0.0.1", 0).start()
    relay = (
        f'[[relay.udp]]\ntarget = "127.0.0.1:{consumer.address[1]}"\nname = "before"\n'
        "retry_interval_s = 0.2\n"
    )
    # Check-marked reports from the check sender, then reports marked the same way
    # from a sender that may send no checks (other call ids: a repeated (call_id,
    # serial) is answered as a copy and never stored or relayed again, whoever sends it).
    checks, others = as_checks(calls("run", count=2)), as_checks(calls("other", count=2))
    wanted = {(e.call_id, e.serial) for e in others}
    try:
        with serving(tmp_path, 'check_senders = ["127.0.0.1/32"]', rules, relay) as (
            target,
            data_dir,
        ):
            # serve's relay target is new: it gets every report stored from serve's
            # start on, in stored order.
            send("127.0.0.1", target, checks)  # each answered (send asserts it)
            send("127.0.0.3", target, others)
            wait_for(lambda: consumer.received_keys() >= wanted, 60, "reports relayed")
            # A segment's tables are written one file after another: wait for both.
            wait_for(
                lambda: (
                    count(data_dir, "SELECT count(*) FROM events") == 6
                    and count(data_dir, "SELECT count(*) FROM checks") == 6
                ),
                60,
                "events and checks stored",
            )
            stored = query(data_dir, "SELECT DISTINCT call_id FROM checks ORDER BY 1")
            assert [row[0] for row in stored] == sorted({e.call_id for e in checks})
            assert count(data_dir, "SELECT count(*) FROM checks") == 6
            assert count(data_dir, "SELECT count(*) FROM events WHERE call_id LIKE '%run%'") == 0
    finally:
        consumer.stop()
    # The checks were stored before the others, so the relay had passed them when the
    # others came; serve has stopped since, and nothing more came.
    assert consumer.received_keys() == wanted
    assert not any("run" in call_id for call_id in consumer.received.serials)


def test_two_switches_are_named_in_every_report_and_call_and_alert_apart(
    tmp_path: Path,
) -> None:
    rules = rules_folder(
        tmp_path,
        {
            "burst-per-switch": ("{}", "[switch, caller]"),
            "burst-east": ("{switch: east}", "caller"),
        },
    )
    receiver = '[receiver.switches]\neast = "127.0.0.1"\nwest = ["127.0.0.2/32"]'
    with serving(tmp_path, receiver, rules) as (target, data_dir):
        # The same caller through each switch, and through an address no switch is
        # named for; east also sends a call whose id has the check prefix: from a
        # switch that means nothing.
        send("127.0.0.1", target, calls("east"))
        send("127.0.0.2", target, calls("west"))
        send("127.0.0.3", target, calls("nameless", count=2))
        send("127.0.0.1", target, as_checks(calls("east-marked", count=1)))
        wait_for(lambda: count(data_dir, "SELECT count(*) FROM calls") == 9, 60, "calls finished")
        per_switch = query(
            data_dir, "SELECT switch, count(*) FROM events GROUP BY switch ORDER BY switch"
        )
        assert per_switch == [("", 6), ("east", 12), ("west", 9)]
        assert count(data_dir, "SELECT count(*) FROM checks") == 0
        by_call = query(
            data_dir,
            "SELECT switch, count(*) FROM calls GROUP BY switch ORDER BY switch",
        )
        assert by_call == [("", 2), ("east", 4), ("west", 3)]
        alerts = query(
            data_dir, "SELECT rule_id, entity_type, entity FROM alerts ORDER BY rule_id, entity"
        )
    assert alerts == [
        ("burst-east", "caller", CALLER),
        ("burst-per-switch", "switch/caller", f"east/{CALLER}"),
        ("burst-per-switch", "switch/caller", f"west/{CALLER}"),
    ]
