"""`make demo`: start the engine on loopback, drive a compressed scenario through real UDP,
stop it, and show what was stored and how to look at it."""

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
from pathlib import Path

import duckdb

SCENARIO = Path("data/scenarios/demo.yaml")
DATA_DIR = Path("data/demo")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--speed", type=float, default=120.0, help="time compression")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
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
    with log.open("wb") as log_handle:
        engine = subprocess.Popen(
            [*command, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
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
    print()
    replay_dir = data_dir.with_name(data_dir.name + "-replay")
    print(f"4. detection: the same scenario replayed in its own event time into {replay_dir}/")
    shutil.rmtree(replay_dir, ignore_errors=True)
    replayed = subprocess.run(
        [
            *command,
            "replay",
            str(data_dir / "scenario" / "events.csv"),
            "--data-dir",
            str(replay_dir),
            "--show",
            "0",
            "--log-level",
            "error",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if replayed.returncode != 0:
        print(replayed.stdout + replayed.stderr)
        return 1
    with duckdb.connect(str(replay_dir / "callsentry.duckdb"), read_only=True) as con:
        calls_rebuilt = con.execute("SELECT count(*) FROM calls").fetchone() or (0,)
        alerts = con.execute(
            "SELECT rule_id, severity, summary, evidence FROM alerts ORDER BY raised_at"
        ).fetchall()
    labels = [
        json.loads(line)
        for line in (data_dir / "scenario" / "labels.jsonl").read_text().splitlines()
    ]
    print(f"  {calls_rebuilt[0]} calls rebuilt, {len(alerts)} alerts:")
    for rule_id, severity, summary, evidence in alerts:
        caught = [label["incident"] for label in labels if set(evidence) & set(label["call_ids"])]
        print(f"    [{severity}] {rule_id}: {summary}  <- {', '.join(caught) or 'no incident'}")
    print("  the scenario's labelled incidents:")
    for label in labels:
        hit = any(set(e) & set(label["call_ids"]) for *_, e in alerts)
        verdict = (
            ("caught" if hit else "MISSED")
            if label["must_alert"]
            else ("silent, as it should be" if not hit else "ALERTED (a look-alike)")
        )
        print(f"    {label['incident']:<12} {label['family']:<20} {verdict}")
    print()
    print(f"review alerts: .venv/bin/callsentry alerts list --data-dir {replay_dir}")
    print("look at them yourself (read-only, also while the engine runs):")
    print(
        f"  .venv/bin/python -c \"import duckdb; print(duckdb.connect('{database}', read_only=True)"
        ".sql('SELECT * FROM events LIMIT 5'))\""
    )
    print(
        f'  .venv/bin/duckdb -readonly {database} "SELECT state, count(*) FROM events GROUP BY ALL"'
    )
    print(f"the scenario's event file and incident labels: {data_dir / 'scenario'}/")
    return 0 if sent.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
