"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright's
Python API with `executable_path`; nothing is downloaded), against a real `callsentry
console` process over a small replayed data dir, built once for the module.

What a reviewer does: sign in, see the queue, open an alert, see its evidence and its
chart, mark it false positive with a note, see the status change on the page and in
`alerts_current`. What an attacker tries: a caller number `<script>` and a menu name
with `onerror=` are shown as text and run nothing; a form without its CSRF token is
refused; a viewer cannot review; the API without credentials answers 401. The queue
and alert pages' screenshots are taken here: into the test's own folder, or into docs/
(README "Console") with CALLSENTRY_SCREENSHOTS=docs, so a test run leaves the checkout
as it found it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest
from playwright.sync_api import expect, sync_playwright

from engine.lake.reviews import assign_alerts, list_alerts
from tests.conftest import wait_for
from tests.console_data import MARKUP_MENU, PASSWORDS, PLAIN_CALLER, SCRIPT_CALLER
from tests.console_data import console_data_dir as make_console_data

ROOT = Path(__file__).resolve().parent.parent


def screenshot_folder(tmp_path: Path) -> Path:
    """docs/ when the README's screenshots are to be taken again, else `tmp_path`."""
    return ROOT / "docs" if os.environ.get("CALLSENTRY_SCREENSHOTS") == "docs" else tmp_path


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class RunningConsole:
    url: str
    data: Path
    process: subprocess.Popen[bytes]


@dataclass
class Watched:
    """What the pages did that they must not: dialogs opened, script errors."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    data = make_console_data(tmp_path_factory.mktemp("browser"))
    log = data.parent / "console.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "console",
                "--data-dir",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--refresh-s",
                "1",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    found: list[str] = []

    def started() -> bool:
        assert process.poll() is None, log.read_text()
        found[:] = re.findall(r"console on (http://127\.0\.0\.1:\d+)/", log.read_text())
        return bool(found)

    try:
        wait_for(started, 60, "the console to listen")
        yield RunningConsole(found[0], data, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert Path(CHROMIUM).exists(), "needs Debian's chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def watched_page(browser: Any) -> tuple[Any, Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    watched = Watched()

    def on_dialog(dialog: Any) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on(
        "console",
        lambda message: watched.errors.append(message.text) if message.type == "error" else None,
    )
    return page, watched


def sign_in(page: Any, console: RunningConsole, name: str) -> None:
    page.goto(console.url + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("section.login button[type=submit]")
    page.wait_for_url(console.url + "/")


def alert_id_of(data: Path, entity: str) -> str:
    return next(
        a["alert_id"]
        for a in list_alerts(data, "all", 100)
        if a["entity"] == entity and a["rule_id"] == "short-calls-caller"
    )


def test_a_reviewer_signs_in_opens_an_alert_and_marks_it_false_positive(
    console: RunningConsole, browser: Any, tmp_path: Path
) -> None:
    shots = screenshot_folder(tmp_path)
    page, watched = watched_page(browser)
    sign_in(page, console, "ana")
    rows = page.locator("#queue-rows tr[data-alert-id]")
    assert rows.count() == len(list_alerts(console.data, "open", 100)) >= 3
    assert PLAIN_CALLER in page.locator("#queue-rows").inner_text()
    page.screenshot(path=str(shots / "console-queue.png"))

    alert_id = alert_id_of(console.data, PLAIN_CALLER)
    page.locator(f"#queue-rows tr[data-alert-id='{alert_id}'] a").first.click()
    page.wait_for_url(f"{console.url}/alerts/{alert_id}")
    evidence = page.locator("#evidence tbody tr")
    assert evidence.count() == 8
    assert evidence.first.locator("td").nth(2).inner_text() == PLAIN_CALLER
    chart = page.locator("svg.traffic")
    assert chart.is_visible()
    assert chart.locator("rect.bar").count() > 10 and chart.locator("line.threshold").count() == 1
    assert page.locator("#alert-status").inner_text() == "open"
    page.screenshot(path=str(shots / "console-alert.png"), full_page=True)
    assert (shots / "console-alert.png").stat().st_size > 0

    page.select_option("form.review select[name=status]", "false_positive")
    page.fill("form.review textarea[name=note]", "our own test campaign, checked with ops")
    page.click("form.review button[type=submit]")
    page.wait_for_url(f"{console.url}/alerts/{alert_id}")
    assert page.locator("#alert-status").inner_text() == "false_positive"
    assert "our own test campaign" in page.locator("table.reviews").inner_text()
    with duckdb.connect(str(console.data / "callsentry.duckdb"), read_only=True) as con:
        row = con.execute(
            "SELECT status, reviewer, review_note FROM alerts_current WHERE alert_id = ?",
            [alert_id],
        ).fetchone()
    assert row == ("false_positive", "ana", "our own test campaign, checked with ops")
    assert watched.dialogs == [] and watched.errors == []
    page.context.close()


def test_markup_from_the_network_is_shown_as_text_and_runs_nothing(
    console: RunningConsole, browser: Any
) -> None:
    page, watched = watched_page(browser)
    sign_in(page, console, "ana")
    queue_text = page.locator("#queue-rows").inner_text()
    assert SCRIPT_CALLER in queue_text
    alert_id = alert_id_of(console.data, SCRIPT_CALLER)
    page.goto(f"{console.url}/alerts/{alert_id}")
    cells = page.locator("#evidence tbody tr").first.locator("td")
    assert cells.nth(2).inner_text() == SCRIPT_CALLER
    assert cells.nth(5).inner_text() == f"7 {MARKUP_MENU}"
    # No element came out of the text: no image to fail, no script beyond the console's.
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    assert SCRIPT_CALLER in (page.locator("svg.traffic title").first.text_content() or "")
    page.goto(f"{console.url}/entity?value={SCRIPT_CALLER}")
    assert page.locator("main img").count() == 0
    assert watched.dialogs == [] and watched.errors == []
    page.context.close()


def test_a_form_without_its_csrf_token_is_refused(console: RunningConsole, browser: Any) -> None:
    page, _ = watched_page(browser)
    sign_in(page, console, "ana")
    alert_id = alert_id_of(console.data, SCRIPT_CALLER)
    page.goto(f"{console.url}/alerts/{alert_id}")
    page.eval_on_selector("form.review input[name=csrf]", "element => element.remove()")
    page.fill("form.review textarea[name=note]", "forged")
    page.click("form.review button[type=submit]")
    assert "CSRF" in page.locator("p.error").inner_text()
    statuses = {a["alert_id"]: a["status"] for a in list_alerts(console.data, "all", 100)}
    assert statuses[alert_id] == "open"
    page.context.close()


def test_a_viewer_cannot_review_and_the_api_wants_credentials(
    console: RunningConsole, browser: Any
) -> None:
    page, watched = watched_page(browser)
    sign_in(page, console, "vic")
    alert_id = alert_id_of(console.data, SCRIPT_CALLER)
    page.goto(f"{console.url}/alerts/{alert_id}")
    assert page.locator("form.review").count() == 0
    csrf = page.locator("header input[name=csrf]").get_attribute("value")
    answer = page.request.post(
        f"{console.url}/act",
        form={"alert_id": alert_id, "status": "closed", "note": "x", "csrf": csrf},
        max_redirects=0,
    )
    assert answer.status == 403 and "viewer" in answer.text()
    stranger = browser.new_context()
    for path in ("/api/alerts", f"/api/alerts/{alert_id}"):
        answer = stranger.request.get(console.url + path)
        assert answer.status == 401 and SCRIPT_CALLER not in answer.text()
    stranger.close()
    assert watched.dialogs == [] and watched.errors == []
    page.context.close()


def test_the_queue_shows_changes_without_a_reload(console: RunningConsole, browser: Any) -> None:
    page, watched = watched_page(browser)
    sign_in(page, console, "ana")
    page.evaluate("window.notReloaded = true")
    alert_id = alert_id_of(console.data, SCRIPT_CALLER)
    row = page.locator(f"#queue-rows tr[data-alert-id='{alert_id}'] td").last
    assert row.inner_text() == ""
    assign_alerts(console.data, [alert_id], "vic", "ana")
    # The page's script asks for the rows every second (--refresh-s 1).
    expect(row).to_have_text("vic", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True
    assert watched.dialogs == [] and watched.errors == []
    page.context.close()
