"""Actions on alerts: decided once per (action, alert), durable before anything is done,
done at least once with their idempotency key through the outbox, waiting for a
reviewer where they must (approve mode, a used-up budget), undone when they expire,
and written down in an append-only trail. A loopback HTTP server stands in for the
switch's web API; the engine is a real `serve`, killed for real."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from engine.alerts.actionbook import DESTINATIONS, ActionBook, ActionError, approve
from engine.alerts.actions import ActionDestination, ActionSink
from engine.alerts.actionspec import ActionSet, load_actions
from engine.alerts.couriers import Courier, RetryPolicy
from engine.alerts.outbox import Outbox, outbox_path
from engine.alerts.webhook import IDEMPOTENCY_HEADER
from engine.core.events import CallEvent, CallState
from engine.core.yamlfile import YamlFileError
from engine.detect.alerts import Alert
from engine.ingest.codec import Vos3000TextCodec
from engine.simulator.switch import SwitchSettings, SwitchStandIn
from tests.conftest import RunningEngine, make_settings, wait_for

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(give_up_after_s=3600, first_backoff_s=0.05, max_backoff_s=0.2, poll_s=0.05)


def alert(n: int, entity: str | None = None, **fields: str) -> Alert:
    values: dict[str, object] = dict(
        alert_id=f"alert-{n:04d}", rule_id="risky-destination-forward", detector="rule",
        severity="critical", entity_type="forward", entity=entity or f"+88213{n:07d}",
        window_start=0.0, window_end=1.0, raised_at=1.0 + n, value=1.0, threshold=1.0,
        summary=f"risky {n}", evidence=[f"c{n}"], rule_version="v1",
    )  # fmt: skip
    values.update(fields)
    return Alert(**values)  # type: ignore[arg-type]


class StandIn:
    """The switch's web API on loopback: records each request (path, idempotency key,
    body) in order. `hold`: the first request is answered only once `release` is set,
    and `arrived` says it came (a test kills the engine meanwhile)."""

    def __init__(self, port: int = 0, *, hold: bool = False) -> None:
        self.requests: list[tuple[str, str, dict[str, object]]] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.release = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with stand_in.lock:
                    stand_in.requests.append(
                        (self.path, self.headers.get(IDEMPOTENCY_HEADER, ""), body)
                    )
                    first = len(stand_in.requests) == 1
                if hold and first:
                    stand_in.arrived.set()
                    stand_in.release.wait(60)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # the engine was killed while we held the answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/external/server/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def keys(self) -> list[str]:
        with self.lock:
            return [key for _, key, _ in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_ins() -> Iterator[list[StandIn]]:
    made: list[StandIn] = []
    yield made
    for stand_in in made:
        stand_in.close()


def write_action(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def http_action(url: str, *, mode: str = "auto", per_hour: int = 20, extra: str = "") -> str:
    return f"""id: hook
match: {{severities: [critical]}}
kind: http
mode: {mode}
http:
  url: "{url}?number={{entity}}"
  method: POST
  body: {{alert: "{{alert_id}}", entity: "{{entity}}", rule: "{{rule_id}}"}}
budget: {{per_hour: {per_hour}}}
{extra}"""


class Clock:
    """Wall-clock time that moves only when a test moves it (from now: `approve`, like
    the CLI, stamps with the real clock)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def rig(tmp_path: Path, text: str, clock: Clock | None = None) -> tuple[ActionSink, ActionBook]:
    actions = load_actions(write_action(tmp_path / "actions", "a", text).parent)
    clock = clock or Clock()
    book = ActionBook(Outbox(outbox_path(tmp_path / "data"), clock=clock), clock=clock)
    return ActionSink(lambda: book, actions), book


def run_couriers(book: ActionBook, until: Callable[[], bool]) -> None:
    """The couriers' passes, in this thread, until `until()` holds."""
    couriers = [
        Courier(book.outbox, ActionDestination(book, kind), FAST, clock=book.clock)
        for kind in DESTINATIONS
    ]
    for _ in range(200):
        for courier in couriers:
            courier.work()
        if until():
            return
    raise AssertionError("the couriers never got there")


def events(book: ActionBook, request_id: int) -> list[str]:
    return [row["event"] for row in book.trail(request_id)]


# -- definitions ----------------------------------------------------------------------


def test_an_unknown_field_in_a_template_is_refused_with_its_line(tmp_path: Path) -> None:
    text = http_action("http://127.0.0.1:9/x").replace('rule: "{rule_id}"', 'rule: "{rule}"')
    folder = write_action(tmp_path / "actions", "hook", text).parent
    with pytest.raises(YamlFileError) as error:
        load_actions(folder)
    assert error.value.problems == [
        f"{folder / 'hook.yaml'}:8: http.body.rule: unknown placeholder {{rule}} (known: "
        "alert_id, rule_id, detector, severity, entity_type, entity, window_start, window_end, "
        "raised_at, value, threshold, summary, rule_version, level, action_id)"
    ]


def test_a_header_that_would_inject_another_is_refused_with_its_line(tmp_path: Path) -> None:
    text = http_action("http://127.0.0.1:9/x").replace(
        "  method: POST\n", '  method: POST\n  headers:\n    X-Note: "fine\\r\\nX-Evil: 1"\n'
    )
    folder = write_action(tmp_path / "actions", "hook", text).parent
    with pytest.raises(YamlFileError) as error:
        load_actions(folder)
    assert error.value.problems == [
        f"{folder / 'hook.yaml'}:9: http.headers.X-Note: a header value cannot hold a line "
        "break (it would inject a header)"
    ]


def test_a_credential_written_in_the_file_is_refused(tmp_path: Path) -> None:
    text = http_action("http://127.0.0.1:9/x").replace(
        "  method: POST\n", '  method: POST\n  headers: {Authorization: "Bearer s3cret"}\n'
    )
    folder = write_action(tmp_path / "actions", "hook", text).parent
    with pytest.raises(YamlFileError, match=r"hook.yaml:8: http.headers.Authorization: .*env"):
        load_actions(folder)


def test_every_problem_of_every_file_is_listed_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "actions"
    write_action(folder, "a", "id: a\nmatch: {}\nkind: block\nmode: sometimes\n")
    write_action(folder, "b", "id: b\nmatch: {colours: [red]}\nkind: http\n")
    with pytest.raises(YamlFileError) as error:
        load_actions(folder)
    problems = "\n".join(error.value.problems)
    assert f"{folder / 'a.yaml'}:4: mode:" in problems
    assert f"{folder / 'b.yaml'}:2: match.colours: unknown key" in problems


@pytest.mark.parametrize("kind", ["http", "htp"])
def test_every_problem_of_one_file_is_listed_at_once(tmp_path: Path, kind: str) -> None:
    # A line break in a header hid the credential and the unknown placeholder until it
    # was mended, and a typo in `kind:` hid all three.
    text = (
        http_action("http://127.0.0.1:9/x")
        .replace("kind: http", f"kind: {kind}")
        .replace('rule: "{rule_id}"', 'rule: "{actionid}"')
        .replace(
            "  method: POST\n",
            '  method: POST\n  headers:\n    X-Note: "a\\nb"\n    Authorization: "Bearer x"\n',
        )
    )
    folder = write_action(tmp_path / "actions", "hook", text).parent
    with pytest.raises(YamlFileError) as error:
        load_actions(folder)
    where = folder / "hook.yaml"
    problems = error.value.problems
    assert f"{where}:9: http.headers.X-Note: a header value cannot hold a line break" in "\n".join(
        problems
    )
    assert any(p.startswith(f"{where}:10: http.headers.Authorization: ") for p in problems)
    assert any(p.startswith(f"{where}:11: http.body.rule: unknown placeholder") for p in problems)
    assert any(p.startswith(f"{where}:3: kind: ") for p in problems) == (kind == "htp")
    assert len(problems) == (4 if kind == "htp" else 3), problems


def test_the_shipped_actions_are_valid_and_switched_off() -> None:
    shipped = load_actions(ROOT / "rules" / "actions")
    ids = {action.id for action in shipped.actions}
    assert {"block-risky-forward", "vos3000-blacklist-forward"} <= ids
    assert shipped.enabled == []
    vos = next(a for a in shipped.actions if a.id == "vos3000-blacklist-forward")
    assert "EXAMPLE ONLY" in (ROOT / "rules/actions/vos3000-blacklist-forward.yaml").read_text()
    assert vos.http is not None and vos.http.env == {"password": "VOS3000_API_PASSWORD"}


# -- deciding and doing ---------------------------------------------------------------


def test_an_auto_action_fires_once_per_alert_with_its_idempotency_key(
    tmp_path: Path, stand_ins: list[StandIn]
) -> None:
    stand_in = StandIn()
    stand_ins.append(stand_in)
    sink, book = rig(tmp_path, http_action(stand_in.url()))
    entity = '+88213"0\\01 &x=1'
    sink.deliver([alert(1, entity), alert(2)])
    # The lake writer repeats a segment's alerts after a crash: nothing new is decided.
    sink.deliver([alert(1, entity), alert(2)])
    assert [r.state for r in book.requests()] == ["queued", "queued"]
    run_couriers(book, lambda: len(book.requests(("done",))) == 2)
    assert sorted(stand_in.keys()) == ["hook:alert-0001:do", "hook:alert-0002:do"]
    path, _, body = next(r for r in stand_in.requests if r[1] == "hook:alert-0001:do")
    # URL-encoded in the URL, JSON-escaped in the body.
    assert path == "/external/server/hook?number=%2B88213%220%5C01%20%26x%3D1"
    assert body == {"alert": "alert-0001", "entity": entity, "rule": "risky-destination-forward"}
    # Done entries are never sent again.
    run_couriers(book, lambda: True)
    assert len(stand_in.requests) == 2
    request = book.requests(("done",))[0]
    trail = book.trail(request.id)
    assert [row["event"] for row in trail] == ["queued", "fired"]
    assert trail[-1]["status"] == "HTTP 200"
    assert trail[-1]["request"].startswith("POST http://127.0.0.1:")
    assert book.counts()["hook"].fired == 2


def test_approve_mode_waits_and_fires_on_approval(tmp_path: Path, stand_ins: list[StandIn]) -> None:
    stand_in = StandIn()
    stand_ins.append(stand_in)
    clock = Clock()
    sink, book = rig(tmp_path, http_action(stand_in.url(), mode="approve"), clock)
    sink.deliver([alert(1)])
    (request,) = book.requests()
    assert (request.state, request.hold) == ("pending", "approval")
    run_couriers(book, lambda: True)
    assert stand_in.requests == []
    assert book.counts()["hook"].pending == 1
    with pytest.raises(ActionError, match="reviewer"):
        approve(tmp_path / "data", request.id, " ")
    approved = approve(tmp_path / "data", request.id, "ana")
    assert approved.state == "queued" and approved.approved_by == "ana"
    with pytest.raises(ActionError, match="is queued, not waiting for approval"):
        approve(tmp_path / "data", request.id, "ana")
    clock.now = time.time()  # the approval's time
    run_couriers(book, lambda: book.request(request.id).state == "done")
    assert stand_in.keys() == ["hook:alert-0001:do"]
    trail = book.trail(request.id)
    assert [row["event"] for row in trail] == ["awaiting_approval", "approved", "fired"]
    assert trail[1]["reviewer"] == "ana"
    counts = book.counts()["hook"]
    assert (counts.approved, counts.fired, counts.pending) == (1, 1, 0)


def test_the_budget_turns_the_next_action_into_a_pending_one_with_a_notice(
    tmp_path: Path, stand_ins: list[StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    stand_in = StandIn()
    stand_ins.append(stand_in)
    clock = Clock()
    sink, book = rig(tmp_path, http_action(stand_in.url(), per_hour=2), clock)
    with caplog.at_level(logging.INFO, logger="engine.alerts.actionbook"):
        sink.deliver([alert(1), alert(2), alert(3)])
        sink.deliver([alert(5)])
    states = {r.alert_id: (r.state, r.hold) for r in book.requests()}
    assert states == {
        "alert-0001": ("queued", ""),
        "alert-0002": ("queued", ""),
        "alert-0003": ("pending", "budget"),
        "alert-0005": ("pending", "budget"),
    }
    held = next(r for r in book.requests() if r.alert_id == "alert-0003")
    assert f"callsentry actions approve {held.id}" in caplog.text
    # One warning when the budget runs out, not one per action held.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "action hook: budget of 2 per hour used up; what it would do now waits for "
        "approval (callsentry actions list --state pending)"
    ]
    assert book.counts()["hook"].budget_holds == 2
    assert events(book, held.id) == ["budget_hold"]
    # An hour later the budget is there again; what was held still waits for a reviewer.
    clock.now += 3601
    sink.deliver([alert(4)])
    assert book.requests()[0].alert_id == "alert-0004"
    assert book.requests()[0].state == "queued"
    assert book.request(held.id).state == "pending"


def test_expiry_calls_the_undo_with_its_own_key(tmp_path: Path, stand_ins: list[StandIn]) -> None:
    stand_in = StandIn()
    stand_ins.append(stand_in)
    clock = Clock()
    undo = f"""undo:
  after: 2h
  http:
    url: "{stand_in.url("/external/server/undo")}"
    body: {{entity: "{{entity}}"}}
"""
    sink, book = rig(tmp_path, http_action(stand_in.url(), extra=undo), clock)
    sink.deliver([alert(1)])
    run_couriers(book, lambda: book.requests()[0].state == "done")
    assert book.queue_due_undos() == 0
    clock.now += 7200
    assert book.queue_due_undos() == 1
    run_couriers(book, lambda: book.requests()[0].state == "undone")
    assert [(path, key) for path, key, _ in stand_in.requests] == [
        ("/external/server/hook?number=%2B882130000001", "hook:alert-0001:do"),
        ("/external/server/undo", "hook:alert-0001:undo"),
    ]
    assert events(book, book.requests()[0].id) == ["queued", "fired", "undo_queued", "undone"]


@pytest.mark.parametrize(
    ("entity", "reason"),
    [("+8821\r\nX-Evil: 1", "line break"), ("+8821 \u5ba2\u670d", "Latin-1")],
)
def test_a_value_that_would_inject_a_header_is_not_sent(
    tmp_path: Path, stand_ins: list[StandIn], entity: str, reason: str
) -> None:
    stand_in = StandIn()
    stand_ins.append(stand_in)
    text = http_action(stand_in.url()).replace(
        "  method: POST\n", '  method: POST\n  headers: {X-Number: "{entity}"}\n'
    )
    clock = Clock()
    sink, book = rig(tmp_path, text, clock)
    sink.deliver([alert(1, entity)])
    request = book.requests()[0]
    run_couriers(book, lambda: book.request(request.id).last_error != "")
    assert stand_in.requests == []
    assert reason in book.request(request.id).last_error
    # The same alert makes the same request every time: given up at the first attempt
    # (it was tried again with back-off for a day, logged each time), and the request
    # waits for a reviewer with the reason.
    for _ in range(5):
        clock.now += 3600
        run_couriers(book, lambda: True)
    counts = book.outbox.counts()["actions-http"]
    assert (counts.failed, counts.given_up, counts.pending) == (1, 1, 0)
    assert book.counts()["hook"].failed == 1
    after = book.request(request.id)
    assert (after.state, after.hold) == ("pending", "given_up")
    assert reason in after.last_error
    assert events(book, request.id)[-2:] == ["failed", "given_up"]


def test_an_unset_secret_is_retried_and_the_action_made_once_it_is_set(
    tmp_path: Path, stand_ins: list[StandIn]
) -> None:
    # What is missing is this machine's, not the alert's: not given up at once.
    stand_in = StandIn()
    stand_ins.append(stand_in)
    text = (
        http_action(stand_in.url())
        .replace("  method: POST\n", "  method: POST\n  env: {password: CS_TEST_SECRET}\n")
        .replace('alert: "{alert_id}"', 'alert: "{alert_id}", p: "{password}"')
    )
    clock = Clock()
    sink, book = rig(tmp_path, text, clock)
    sink.deliver([alert(1)])
    unset = Courier(book.outbox, ActionDestination(book, "http", environ={}), FAST, clock=clock)
    unset.work()
    counts = book.outbox.counts()["actions-http"]
    assert (counts.failed, counts.given_up, counts.pending) == (1, 0, 1)
    assert "CS_TEST_SECRET" in book.requests()[0].last_error
    clock.now += 60
    environ = {"CS_TEST_SECRET": "s3cret"}
    set_up = Courier(
        book.outbox, ActionDestination(book, "http", environ=environ), FAST, clock=clock
    )
    set_up.work()
    assert book.requests()[0].state == "done" and len(stand_in.requests) == 1


def test_an_unreachable_endpoint_is_retried_and_counted(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink, book = rig(tmp_path, http_action(f"http://127.0.0.1:{port}/x"))
    sink.deliver([alert(1)])
    for _ in range(2):
        # A courier of its own each time: a pass at once, not after the pause a courier
        # takes once its endpoint failed (the outbox's own tests cover the pause).
        Courier(book.outbox, ActionDestination(book, "http"), FAST, clock=book.clock).work()
    assert book.counts()["hook"].failed == 2
    assert book.requests()[0].state == "queued"
    assert book.outbox.counts()["actions-http"].pending == 1


def test_a_command_gets_the_alert_on_stdin_and_an_option_value_is_refused(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.json"
    script = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps([sys.argv[1:], json.load(sys.stdin)]))"  # noqa: E501
    text = f"""id: note
match: {{}}
kind: command
command:
  argv: [{json.dumps(sys.executable)}, "-c", {json.dumps(script)},
         "{{entity}}", "--rule={{rule_id}}"]
  timeout: 20s
"""
    sink, book = rig(tmp_path, text)
    sink.deliver([alert(1), alert(2, "--delete-everything")])
    first = next(r for r in book.requests() if r.alert_id == "alert-0001")
    second = next(r for r in book.requests() if r.alert_id == "alert-0002")
    run_couriers(
        book,
        lambda: book.request(first.id).state == "done" and book.request(second.id).last_error != "",
    )
    argv, stdin = json.loads(out.read_text())
    assert argv == ["+882130000001", "--rule=risky-destination-forward"]
    assert stdin["alert_id"] == "alert-0001" and stdin["step"] == "do"
    assert "would start an option" in book.request(second.id).last_error


def test_a_block_puts_the_entity_on_the_blocklist_until_it_expires(tmp_path: Path) -> None:
    clock = Clock()
    text = (
        "id: block-it\nmatch: {entity_types: [forward]}\nkind: block\nblock: {expire_after: 1h}\n"
    )
    sink, book = rig(tmp_path, text, clock)
    sink.deliver([alert(1, "=HYPERLINK(1)")])
    run_couriers(book, lambda: book.requests()[0].state == "done")
    (entry,) = book.blocklist.entries()
    assert (entry.entity_type, entry.entity) == ("forward", "=HYPERLINK(1)")
    assert entry.action_id == "block-it"
    assert entry.expires_at == clock.now + 3600
    exported = subprocess.run(
        [sys.executable, "-m", "engine", "blocklist", "export",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0].startswith("entity_type,entity,added_at,expires_at")
    # Through csv_cell: a spreadsheet does not read it as a formula.
    assert lines[1].startswith("forward,'=HYPERLINK(1),")
    clock.now += 3600
    assert book.queue_due_undos() == 1
    run_couriers(book, lambda: book.requests()[0].state == "undone")
    assert book.blocklist.entries() == []
    assert events(book, book.requests()[0].id) == ["queued", "fired", "undo_queued", "undone"]


def test_a_block_of_an_entity_with_control_characters_is_refused_as_blocklist_add_does(
    tmp_path: Path,
) -> None:
    # Such an entry went on the blocklist, and its export wrote it escaped: another value.
    text = "id: block-it\nmatch: {entity_types: [forward]}\nkind: block\n"
    sink, book = rig(tmp_path, text)
    sink.deliver([alert(1, "+8821\x1b[31m")])
    request = book.requests()[0]
    run_couriers(book, lambda: book.request(request.id).hold == "given_up")
    assert book.blocklist.entries() == []
    assert "without control characters, not '+8821\\x1b[31m'" in book.request(request.id).last_error


def test_a_dry_run_block_says_what_it_would_do_and_blocks_nothing(tmp_path: Path) -> None:
    text = "id: block-it\nmatch: {}\nkind: block\ndry_run: true\n"
    sink, book = rig(tmp_path, text)
    sink.deliver([alert(1)])
    run_couriers(book, lambda: book.requests()[0].state == "done")
    assert book.blocklist.entries() == []
    last = book.trail()[-1]
    assert (last["event"], last["status"]) == ("dry_run", "dry run: blocklist unchanged")
    assert last["request"] == "block forward +882130000001 for 1 d"
    # Lifted early: a block's undo is taking it off (it said "an action with no undo").
    lifted = subprocess.run(
        [sys.executable, "-m", "engine", "actions", "lift", str(book.requests()[0].id),
         "--reviewer", "ana", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert lifted.returncode == 0, lifted.stderr
    assert lifted.stdout.strip().endswith("lifted: a running serve takes it off the blocklist now")
    assert book.requests()[0].state == "undo_queued"


def test_shadow_alerts_and_alerts_no_action_matches_decide_nothing(tmp_path: Path) -> None:
    sink, book = rig(tmp_path, http_action("http://127.0.0.1:9/x"))
    sink.deliver([alert(1, mode="shadow"), alert(2, severity="high")])
    assert book.requests() == []


def test_the_trail_is_append_only(tmp_path: Path) -> None:
    sink, book = rig(tmp_path, http_action("http://127.0.0.1:9/x", mode="approve"))
    sink.deliver([alert(1)])
    book.close()
    with sqlite3.connect(outbox_path(tmp_path / "data")) as db:
        for statement in ("UPDATE actions SET reviewer = 'me'", "DELETE FROM actions"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)


def test_actions_cli_lists_shows_and_approves(tmp_path: Path) -> None:
    sink, book = rig(tmp_path, http_action("http://127.0.0.1:9/x", mode="approve"))
    sink.deliver([alert(1)])
    request = book.requests()[0]
    book.close()
    data = str(tmp_path / "data")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "actions", *args, "--data-dir", data],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    listed = cli("list", "--state", "pending")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "ACTION", "STATE"]
    assert f"{request.id}  " in listed.stdout and "pending (approval)" in listed.stdout
    approved = cli("approve", str(request.id), "--reviewer", "ana")
    assert approved.returncode == 0, approved.stderr
    assert "approved: queued" in approved.stdout
    again = cli("approve", str(request.id), "--reviewer", "ana")
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"callsentry: request {request.id} is queued, not waiting for approval"
    )
    shown = cli("show", str(request.id))
    assert shown.returncode == 0, shown.stderr
    assert "approved by ana" in shown.stdout
    missing = cli("show", "999")
    assert (missing.returncode, missing.stderr.strip()) == (1, "callsentry: no action request 999")
    huge = "99999999999999999999999"  # past SQLite's integers
    for argv in (("show", huge), ("approve", huge, "--reviewer", "ana")):
        refused = cli(*argv)
        assert (refused.returncode, refused.stderr.strip()) == (
            1,
            f"callsentry: no action request {huge}",
        )


def test_blocking_a_blocked_entity_again_says_what_it_replaces(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "lake").mkdir(parents=True)

    def block(expire: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "blocklist", "add", "+88213000123", "--type",
             "forward", "--expire", expire, "--reviewer", "ana", "--data-dir", str(data)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    first = block("7d")
    assert first.returncode == 0, first.stderr
    assert "was blocked" not in first.stdout
    second = block("1d")
    assert second.returncode == 0, second.stderr
    until = first.stdout.split("blocked ")[1].strip()
    assert f"(it was blocked {until}; that entry is replaced)" in second.stdout
    book = ActionBook.of(data)
    (entry,) = book.blocklist.entries()
    book.close()
    assert entry.expires_at is not None and abs(entry.expires_at - entry.added_at - 86_400) < 60


# -- replay ---------------------------------------------------------------------------


def risky_rules(tmp_path: Path, action: str) -> Path:
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "rules/risky-destination-forward.yaml", folder)
    shutil.copy(ROOT / "rules/lists/risky_prefixes.yaml", folder / "lists")
    write_action(folder / "actions", "action", action)
    return folder


def test_replay_and_backtest_fire_nothing(tmp_path: Path, stand_ins: list[StandIn]) -> None:
    from engine.apps.backtest import backtest
    from engine.apps.replay import replay

    stand_in = StandIn()
    stand_ins.append(stand_in)
    rules = risky_rules(tmp_path, http_action(stand_in.url()))
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    for n in range(3):
        rows.append(f"2026-11-30T10:0{n}:00Z,f-{n},1,RINGING,86138000{n},4001,+88213000{n},12,Main")
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    settings = make_settings(
        tmp_path / "data",
        detection={"rules_dir": str(rules), "alerts_jsonl": "off", "models_enabled": False},
    )
    report = replay([tmp_path / "events.csv"], settings)
    assert len([a for a in report.alerts if a.mode == "alert"]) == 3
    day = datetime(2026, 11, 30, tzinfo=UTC).timestamp()
    result = backtest(
        settings.store.data_dir, rules, rules, settings.detection, day, day + 86400, 0
    )
    assert len(result.current) == 3
    assert stand_in.requests == []
    assert not outbox_path(settings.store.data_dir).exists()


# -- a real engine --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def forwarded(sock: socket.socket, port: int, n: int) -> None:
    """A call the IVR forwards to a risky number, reported until answered."""
    payload = f"fwd-{n},1,Ringing,8613800{n:06d},4001,+88213{n:07d},12,Main".encode()
    sock.settimeout(0.5)
    for _ in range(20):
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            if sock.recv(100) == f"fwd-{n},1".encode():
                return
        except TimeoutError:
            continue
    raise AssertionError(f"report fwd-{n} never answered")


def spawn_serve(tmp_path: Path, udp: int, rules: Path) -> subprocess.Popen[bytes]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    variables.update(
        CALLSENTRY_DETECTION__MODELS_ENABLED="false",
        CALLSENTRY_STORE__FLUSH_INTERVAL_S="0.2",
        CALLSENTRY_OUTBOX__MAX_BACKOFF_S="0.3",
    )
    with (tmp_path / "serve.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{udp}",
             "--data-dir", str(tmp_path / "data"), "--rules", str(rules),
             "--metrics", f"127.0.0.1:{free_port()}", "--log-level", "warning"],
            cwd=ROOT, env=variables, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )  # fmt: skip


def book_of(data_dir: Path) -> ActionBook | None:
    if not outbox_path(data_dir).exists():
        return None
    return ActionBook(Outbox.of(data_dir, read_only=True))


def request_states(data_dir: Path) -> list[str]:
    book = book_of(data_dir)
    if book is None:
        return []
    try:
        return [r.state for r in book.requests()]
    finally:
        book.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_between_the_outbox_write_and_the_request_then_restart_requests_once(
    tmp_path: Path, stand_ins: list[StandIn]
) -> None:
    data_dir = tmp_path / "data"
    udp, web = free_port(), free_port()
    rules = risky_rules(tmp_path, http_action(f"http://127.0.0.1:{web}/external/server/hook"))
    process = spawn_serve(tmp_path, udp, rules)  # the web API is not up: nothing is requested
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        forwarded(sock, udp, 1)
        wait_for(lambda: request_states(data_dir) == ["queued"], 60, "the action queued")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        stand_in = StandIn(web)
        stand_ins.append(stand_in)
        process = spawn_serve(tmp_path, udp, rules)
        wait_for(lambda: request_states(data_dir) == ["done"], 60, "the action done")
    finally:
        sock.close()
        stop(process)
    assert len(stand_in.requests) == 1
    assert stand_in.keys()[0].startswith("hook:") and stand_in.keys()[0].endswith(":do")


@pytest.mark.slow
def test_kill_9_right_after_the_request_then_restart_repeats_it_at_most_once_same_key(
    tmp_path: Path, stand_ins: list[StandIn]
) -> None:
    data_dir = tmp_path / "data"
    udp = free_port()
    stand_in = StandIn(hold=True)
    stand_ins.append(stand_in)
    rules = risky_rules(tmp_path, http_action(stand_in.url()))
    process = spawn_serve(tmp_path, udp, rules)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        forwarded(sock, udp, 1)
        assert stand_in.arrived.wait(60), "the request never came"
        # The stand-in holds its answer: the engine has sent the request and not heard.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        stand_in.release.set()
        process = spawn_serve(tmp_path, udp, rules)
        wait_for(lambda: request_states(data_dir) == ["done"], 60, "the action done")
    finally:
        sock.close()
        stop(process)
    keys = stand_in.keys()
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].endswith(":do")


def live_forward_calls(host: str, port: int) -> list[CallEvent]:
    """Calls as the switch reports them, one of them forwarded to a risky number, each
    report sent at its time (the stand-in paces them in real time)."""
    now = datetime.now(tz=UTC).timestamp()
    made = []
    for n, forward in enumerate(["4008005001", "+882130000777", "4008005002"]):
        call = f"live-{n}"
        made.append(CallEvent(now + n * 0.2, call, 1, CallState.RINGING, None,
                              f"86138000{n:04d}", "4001", forward, "12", "Main"))  # fmt: skip
        made.append(CallEvent(now + n * 0.2 + 0.1, call, 2, CallState.ANSWERED, None,
                              f"86138000{n:04d}", "4001", forward, "12", "Main"))  # fmt: skip
    return made


def send_live(host: str, port: int) -> None:
    calls = live_forward_calls(host, port)
    switch = SwitchStandIn(Vos3000TextCodec(), SwitchSettings(host=host, port=port))
    offsets = [event.ts - calls[0].ts for event in calls]
    summary = asyncio.run(switch.send(calls, offsets))
    assert summary.answered == len(calls)


BLOCK = """id: block-risky-forward
match: {{rules: [risky-destination-forward], severities: [critical], entity_types: [forward]}}
kind: block
mode: {mode}
dry_run: true
block: {{expire_after: 24h}}
"""


def trail_in_duckdb(data_dir: Path) -> list[tuple[object, ...]]:
    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        return con.execute(
            "SELECT action_id, entity, mode, event, reviewer, status FROM actions ORDER BY seq"
        ).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "approve"])
def test_live_serve_blocks_a_risky_forward_number_in_dry_run(
    mode: str,
    tmp_path: Path,
    engine_factory: Callable[..., RunningEngine],
) -> None:
    rules = risky_rules(tmp_path, BLOCK.format(mode=mode))
    data_dir = tmp_path / "data"
    running = engine_factory(
        detection={"rules_dir": str(rules), "models_enabled": False, "alerts_jsonl": "off"},
        store={"flush_interval_s": 0.2},
    )
    send_live(*running.address)
    book = ActionBook(Outbox.of(data_dir, read_only=True))
    try:
        wait_for(lambda: len(book.requests()) == 1, 60, "the block decided")
        (request,) = book.requests()
        assert (request.action_id, request.entity_type, request.entity) == (
            "block-risky-forward", "forward", "+882130000777",
        )  # fmt: skip
        if mode == "approve":
            assert (request.state, request.hold) == ("pending", "approval")
            assert book.blocklist.entries() == []
            approve(data_dir, request.id, "ana")
        wait_for(lambda: book.request(request.id).state == "done", 60, "the block done")
        assert book.blocklist.entries() == []  # a dry run
        expected = [
            ("block-risky-forward", "+882130000777", mode, "queued", "", ""),
            ("block-risky-forward", "+882130000777", mode, "dry_run", "",
             "dry run: blocklist unchanged"),
        ]  # fmt: skip
        if mode == "approve":
            expected[0:1] = [
                ("block-risky-forward", "+882130000777", mode, "awaiting_approval", "", ""),
                ("block-risky-forward", "+882130000777", mode, "approved", "ana", ""),
            ]
        # The trail, as analysts see it in callsentry.duckdb.
        wait_for(lambda: len(trail_in_duckdb(data_dir)) == len(expected), 60, "the trail")
        assert trail_in_duckdb(data_dir) == expected
        metrics = running.engine.operator
        assert metrics is not None
        import urllib.request

        host, port = metrics.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert 'callsentry_actions_fired_total{action="block-risky-forward"} 1.0' in scraped
        approved = 1.0 if mode == "approve" else 0.0
        assert (
            f'callsentry_actions_approved_total{{action="block-risky-forward"}} {approved}'
            in scraped
        )
    finally:
        book.close()


def test_an_action_set_matches_on_the_rules_tags(tmp_path: Path) -> None:
    text = "id: a\nmatch: {tags: [irsf]}\nkind: block\n"
    folder = write_action(tmp_path / "actions", "a", text).parent
    actions: ActionSet = load_actions(folder)
    data = alert(1).as_json()
    assert [a.id for a in actions.matching(data, ["irsf", "forward"])] == ["a"]
    assert actions.matching(data, ["other"]) == []


@pytest.mark.slow
def test_serve_reloads_actions_with_the_rules_and_keeps_them_on_a_bad_edit(
    tmp_path: Path,
    engine_factory: Callable[..., RunningEngine],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The lake writer process logs at this process's level, to the stderr it inherits.
    caplog.set_level(logging.INFO)
    text = BLOCK.format(mode="auto").replace("dry_run: true", "dry_run: true\nenabled: false")
    rules = risky_rules(tmp_path, text)
    data_dir = tmp_path / "data"
    running = engine_factory(
        detection={
            "rules_dir": str(rules),
            "models_enabled": False,
            "alerts_jsonl": "off",
            "reload_interval_s": 0.3,
        },
        store={"flush_interval_s": 0.2},
    )
    said = ""

    def writer_said(text: str) -> bool:
        nonlocal said
        said += capfd.readouterr().err
        return text in said

    host, port = running.address
    # The rule watcher takes its first look once the lake writer runs: edits from then.
    wait_for(lambda: writer_said("lake writer running"), 60, "the lake writer running")
    path = rules / "actions" / "action.yaml"
    path.write_text(text.replace("enabled: false", "enabled: true"))
    wait_for(lambda: writer_said("actions reloaded: 1 (1 enabled)"), 60, "the actions reloaded")
    send_live(host, port)
    wait_for(lambda: request_states(data_dir) == ["done"], 60, "the dry-run block done")
    path.write_text(text.replace("kind: block", "kind: fax"))
    wait_for(lambda: writer_said("actions not reloaded"), 60, "the bad edit refused")
    assert f"{path}:3: kind:" in said
    # The running action still acts: another risky forward is blocked (in dry run).
    switch = SwitchStandIn(Vos3000TextCodec(), SwitchSettings(host=host, port=port))
    now = time.time()
    call = [
        CallEvent(now, "again-1", 1, CallState.RINGING, None, "8613800009999", "4001",
                  "+882130000888", "12", "Main"),
    ]  # fmt: skip
    assert asyncio.run(switch.send(call)).answered == 1
    wait_for(lambda: request_states(data_dir) == ["done", "done"], 60, "the second block done")


def test_a_step_the_outbox_gives_up_on_is_in_the_trail_and_can_be_tried_again(
    tmp_path: Path, stand_ins: list[StandIn]
) -> None:
    # An endpoint down past the outbox's horizon: the request does not stay `queued`
    # for ever; it waits for a reviewer again, the trail says why, and an approval
    # sends it once more (with the same key) to the endpoint, now back.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = Clock()
    sink, book = rig(tmp_path, http_action(f"http://127.0.0.1:{port}/x"), clock)
    sink.deliver([alert(1)])
    (request,) = book.requests()
    policy = RetryPolicy(give_up_after_s=60, first_backoff_s=0.05, max_backoff_s=0.2, poll_s=0.05)
    courier = Courier(book.outbox, ActionDestination(book, "http"), policy, clock=clock)
    courier.work()
    assert book.request(request.id).state == "queued"
    clock.now += 120
    courier.work()
    given_up = book.request(request.id)
    assert (given_up.state, given_up.hold) == ("pending", "given_up")
    assert events(book, request.id)[-1] == "given_up"
    stand_in = StandIn(port)
    stand_ins.append(stand_in)
    book.approve(request.id, "ana")
    run_couriers(book, lambda: book.request(request.id).state == "done")
    assert [key for _, key, _ in stand_in.requests] == [request.key]
