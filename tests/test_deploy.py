"""A production install as README's "Deploying" describes it: a wheel without the
development tools, the sample systemd unit, and the Grafana dashboard for the metrics.

The unit is checked by `systemd-analyze verify` (where systemd is installed; .ci/run
installs it) and its ExecStart command line is run as an unprivileged user against a
wheel installed in a venv of its own, from `/`, with no setting for the rules.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core.events import CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from tests.conftest import RunningEngine, Switch, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
UNIT = DEPLOY / "callsentry.service"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
# Where the unit expects things, and what the tests put there instead.
PREFIX = "/opt/callsentry"
CONFIG = "/etc/callsentry/callsentry.toml"
STATE = "/var/lib/callsentry"
DEV_TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "import-linter", "atheris")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def exec_start() -> list[str]:
    return shlex.split(unit()["Service"]["ExecStart"])


def test_the_unit_runs_serve_as_a_service_user_with_its_state_dir() -> None:
    service = unit()["Service"]
    argv = exec_start()
    assert argv[:2] == [f"{PREFIX}/bin/callsentry", "serve"]
    assert argv[argv.index("--data-dir") + 1] == STATE
    assert argv[argv.index("--config") + 1] == CONFIG
    assert service["User"] == "callsentry" and service["StateDirectory"] == "callsentry"
    assert STATE.endswith("/" + service["StateDirectory"])
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hardening in service, hardening


def verify(unit_file: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (.ci/run installs the systemd package)",
)
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: this checkout's stands in for PREFIX's.
    here = Path(sys.executable).parent / "callsentry"
    assert here.exists()
    copy = tmp_path / "callsentry.service"
    copy.write_text(UNIT.read_text().replace(f"{PREFIX}/bin/callsentry", str(here)))
    verify(copy)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder an unprivileged user can read (pytest's own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="callsentry-deploy-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build_wheel(into: Path) -> tuple[Path, str]:
    """The wheel built from a clean copy of the sources, without mypyc (C helpers only),
    and what the build said."""
    source = into / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.sha256", "shipped_rules")
    for name in ("engine", "models", "rules"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--verbose",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(into / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_env(), "CALLSENTRY_COMPILE": "0", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [wheel] = (into / "dist").glob("callsentry-*.whl")
    return wheel, done.stdout + done.stderr


def _clean_env() -> dict[str, str]:
    # Nothing of this checkout or of the test run: no PYTHONPATH, no CALLSENTRY_*.
    return {"LANG": "C.UTF-8", "HOME": "/nonexistent"}


def python_for(user: str) -> str:
    """A Python of this one's minor version that `user` may run (this one may live in a
    home only root can enter, as pyenv's does): the venv is made from it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [getattr(sys, "_base_executable", sys.executable), f"/usr/bin/python{version}"]
    for candidate in candidates:
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                user=user,
                capture_output=True,
                text=True,
                cwd="/",
            )
        except OSError:  # missing, or not the user's to run
            continue
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    pytest.fail(f"no Python {version} that {user} may run among {candidates}")


def install(wheel: Path, venv: Path, python: str) -> Path:
    """A venv of its own (from `python`) holding the wheel; the runtime dependencies come
    from this checkout's venv (appended to its path, after its own site-packages), so
    the test needs no network. Returns the venv's site-packages."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "_callsentry_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return site


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.slow
def test_the_units_command_serves_from_an_installed_wheel_as_an_unprivileged_user(
    shared_tmp: Path,
) -> None:
    wheel, said = build_wheel(shared_tmp)
    # The build says plainly that it runs without the compiled detection.
    assert "callsentry builds without some compiled parts" in said
    assert "detection (mypyc)" in said
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "engine/shipped_rules/short-calls-caller.yaml" in names
    assert "engine/shipped_rules/models/caller-behaviour.yaml" in names
    assert not any(name.startswith("tests/") for name in names)
    # Installing it pulls no development tool: those are the `dev` extra's alone.
    for requirement in wheel_requirements(wheel):
        name = re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].lower()
        if name in DEV_TOOLS:
            assert 'extra == "dev"' in requirement, requirement

    packages = sysconfig.get_path("purelib")
    reachable = subprocess.run(
        ["/bin/sh", "-c", 'test -r "$1" && test -x "$1"', "-", packages], user="nobody"
    )
    if reachable.returncode != 0:
        # The installed venv borrows this checkout's runtime dependencies (no network).
        pytest.skip(f"{packages} is not readable by nobody (a checkout in a private home)")
    venv = shared_tmp / "opt-callsentry"
    site = install(wheel, venv, python_for("nobody"))
    state = shared_tmp / "state"
    state.mkdir()
    shutil.chown(state, "nobody", "nogroup")
    config = shared_tmp / "callsentry.toml"
    shutil.copy(DEPLOY / "callsentry.toml", config)
    config.chmod(0o644)

    # The operator's commands find the shipped rules from anywhere too.
    validated = subprocess.run(
        [str(venv / "bin" / "callsentry"), "rules", "validate"],
        cwd="/",
        env={**_clean_env(), "PATH": "/usr/bin:/bin"},
        user="nobody",
        capture_output=True,
        text=True,
        timeout=120,
    )
    shipped = site / "engine" / "shipped_rules"
    assert validated.returncode == 0, validated.stderr
    assert validated.stdout.startswith(f"{shipped}: ") and "rules valid" in validated.stdout

    argv = [
        arg.replace(PREFIX, str(venv)).replace(CONFIG, str(config)).replace(STATE, str(state))
        for arg in exec_start()
    ]
    if shutil.which("systemd-analyze") is not None:
        # The unit as installed here, with its program now in place.
        rewritten = shared_tmp / "callsentry.service"
        rewritten.write_text(UNIT.read_text().replace(PREFIX, str(venv)))
        verify(rewritten)
    environment = {
        **_clean_env(),
        "PATH": "/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        # Loopback ports of the system's choosing instead of the sample's fixed ones.
        "CALLSENTRY_RECEIVER__LISTEN": '["127.0.0.1:0"]',
        "CALLSENTRY_METRICS__LISTEN": '"127.0.0.1:0"',
    }
    log = shared_tmp / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            argv,
            cwd="/",  # where systemd starts it: no `rules` folder here
            env=environment,
            user="nobody",
            group="nogroup",
            extra_groups=[],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "callsentry serving on" in log.read_text() or process.poll() is not None,
            60,
            "serve to start",
        )
        text = log.read_text()
        assert process.poll() is None, text
        assert f"rules from {shipped} (shipped with callsentry 0.1.0" in text, text
        assert "running without compiled parts: detection runs as Python" in text, text
        http = re.search(r"metrics on (http://[\d.]+:\d+)/metrics", text)
        udp = re.search(r"serving on udp ([\d.]+):(\d+)", text)
        assert http and udp, text
        base = http.group(1)
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, 60, "ready")
        switch = Switch((udp.group(1), int(udp.group(2))))
        try:
            event = CallEvent(
                1796400000.0, "deploy-1", 1, CallState.RINGING, 180, "100", "200", "", "7", "M", ""
            )
            assert switch.ask(Vos3000TextCodec().encode(event)) == b"deploy-1,1"
        finally:
            switch.close()
        status, body = get(f"{base}/healthz")
        assert status == 200 and json.loads(body)["compiled"] == "no"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, log.read_text()
    # What it wrote belongs to the service user.
    written = [p for p in state.rglob("*")]
    assert written and all(p.owner() == "nobody" for p in written)


def exported_metrics(text: str) -> set[str]:
    """The metric names a scrape shows: its samples, and the names its families declare
    (a counter `x` is queried as `x_total`)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.update({f"{name}_total", f"{name}_created"})
            if kind == "info":
                names.add(f"{name}_info")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, query) of every panel, rows' own panels included, and the
    templating queries."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["definition"]


def test_every_dashboard_query_names_a_metric_a_running_engine_exports(
    engine_factory: Callable[..., RunningEngine],
) -> None:
    running = engine_factory(detection={"webhook_url": "http://127.0.0.1:9/hook"})
    engine = running.engine
    assert engine.operator is not None
    base = "http://{}:{}".format(*engine.operator.address)
    switch = Switch(running.address)
    try:
        event = CallEvent(
            1796400000.0, "dash-1", 1, CallState.RINGING, 180, "100", "200", "", "7", "M", ""
        )
        assert switch.ask(Vos3000TextCodec().encode(event)) is not None
    finally:
        switch.close()
    # The age of the last report is exported once there was one.
    wait_for(
        lambda: "callsentry_last_report_age_seconds " in get(f"{base}/metrics")[1], 30, "a report"
    )
    exported = exported_metrics(get(f"{base}/metrics")[1])
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = list(queries(dashboard))
    assert len(found) > 20
    problems = []
    for title, query in found:
        named = set(re.findall(r"\bcallsentry_[a-z0-9_]+", query))
        if not named:
            problems.append(f"{title}: {query} names no callsentry metric")
        problems += [f"{title}: {name} is not exported" for name in sorted(named - exported)]
    assert not problems, "\n".join(problems)
    # And the test can tell: a name the engine does not export is caught.
    assert "callsentry_no_such_metric_total" not in exported


def test_the_default_metrics_address_is_loopback() -> None:
    from engine.apps.settings import load_settings

    listen = load_settings(environ={}).metrics.listen
    host, _, port = listen.rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    # Not taken by a well-known exporter: node_exporter's 9100.
    assert port != "9100"
