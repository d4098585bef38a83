"""The console at the HTTP level (the real application on Starlette's test client, over
a real replayed data dir): who gets in, what a form without its CSRF token gets, what
a viewer may not do, the headers, the escaping, the API and its tokens, the CLI that
makes users. The browser tests (test_console_browser.py) drive the same pages."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from engine.console.accounts import (
    Accounts,
    AccountsFileError,
    accounts_path,
    secret_path,
    session_secret,
)
from engine.console.lakeview import LakeView, RuleBook
from engine.console.safety import LoginThrottle
from engine.console.web import Console, create_app
from engine.lake.parquet import Lake
from engine.lake.reviews import list_alerts
from tests.console_data import (
    CONTROL_CALLER,
    MARKUP_MENU,
    PASSWORDS,
    PLAIN_CALLER,
    SCRIPT_CALLER,
)
from tests.console_data import console_data_dir as make_console_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def console_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_console_data(tmp_path_factory.mktemp("console"))


def client_for(data: Path, throttle: LoginThrottle | None = None) -> TestClient:
    console = Console(data, LakeView(data), RuleBook.read(ROOT / "rules"))
    if throttle is not None:
        console.throttle = throttle
    return TestClient(create_app(console, session_secret(data)), base_url="http://127.0.0.1")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def signed_in(data: Path, name: str = "ana") -> TestClient:
    client = client_for(data)
    token = csrf_of(client.get("/login").text)
    answer = client.post(
        "/login",
        data={"username": name, "password": PASSWORDS[name], "csrf": token, "next": "/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return client


def alert_id_of(data: Path, entity: str, rule: str = "short-calls-caller") -> str:
    return next(
        a["alert_id"]
        for a in list_alerts(data, "all", 100)
        if a["entity"] == entity and a["rule_id"] == rule
    )


def test_pages_and_the_api_want_a_session_or_a_token(console_data: Path) -> None:
    client = client_for(console_data)
    for path in (
        "/",
        "/rules",
        "/entity?value=1",
        f"/alerts/{alert_id_of(console_data, PLAIN_CALLER)}",
    ):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
    for method, path in (
        ("GET", "/api/alerts"),
        ("GET", f"/api/alerts/{alert_id_of(console_data, PLAIN_CALLER)}"),
        ("POST", f"/api/alerts/{alert_id_of(console_data, PLAIN_CALLER)}/review"),
    ):
        answer = client.request(method, path, json={"status": "closed", "note": "x"})
        assert answer.status_code == 401
        assert "alerts" not in answer.json() and PLAIN_CALLER not in answer.text
    wrong = client.get("/api/alerts", headers={"Authorization": "Bearer cs_not-a-token"})
    assert wrong.status_code == 401


def test_the_api_docs_read_as_prose_without_escaped_line_breaks(console_data: Path) -> None:
    page = signed_in(console_data).get("/api/docs")
    assert page.status_code == 200
    # The endpoints' descriptions are docstrings wrapped over lines: read as written,
    # not with each wrap shown as an escaped control character.
    assert "\\x0a" not in page.text
    assert "newest first; `status=all` for every alert;" in page.text


def test_every_answer_has_the_safety_headers(console_data: Path) -> None:
    client = signed_in(console_data)
    for path in ("/login", "/", "/api/alerts", "/static/console.css"):
        headers = client.get(path).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
    cookie = client.cookies.jar
    assert any(c.name == "callsentry_session" for c in cookie)


def test_the_session_cookie_is_httponly_and_samesite_strict(console_data: Path) -> None:
    client = client_for(console_data)
    token = csrf_of(client.get("/login").text)
    answer = client.post(
        "/login",
        data={"username": "ana", "password": PASSWORDS["ana"], "csrf": token},
        follow_redirects=False,
    )
    set_cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie


def test_network_text_is_escaped_in_every_page(console_data: Path) -> None:
    client = signed_in(console_data)
    script_alert = alert_id_of(console_data, SCRIPT_CALLER)
    pages = [
        client.get("/?status=all").text,
        client.get("/queue/rows?status=all").text,
        client.get(f"/alerts/{script_alert}").text,
        client.get("/entity", params={"value": SCRIPT_CALLER}).text,
        client.get("/entity", params={"value": "7"}).text,
        client.get("/rules").text,
    ]
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
    alert_page = pages[2]
    # Control and reordering characters are visible escapes, as in a terminal.
    control = client.get("/entity", params={"value": CONTROL_CALLER}).text
    assert "86138\\x1b[2J\\u202e0000" in control and "\x1b" not in control
    assert "\u202e" not in control and "Balance\\x07" in control
    # The start of an id (as `alerts show` takes it) leads to the alert's page.
    short = client.get(f"/alerts/{script_alert[:8]}", follow_redirects=False)
    assert short.status_code == 303 and short.headers["location"] == f"/alerts/{script_alert}"
    assert client.get("/alerts/zzzz", follow_redirects=False).status_code == 404
    assert "&lt;script&gt;alert(&#39;caller&#39;)&lt;/script&gt;" in alert_page
    assert "&lt;img src=x onerror=alert(&#39;menu&#39;)&gt;" in alert_page
    assert "<svg" in alert_page and "threshold 8" in alert_page
    # The rule's file keeps its lines (its text passes shown() line by line).
    assert '<pre class="yaml">id: short-calls-caller\ntitle: ' in alert_page
    # The chart's texts are escaped too (the entity is in its title).
    svg = alert_page[alert_page.index("<svg") : alert_page.index("</svg>")]
    assert "&lt;script&gt;" in svg and "<script" not in svg
    # The markup reached the page only as text of the evidence table.
    assert alert_page.count("c4") >= 1 and MARKUP_MENU not in alert_page


def test_a_form_without_its_csrf_token_is_refused(console_data: Path) -> None:
    client = signed_in(console_data)
    alert_id = alert_id_of(console_data, PLAIN_CALLER)
    for form in (
        {"alert_id": alert_id, "status": "closed", "note": "forged", "action": "review"},
        {"alert_id": alert_id, "status": "closed", "note": "forged", "csrf": "guess"},
    ):
        answer = client.post("/act", data=form, follow_redirects=False)
        assert answer.status_code == 403 and "CSRF" in answer.text
    # Sign-in itself wants the token of the form it came from.
    fresh = client_for(console_data)
    answer = fresh.post("/login", data={"username": "ana", "password": PASSWORDS["ana"]})
    assert answer.status_code == 403
    # The API's POST with a session wants the token in a header.
    answer = client.post(f"/api/alerts/{alert_id}/review", json={"status": "closed", "note": "x"})
    assert answer.status_code == 403
    statuses = {a["alert_id"]: a["status"] for a in list_alerts(console_data, "all", 100)}
    assert statuses[alert_id] == "open"


def test_a_viewer_reads_but_cannot_review(console_data: Path) -> None:
    client = signed_in(console_data, "vic")
    alert_id = alert_id_of(console_data, PLAIN_CALLER)
    page = client.get(f"/alerts/{alert_id}").text
    assert 'action="/act"' not in page  # no review form for a viewer
    token = csrf_of(page)
    answer = client.post(
        "/act",
        data={"alert_id": alert_id, "status": "closed", "note": "x", "csrf": token},
        follow_redirects=False,
    )
    assert answer.status_code == 403 and "viewer" in answer.text
    answer = client.post(
        f"/api/alerts/{alert_id}/review",
        json={"status": "closed", "note": "x"},
        headers={"X-CSRF-Token": token},
    )
    assert answer.status_code == 403
    assert {a["alert_id"]: a["status"] for a in list_alerts(console_data, "all", 100)}[
        alert_id
    ] == "open"


def test_several_alerts_reviewed_and_assigned_at_once_by_the_signed_in_user(
    tmp_path: Path,
) -> None:
    data = make_console_data(tmp_path)
    client = signed_in(data)
    ids = [a["alert_id"] for a in list_alerts(data, "open", 100)]
    assert len(ids) >= 2
    token = csrf_of(client.get("/").text)
    answer = client.post(
        "/act",
        data={
            "alert_id": ids[:2],
            "action": "assign",
            "assignee": "me",
            "csrf": token,
            "back": "/",
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    mine = client.get("/", params={"assignee": "ana"}).text
    assert all(i in mine for i in ids[:2])
    answer = client.post(
        "/act",
        data={
            "alert_id": ids[:2],
            "action": "review",
            "status": "investigating",
            "note": "pulling the CDRs",
            "reviewer": "someone-else",  # ignored: the reviewer is who signed in
            "csrf": token,
            "back": "https://elsewhere.example/",
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    with duckdb.connect(str(data / "callsentry.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT alert_id, status, reviewer, assignee FROM alerts_current "
            "WHERE list_contains(?, alert_id) ORDER BY alert_id",
            [ids[:2]],
        ).fetchall()
    assert rows == sorted((i, "investigating", "ana", "ana") for i in ids[:2])
    counts = client.get("/?status=investigating").text
    assert "investigating <b>2</b>" in counts


def test_failed_sign_ins_are_logged_escaped_and_throttled(
    console_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(console_data, LoginThrottle(failures=3, period_s=300))
    forged = "ana\x1b[2J\nINFO forged line"
    codes = []
    with caplog.at_level(logging.WARNING, logger="callsentry.console"):
        for _ in range(4):
            token = csrf_of(client.get("/login").text)
            answer = client.post(
                "/login", data={"username": forged, "password": "wrong", "csrf": token}
            )
            codes.append(answer.status_code)
        token = csrf_of(client.get("/login").text)
        # Throttled per address: the right password of another name waits too.
        right = client.post(
            "/login", data={"username": "ana", "password": PASSWORDS["ana"], "csrf": token}
        )
    assert codes == [401, 401, 401, 429]
    assert right.status_code == 429 and "try again in" in right.text
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed sign-in for ana\\x1b[2J\\x0aINFO forged line" in m for m in messages) == 3
    assert not any("\x1b" in m or "\n" in m for m in messages)


def test_api_lists_shows_and_reviews_with_a_token(tmp_path: Path) -> None:
    data = make_console_data(tmp_path)
    accounts = Accounts.load(accounts_path(data))
    reader = accounts.create_token("reader", "viewer")
    writer = accounts.create_token("nightly", "reviewer")
    accounts.save()
    stored = accounts_path(data).read_text()
    assert reader not in stored and writer not in stored  # only their hashes are kept
    client = client_for(data)
    as_reader = {"Authorization": f"Bearer {reader}"}
    listed = client.get("/api/alerts", params={"status": "all"}, headers=as_reader).json()
    assert {a["entity"] for a in listed["alerts"]} >= {SCRIPT_CALLER, PLAIN_CALLER}
    assert {"alert_id", "rule_id", "severity", "status", "assignee"} <= set(listed["alerts"][0])
    alert_id = alert_id_of(data, PLAIN_CALLER)
    one = client.get(f"/api/alerts/{alert_id}", headers=as_reader).json()
    assert len(one["calls"]) == len(one["evidence"]) == 8
    assert {c["caller"] for c in one["calls"]} == {PLAIN_CALLER}
    refused = client.post(
        f"/api/alerts/{alert_id}/review",
        json={"status": "fp", "note": "test"},
        headers=as_reader,
    )
    assert refused.status_code == 403
    done = client.post(
        f"/api/alerts/{alert_id}/review",
        json={"status": "fp", "note": "a drill of ours"},
        headers={"Authorization": f"Bearer {writer}"},
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "false_positive"
    assert done.json()["reviewer"] == "nightly (API token)"
    assert client.get("/api/alerts", params={"status": "fp"}, headers=as_reader).json()["alerts"][
        0
    ]["alert_id"] == (alert_id)
    bad = client.post(
        f"/api/alerts/{alert_id}/review",
        json={"status": "done", "note": "x"},
        headers={"Authorization": f"Bearer {writer}"},
    )
    assert bad.status_code == 400 and "unknown status" in bad.json()["detail"]
    # The whole id, as the GET takes it: a cut one (a script's bug) names no alert,
    # though it starts only this one, and nothing is recorded.
    cut = client.post(
        f"/api/alerts/{alert_id[:8]}/review",
        json={"status": "confirmed", "note": "a cut id"},
        headers={"Authorization": f"Bearer {writer}"},
    )
    assert cut.status_code == 404 and "give its whole id" in cut.json()["detail"]
    assert client.get(f"/api/alerts/{alert_id[:8]}", headers=as_reader).status_code == 404
    reviews = client.get(f"/api/alerts/{alert_id}", headers=as_reader).json()["reviews"]
    assert [r["status"] for r in reviews] == ["false_positive"]
    # JSON's NaN is no text: refused where and why, without echoing it (it cannot be).
    not_text = client.post(
        f"/api/alerts/{alert_id}/review",
        content=b'{"status": "closed", "note": NaN}',
        headers={"Authorization": f"Bearer {writer}", "Content-Type": "application/json"},
    )
    assert not_text.status_code == 422, not_text.text
    assert not_text.json()["detail"][0]["loc"] == ["body", "note"]
    missing = client.get("/api/alerts/nope", headers=as_reader)
    assert missing.status_code == 404
    assert client.get("/api/alerts", params={"severity": "x"}, headers=as_reader).status_code == 400
    for limit in ("0", "-1"):
        refused = client.get("/api/alerts", params={"limit": limit}, headers=as_reader)
        assert refused.status_code == 400 and "give 1 or more" in refused.json()["detail"]
    huge = client.get("/api/alerts", params={"limit": "9" * 30, "status": "all"}, headers=as_reader)
    assert huge.status_code == 200 and len(huge.json()["alerts"]) == len(listed["alerts"])
    schema = client.get("/api/openapi.json").json()
    assert {"/api/alerts", "/api/alerts/{alert_id}", "/api/alerts/{alert_id}/review"} <= set(
        schema["paths"]
    )
    assert "/login" not in schema["paths"]


def test_no_such_page_is_a_page_and_no_such_api_path_is_json(tmp_path: Path) -> None:
    data = make_console_data(tmp_path)
    client = signed_in(data)
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "there is no such page" in missing.text
    assert missing.headers["content-type"].startswith("text/html")
    wrong = client.get("/logout")
    assert wrong.status_code == 405 and "does not take that method" in wrong.text
    assert wrong.headers["allow"] == "POST"
    # A page's request that does not validate gets the console's page too.
    page = client.get("/")
    not_an_id = client.post("/actions/abc", data={"csrf": csrf_of(page.text)})
    assert not_an_id.status_code == 422 and "the request is not valid: path.request_id" in (
        not_an_id.text
    )
    api = client.get("/api/no/such")
    assert api.status_code == 404 and api.json() == {"detail": "Not Found"}


def test_signing_out_takes_the_page_s_csrf_token(tmp_path: Path) -> None:
    data = make_console_data(tmp_path)
    client = signed_in(data)
    page = client.get("/")
    # Another site's form (no token) signs nobody out, and says so.
    forged = client.post("/logout", data={}, follow_redirects=False)
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert client.get("/", follow_redirects=False).status_code == 200
    done = client.post("/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert (done.status_code, done.headers["location"]) == (303, "/login")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_a_new_password_signs_the_old_sessions_out(tmp_path: Path) -> None:
    data = make_console_data(tmp_path)
    client = signed_in(data)
    assert client.get("/", follow_redirects=False).status_code == 200
    accounts = Accounts.load(accounts_path(data))
    accounts.set_user("ana", "reviewer", "a-new-password")
    accounts.save()
    assert client.get("/", follow_redirects=False).status_code == 303


def test_the_accounts_file_and_the_session_secret_are_private(tmp_path: Path) -> None:
    secret = session_secret(tmp_path)
    assert session_secret(tmp_path) == secret and len(secret) == 64
    accounts = Accounts.load(accounts_path(tmp_path))
    accounts.set_user("ana", "viewer", "long-enough")
    accounts.save()
    for path in (secret_path(tmp_path), accounts_path(tmp_path)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Accounts.load(accounts_path(tmp_path)).check_password("ana", "long-enough")
    assert Accounts.load(accounts_path(tmp_path)).check_password("ana", "wrong") is None
    assert Accounts.load(accounts_path(tmp_path)).check_password("bob", "long-enough") is None
    accounts_path(tmp_path).write_text('{"version": 1, "users": {"<b>": {}}}')
    with pytest.raises(AccountsFileError, match=r"accounts.json: users.<b>: name '<b>'"):
        Accounts.load(accounts_path(tmp_path))


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_adduser_and_token_create_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Lake(data).prepare()
    done = cli(
        "console",
        "adduser",
        "ana",
        "--role",
        "viewer",
        "--data-dir",
        str(data),
        stdin="pw-ana-123\n",
    )
    assert done.returncode == 0, done.stderr
    assert Accounts.load(accounts_path(data)).check_password("ana", "pw-ana-123") is not None
    assert Accounts.load(accounts_path(data)).users["ana"].role == "viewer"
    short = cli("console", "adduser", "bo", "--data-dir", str(data), stdin="short\n")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    empty = cli("console", "adduser", "bo", "--data-dir", str(data))
    assert empty.returncode == 1 and "no password given" in empty.stderr
    bad_name = cli("console", "adduser", "<b>", "--data-dir", str(data), stdin="long-enough\n")
    assert bad_name.returncode == 2 and "'<b>' is not" in bad_name.stderr
    stray = cli("console", "token", "create", "x", "--data-dir", str(tmp_path))
    assert stray.returncode == 1 and "has no lake" in stray.stderr
    assert not (tmp_path / "console").exists()
    token = cli("console", "token", "create", "nightly", "--data-dir", str(data))
    assert token.returncode == 0, token.stderr
    printed = token.stdout.strip()
    assert printed.startswith("cs_") and printed not in accounts_path(data).read_text()
    assert Accounts.load(accounts_path(data)).check_token(printed) is not None
    # The group's --data-dir counts for its subcommands too.
    before = cli("console", "--data-dir", str(data), "adduser", "cy", stdin="long-enough\n")
    assert before.returncode == 0, before.stderr
    assert "cy" in Accounts.load(accounts_path(data)).users


def test_a_token_revoked_and_a_user_removed_are_refused_at_once(tmp_path: Path) -> None:
    # There was no way to list or revoke a token, or to remove a user: a leaked token
    # could only be replaced by one of the same name.
    data = make_console_data(tmp_path)
    token = cli("console", "token", "create", "nightly", "--data-dir", str(data)).stdout.strip()
    client = client_for(data)
    as_token = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/alerts", headers=as_token).status_code == 200
    ana = signed_in(data)
    assert ana.get("/api/alerts").status_code == 200
    listed = cli("console", "token", "list", "--data-dir", str(data))
    assert listed.returncode == 0 and listed.stdout.split()[:3] == ["NAME", "ROLE", "CREATED"]
    assert "nightly  viewer" in listed.stdout and token not in listed.stdout
    users = cli("console", "users", "--data-dir", str(data)).stdout
    assert "ana   reviewer" in users and "vic   viewer" in users
    typo = cli("console", "token", "revoke", "nighly", "--data-dir", str(data))
    assert typo.returncode == 1
    assert typo.stderr == ("callsentry: no token 'nighly' (tokens: nightly); nothing was changed\n")
    assert cli("console", "token", "revoke", "nightly", "--data-dir", str(data)).returncode == 0
    assert client.get("/api/alerts", headers=as_token).status_code == 401
    assert cli("console", "deluser", "ana", "--data-dir", str(data)).returncode == 0
    assert ana.get("/api/alerts").status_code == 401
    assert "ana" not in cli("console", "users", "--data-dir", str(data)).stdout


def test_a_broken_accounts_file_is_one_line_from_every_console_command(tmp_path: Path) -> None:
    data = make_console_data(tmp_path)
    accounts_path(data).write_bytes(b"\x00\xff{not json")
    for argv, stdin in (
        (("console", "adduser", "bo"), "long-enough\n"),
        (("console", "token", "create", "bo"), ""),
        (("console", "--listen", "127.0.0.1:0"), ""),
    ):
        done = cli(*argv, "--data-dir", str(data), stdin=stdin)
        assert done.returncode == 1, done
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("callsentry: ") and "accounts.json: not JSON" in last, done.stderr
        assert "Traceback" not in done.stderr
    secret_path(data).write_text("not a secret\n")
    accounts_path(data).unlink()
    done = cli("console", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    assert done.returncode == 1 and "session.secret: not a session secret" in done.stderr


def test_sign_ins_sent_at_once_are_counted_before_their_passwords_are_checked() -> None:
    # Attempts that arrive while the first password is still being checked must not all
    # pass the throttle: each is counted as it begins.
    throttle = LoginThrottle(failures=3, period_s=300, clock=lambda: 1000.0)
    assert [throttle.begin("192.0.2.7", "ann")[0] for _ in range(3)] == [0, 0, 0]
    assert throttle.begin("192.0.2.7", "ann")[0] == 300
    # A right password takes its attempt back: signing in often is not throttled.
    right = LoginThrottle(failures=3, period_s=300, clock=lambda: 1000.0)
    for _ in range(5):
        wait, at = right.begin("192.0.2.7", "bob")
        assert wait == 0
        right.succeeded("192.0.2.7", "bob", at)


def test_a_verdict_given_in_the_console_is_queued_for_nats(tmp_path: Path) -> None:
    # With [relay.nats] on, the console's verdicts go to the outbox the relay publishes
    # from, as `alerts review`'s do (tests/test_nats.py publishes those for real).
    from engine.alerts.outbox import Outbox
    from engine.apps.console import review_publisher
    from engine.apps.settings import load_settings
    from engine.relay.nats import unpack

    data = make_console_data(tmp_path)
    settings = load_settings(
        None,
        {"store": {"data_dir": str(data)}, "relay": {"nats": {"urls": ["nats://127.0.0.1:9"]}}},
        environ={},
    )
    console = Console(
        data, LakeView(data), RuleBook.read(ROOT / "rules"), on_reviews=review_publisher(settings)
    )
    client = TestClient(create_app(console, session_secret(data)), base_url="http://127.0.0.1")
    token = csrf_of(client.get("/login").text)
    client.post(
        "/login",
        data={"username": "ana", "password": PASSWORDS["ana"], "csrf": token, "next": "/"},
    )
    alert_id = alert_id_of(data, PLAIN_CALLER)
    answer = client.post(
        f"/api/alerts/{alert_id}/review",
        json={"status": "confirmed", "note": "called them"},
        headers={"X-CSRF-Token": csrf_of(client.get("/").text)},
    )
    assert answer.status_code == 200, answer.text
    outbox = Outbox.of(data)
    queued = outbox.due("nats", now=2e9)
    outbox.close()
    assert len(queued) == 1
    subject, body = unpack(queued[0].payload)
    assert subject == "callsentry.reviews"
    verdict = json.loads(body)
    assert (verdict["alert_id"], verdict["status"], verdict["reviewer"]) == (
        alert_id,
        "confirmed",
        "ana",
    )
    assert review_publisher(load_settings(None, {}, environ={})) is None


def test_a_reviewer_approves_a_waiting_action_in_the_console(tmp_path: Path) -> None:
    from engine.alerts.actionbook import ActionBook
    from engine.alerts.actions import ActionSink
    from engine.alerts.actionspec import load_actions
    from tests.test_actions import alert, http_action, write_action

    data = make_console_data(tmp_path)
    folder = write_action(
        tmp_path / "actions", "a", http_action("http://127.0.0.1:9/x", mode="approve")
    )
    ActionSink(lambda: ActionBook.of(data), load_actions(folder.parent)).deliver(
        [alert(1, "+882<b>13</b>")]
    )
    book = ActionBook.of(data)
    (waiting,) = book.requests(["pending"])
    book.close()
    viewer = signed_in(data, "vic")
    listed = viewer.get("/actions")
    assert listed.status_code == 200
    assert "+882&lt;b&gt;13&lt;/b&gt;" in listed.text and "<b>13</b>" not in listed.text
    assert 'value="approve"' not in listed.text  # a viewer sees no buttons
    refused = viewer.post(
        f"/actions/{waiting.id}",
        data={"csrf": csrf_of(listed.text), "decision": "approve"},
        follow_redirects=False,
    )
    assert refused.status_code == 403
    reviewer = signed_in(data, "ana")
    listed = reviewer.get("/actions")
    no_token = reviewer.post(
        f"/actions/{waiting.id}", data={"decision": "approve"}, follow_redirects=False
    )
    assert no_token.status_code == 403
    book = ActionBook.of(data)
    assert book.request(waiting.id).state == "pending"
    book.close()
    done = reviewer.post(
        f"/actions/{waiting.id}",
        data={"csrf": csrf_of(listed.text), "decision": "approve"},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    book = ActionBook.of(data)
    approved = book.request(waiting.id)
    assert (approved.state, approved.approved_by) == ("queued", "ana")
    assert [row["reviewer"] for row in book.trail(waiting.id) if row["event"] == "approved"] == [
        "ana"
    ]
    book.close()
    again = reviewer.post(
        f"/actions/{waiting.id}",
        data={"csrf": csrf_of(listed.text), "decision": "approve"},
        follow_redirects=False,
    )
    assert again.status_code == 400  # no longer waiting
    # An id past SQLite's integers names no request: a 400, not a failed query.
    huge = reviewer.post(
        "/actions/99999999999999999999999",
        data={"csrf": csrf_of(listed.text), "decision": "approve"},
        follow_redirects=False,
    )
    assert huge.status_code == 400 and "no action request 99999999999999999999999" in huge.text


def test_the_traffic_chart_draws_no_time_still_to_come(console_data: Path) -> None:
    # Half the 36 steps come after the alert: for a recent alert those were drawn with
    # the sliding count of the calls before them, bars for minutes not yet begun.
    from datetime import timedelta

    from engine.console.web import traffic_chart

    view = LakeView(console_data)
    alert = view.alert(alert_id_of(console_data, PLAIN_CALLER))
    assert alert is not None

    def bars(now: datetime | None) -> int:
        return str(traffic_chart(view, alert, 300, now)).count('<rect class="bar"')

    raised = alert["raised_at"]
    assert bars(None) == 36  # the alert is long past: every step has begun
    soon = bars(raised + timedelta(minutes=3))
    assert 20 <= soon <= 22  # the 18 before the alert, and those begun in 3 min
    # A clock behind the alert's (a switch's clock ahead): up to the alert's own step.
    assert bars(raised - timedelta(hours=1)) in (19, 20)
