"""/healthz, /readyz and /metrics of a running engine, asked over real HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningEngine, wait_for

ROOT = Path(__file__).resolve().parents[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    status, body = get(f"{base}/readyz")
    return status, json.loads(body)


def metric(text: str, name: str) -> float | None:
    """The value of the sample `name` (with its labels, if any) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_readyz_says_why_while_the_lake_writer_is_killed(
    engine_factory: Callable[..., RunningEngine],
) -> None:
    running = engine_factory(metrics={"listen": "127.0.0.1:0"})
    engine = running.engine
    assert engine.operator is not None
    base = "http://{}:{}".format(*engine.operator.address)

    status, body = get(f"{base}/healthz")
    assert status == 200 and json.loads(body)["alive"] is True
    wait_for(lambda: readyz(base)[0] == 200, what="ready once the rules are loaded")
    status, ready = readyz(base)
    assert ready["ready"] is True and ready["reasons"] == []
    assert ready["checks"]["rules"]["rules"] > 0
    pid = ready["checks"]["lake_writer"]["pid"]

    # Housekeeping would restart the writer within seconds: held back, so the state
    # between the kill and the restart can be looked at for as long as needed.
    engine.housekeeping.scheduler.pause_job("lake-writer")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: readyz(base)[0] == 503, what="/readyz to see the killed lake writer")
    status, down = readyz(base)
    assert status == 503 and down["ready"] is False
    assert down["reasons"] == [
        "lake_writer: the lake writer is not running (killed by signal 9); "
        "it is restarted within seconds"
    ]
    status, metrics = get(f"{base}/metrics")
    assert metric(metrics, "callsentry_lake_writer_up") == 0
    assert metric(metrics, "callsentry_ready") == 0

    engine.housekeeping.scheduler.resume_job("lake-writer")
    wait_for(
        lambda: readyz(base)[1]["checks"]["lake_writer"]["restarts"] == 1,
        what="the lake writer restarted",
    )
    # Ready again only once the new writer has loaded the rules again.
    wait_for(lambda: readyz(base)[0] == 200, what="ready after the restart")
    status, again = readyz(base)
    assert again["checks"]["lake_writer"]["pid"] != pid
    assert again["checks"]["rules"]["loads"] == 2
    status, metrics = get(f"{base}/metrics")
    assert metric(metrics, "callsentry_lake_writer_restarts_total") == 1
    assert metric(metrics, 'callsentry_rule_loads_total{result="success"}') == 2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[str], Path]]:
    """`callsentry serve` as an operator starts it, on a copy of the shipped rules."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    env["CALLSENTRY_DETECTION__RELOAD_INTERVAL_S"] = "0"  # reloads on SIGHUP only
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "data"),
                "--rules",
                str(rules),
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(lambda: "callsentry serving on" in log.read_text(), 60, "serve to start")
        text = log.read_text()
        http = re.search(r"metrics on (http://[\d.]+:\d+)/metrics", text)
        udp = re.search(r"serving on udp ([\d.]+:\d+)", text)
        assert http and udp, text
        yield http.group(1), udp.group(1), process, rules
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def test_a_serving_engine_reports_rules_alerts_and_its_build(
    served: tuple[str, str, subprocess.Popen[str], Path],
) -> None:
    base, udp, process, rules = served
    wait_for(lambda: readyz(base)[0] == 200, 60, "ready")
    status, ready = readyz(base)
    assert ready["checks"]["reports"]["last_report_age_s"] is None
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "simulate",
            "--scenario",
            str(ROOT / "data/scenarios/demo.yaml"),
            "--send",
            "--port",
            udp.rsplit(":", 1)[1],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def by_rule(text: str) -> dict[tuple[str, str, str], float]:
        found = re.findall(
            r'^callsentry_rule_alerts_total\{mode="(\w+)",rule="([\w-]+)",severity="(\w+)"\} (\S+)',
            text,
            re.MULTILINE,
        )
        return {(rule, severity, mode): float(n) for mode, rule, severity, n in found}

    def alerted() -> bool:
        text = get(f"{base}/metrics")[1]
        live = sum(n for (_, _, mode), n in by_rule(text).items() if mode == "alert")
        return live > 0 and live == metric(text, "callsentry_alerts_total")

    wait_for(alerted, 60, "alerts counted by rule as the lake writer raises them")
    metrics = get(f"{base}/metrics")[1]
    assert {severity for _, severity, _ in by_rule(metrics)} <= {
        "low",
        "medium",
        "high",
        "critical",
    }
    assert re.search(
        r'^callsentry_build_info\{compiled="\w+",python="[\d.]+",version=', metrics, re.M
    )
    assert metric(metrics, "callsentry_last_report_age_seconds") is not None
    assert metric(metrics, 'callsentry_rule_loads_total{result="success"}') == 1
    last_load = metric(metrics, "callsentry_rule_last_load_success_timestamp_seconds")
    assert last_load is not None and last_load > 0

    # A bad edit is refused: counted as a failed load, the running rules stay, and the
    # engine stays ready.
    broken = rules / "short-calls-caller.yaml"
    good = broken.read_text()
    broken.write_text(good + "\nthis: [is not valid\n")
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            metric(get(f"{base}/metrics")[1], 'callsentry_rule_loads_total{result="failure"}') == 1
        ),
        60,
        "the failed reload counted",
    )
    status, ready = readyz(base)
    assert status == 200 and ready["checks"]["rules"]["failed_loads"] == 1
    assert ready["checks"]["reports"]["last_report_age_s"] is not None
    broken.write_text(good)
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            metric(get(f"{base}/metrics")[1], 'callsentry_rule_loads_total{result="success"}') == 2
        ),
        60,
        "the reload counted",
    )
    metrics = get(f"{base}/metrics")[1]
    later = metric(metrics, "callsentry_rule_last_load_success_timestamp_seconds")
    assert later is not None and later >= last_load


def test_a_metrics_address_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"callsentry: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in done.stderr


def test_an_unknown_path_is_a_404_naming_the_ones_there_are(
    engine_factory: Callable[..., RunningEngine],
) -> None:
    engine = engine_factory(metrics={"listen": "127.0.0.1:0"}).engine
    assert engine.operator is not None
    status, body = get("http://{}:{}/nothing".format(*engine.operator.address))
    assert status == 404 and "/readyz" in json.loads(body)["error"]


def test_serve_stops_on_sigterm_after_its_lake_writer_was_killed_while_waiting(
    served: tuple[str, str, subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    # The writer spends its idle time waiting on the stop event; one killed there left
    # a sleeper on it that never woke, and the stop's `set()` waited for it for ever:
    # serve hung on SIGTERM until a SIGKILL, with no snapshot and the lake unwritten.
    base, _, process, _ = served
    wait_for(lambda: readyz(base)[0] == 200, 60, "ready")
    for kill in (1, 2):
        pid = readyz(base)[1]["checks"]["lake_writer"]["pid"]
        time.sleep(1.0)  # nothing to write: the writer is waiting between its passes
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda kills=kill: readyz(base)[1]["checks"]["lake_writer"]["restarts"] == kills,
            60,
            "the lake writer restarted",
        )
        wait_for(lambda: readyz(base)[0] == 200, 60, "ready after the restart")
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("serve did not stop within 60 s of SIGTERM") from None
    assert code == 0
    log = (tmp_path / "serve.log").read_text()
    assert "lake writer exited with code -9; restarting it" in log
