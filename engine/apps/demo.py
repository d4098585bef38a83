"""`make demo`: start the engine on loopback, drive a compressed scenario through real UDP,
stop it, and show what was stored; then build the analysts' database of the same
scenario in its own event time (events, calls, alerts, reviews, quarantine) in
`data/demo/`, and show how to look at it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from engine.lake.views import analysts_command

SCENARIO = Path("data/scenarios/demo.yaml")
DATA_DIR = Path("data/demo")
# Rows an event file may carry that are no reports: the quarantine has them to show.
BAD_ROWS = (
    "2026-11-02T13:30:00+00:00,demo-bad-1,1,RINGRING,8613800000001,4008001000,,1,Main menu\n"
    "yesterday,demo-bad-2,1,OK,8613800000002,4008001000,,1,Main menu\n"
)


@dataclass
class AnalystsDatabase:
    """What `build_analysts_database` made: its alerts (rule, severity, summary,
    evidence, alert id) and the reviews it recorded."""

    alerts: list[tuple[str, str, str, list[str], str]]
    reviewed: list[tuple[str, str]]
    # The scenario's labelled incidents (labels.jsonl), which the reviews went by.
    labels: list[dict[str, Any]]


def build_analysts_database(
    scenario_dir: Path, data_dir: Path, command: list[str]
) -> AnalystsDatabase:
    """Replay the scenario's events (and two rows that are no reports) into `data_dir`
    in their own event time, then review its alerts as a security team would: each
    alert whose calls are a labelled incident's is confirmed, any other marked a false
    positive. Leaves events, calls, alerts, alert_reviews and rejects to query."""
    shutil.rmtree(data_dir, ignore_errors=True)
    events = scenario_dir / "events-with-bad-rows.csv"
    events.write_text(
        (scenario_dir / "events.csv").read_text(encoding="utf-8") + "".join(BAD_ROWS),
        encoding="utf-8",
    )
    replayed = subprocess.run(
        [
            *command,
            *("replay", str(events), "--data-dir", str(data_dir)),
            *("--show", "0", "--log-level", "error"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if replayed.returncode not in (0, 1):  # 1: the bad rows were rejected, as meant
        sys.exit(f"the replay failed:\n{replayed.stdout}{replayed.stderr}")
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        alerts = [
            (rule_id, severity, summary, list(evidence), alert_id)
            for rule_id, severity, summary, evidence, alert_id in con.execute(
                "SELECT rule_id, severity, summary, evidence, alert_id FROM alerts "
                "ORDER BY raised_at"
            ).fetchall()
        ]
    labels = [
        json.loads(line)
        for line in (scenario_dir / "labels.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    reviewed = []
    for _, _, _, evidence, alert_id in alerts:
        caught = [
            label
            for label in labels
            if label["must_alert"] and set(evidence) & set(label["call_ids"])
        ]
        status, note = (
            ("confirmed", f"demo: the calls of incident {caught[0]['incident']}")
            if caught
            else ("false_positive", "demo: no labelled incident behind these calls")
        )
        subprocess.run(
            [
                *command,
                *("alerts", "review", alert_id, "--status", status, "--note", note),
                *("--reviewer", "demo", "--data-dir", str(data_dir)),
            ],
            check=True,
            capture_output=True,
        )
        reviewed.append((alert_id, status))
    return AnalystsDatabase(alerts, reviewed, labels)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(engine: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            sys.exit(f"the engine stopped at start-up:\n{log.read_text()}")
        if "callsentry serving on" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    sys.exit("the engine did not start within a minute")


def _send_malformed(port: int) -> None:
    """A few bad reports, so the quarantine has something to show."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for payload in (b"demo-bad-1,1,RINGRING,100,200,,1,Main", b"demo-bad-2,1,OK", b"\xff\xfe"):
            sock.sendto(payload, ("127.0.0.1", port))
            with contextlib.suppress(OSError):
                sock.recv(64)


def _stream_subjects(url: str, stream: str = "CALLSENTRY") -> dict[str, int]:
    """Messages per subject in the NATS stream (what a consumer would read)."""
    import asyncio

    async def read() -> dict[str, int]:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(stream, subjects_filter=">")
            return dict(info.state.subjects or {})
        finally:
            await nc.close()

    return asyncio.run(read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--speed", type=float, default=120.0, help="time compression")
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR.with_name("demo-live"), help="the live run"
    )
    parser.add_argument(
        "--analysts-dir", type=Path, default=DATA_DIR, help="the analysts' database"
    )
    args = parser.parse_args()

    data_dir: Path = args.data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log = data_dir / "engine.log"
    port = _free_port()
    command = [sys.executable, "-m", "engine"]
    print(f"1. starting the engine on udp 127.0.0.1:{port}, data in {data_dir}/ (log: {log})")
    # The demo compresses two hours into a minute, and live event time is arrival time:
    # detection on those compressed times would see every call as a few-second call.
    # So the live part shows the protocol and the store; step 4 shows detection on
    # the same scenario in its own time, through replay.
    environment = {**os.environ, "CALLSENTRY_DETECTION__ENABLED": "false"}
    # NATS JetStream beside it, when the dev extra's nats-server is installed: the
    # engine publishes every report to it (README "Relaying to existing consumers").
    from engine.simulator.natsserver import NatsServer, nats_server_binary

    nats_server = NatsServer(data_dir / "nats") if nats_server_binary() is not None else None
    relay = []
    if nats_server is not None:
        nats_server.start()
        relay = ["--relay-nats", nats_server.url]
        print(f"   with NATS JetStream on {nats_server.url} (store in {data_dir / 'nats'}/)")
    with log.open("wb") as log_handle:
        engine = subprocess.Popen(
            [
                *command,
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(data_dir),
                # Any free port: the default one may be a running engine's.
                "--metrics",
                "127.0.0.1:0",
                *relay,
            ],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        _wait_until_serving(engine, log)
        print(f"2. the switch stand-in sends {SCENARIO} at {args.speed:g}x over real UDP")
        sent = subprocess.run(
            [
                *command,
                "simulate",
                "--scenario",
                str(SCENARIO),
                "--to-file",
                str(data_dir / "scenario"),
                "--send",
                "--port",
                str(port),
                "--speed",
                str(args.speed),
            ],
            check=False,
        )
        _send_malformed(port)
    finally:
        print("3. stopping the engine (SIGTERM: answer what was accepted, flush, exit)")
        engine.send_signal(signal.SIGTERM)
        code = engine.wait(timeout=60)
        subjects: dict[str, int] = {}
        if nats_server is not None:
            with contextlib.suppress(Exception):
                subjects = _stream_subjects(nats_server.url)
            nats_server.stop()
    if code != 0:
        print(f"the engine exited with {code}; see {log}")
        return 1

    database = data_dir / "callsentry.duckdb"
    with duckdb.connect(str(database), read_only=True) as con:
        events, calls = con.execute(
            "SELECT count(*), count(DISTINCT call_id) FROM events"
        ).fetchone() or (0, 0)
        states = con.execute(
            "SELECT state, count(*) FROM events GROUP BY state ORDER BY state"
        ).fetchall()
        rejects = con.execute(
            "SELECT reason, count(*) FROM rejects GROUP BY reason ORDER BY reason"
        ).fetchall()
        menus = con.execute(
            "SELECT menu_id, any_value(menu_name), count(DISTINCT call_id) AS calls "
            "FROM events GROUP BY menu_id ORDER BY calls DESC LIMIT 6"
        ).fetchall()
    print()
    print(f"stored {events} reports of {calls} calls")
    print("  by state:  " + ", ".join(f"{state} {n}" for state, n in states))
    print("  top menus: " + ", ".join(f"{mid} {name!r} {n}" for mid, name, n in menus))
    print("  quarantined: " + (", ".join(f"{r} {n}" for r, n in rejects) or "none"))
    if subjects:
        top = sorted(subjects.items(), key=lambda item: -item[1])[:6]
        print(
            f"  published to NATS: {sum(subjects.values())} messages; "
            + ", ".join(f"{subject} {n}" for subject, n in top)
        )
    print()
    analysts_dir: Path = args.analysts_dir
    print(
        "4. detection: the same scenario in its own event time, replayed into the "
        f"analysts' database {analysts_dir}/, its alerts reviewed"
    )
    built = build_analysts_database(data_dir / "scenario", analysts_dir, command)
    analysts_db = analysts_dir / "callsentry.duckdb"
    with duckdb.connect(str(analysts_db), read_only=True) as con:
        counts = {
            table: (con.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,))[0]
            for table in ("events", "calls", "alerts", "alert_reviews", "rejects")
        }
    labels = built.labels
    print("  " + ", ".join(f"{table} {n}" for table, n in counts.items()))
    print(f"  {len(built.alerts)} alerts:")
    for rule_id, severity, summary, evidence, _ in built.alerts:
        caught = [label["incident"] for label in labels if set(evidence) & set(label["call_ids"])]
        print(f"    [{severity}] {rule_id}: {summary}  <- {', '.join(caught) or 'no incident'}")
    print("  the scenario's labelled incidents:")
    for label in labels:
        hit = any(set(e) & set(label["call_ids"]) for *_, e, _ in built.alerts)
        verdict = (
            ("caught" if hit else "MISSED")
            if label["must_alert"]
            else ("silent, as it should be" if not hit else "ALERTED (a look-alike)")
        )
        print(f"    {label['incident']:<12} {label['family']:<20} {verdict}")
    print()
    print(f"review alerts: .venv/bin/callsentry alerts list --status all --data-dir {analysts_dir}")
    print("look at them yourself (read-only, also while an engine runs):")
    print(
        f"  .venv/bin/python -c \"import duckdb; print(duckdb.connect('{analysts_db}', "
        "read_only=True).sql('SELECT * FROM alerts_current'))\""
    )
    print(f'  {analysts_command(analysts_dir)} "SELECT state, count(*) FROM events GROUP BY ALL"')
    print(f"the scenario's event file and incident labels: {data_dir / 'scenario'}/")
    return 0 if sent.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
