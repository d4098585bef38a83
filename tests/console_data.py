"""A small replayed data dir for the console's tests: background traffic, a burst of
short calls from a caller whose number is markup, and one from a plain number."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.apps.replay import replay
from engine.console.accounts import Accounts, accounts_path
from tests.conftest import make_settings

SCRIPT_CALLER = "<script>alert('caller')</script>"
MARKUP_MENU = "<img src=x onerror=alert('menu')>"
PLAIN_CALLER = "8613811112222"
# A number with a terminal escape and a right-to-left override: shown as escapes.
CONTROL_CALLER = "86138\x1b[2J\u202e0000"
PASSWORDS = {"ana": "ana-password-1", "vic": "vic-password-1"}


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def events_csv(path: Path) -> None:
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    start = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    number = 0

    def call(at: datetime, caller: str, menu: str, name: str, talk: int) -> None:
        nonlocal number
        number += 1
        who = f"{_quoted(caller)},95588,,{menu},{_quoted(name)}"
        for serial, (state, offset) in enumerate((("180", 0), ("OK", 3), ("BYE", 3 + talk)), 1):
            moment = (at + timedelta(seconds=offset)).isoformat()
            rows.append(f"{moment},c{number},{serial},{state},{who}")

    # Ordinary callers before the bursts: the short-call rule compares a caller with
    # callers at large, who must have been seen (engine.detect.conduct).
    for n in range(40):
        call(start + timedelta(seconds=25 * n), f"86139000{n % 7:05d}", "2", "Balance", 60)
    call(start + timedelta(minutes=5), CONTROL_CALLER, "2", "Balance\x07", 30)
    for n in range(20):
        call(start + timedelta(minutes=20, seconds=5 * n), SCRIPT_CALLER, "7", MARKUP_MENU, 2)
    for n in range(18):
        call(start + timedelta(minutes=40, seconds=6 * n), PLAIN_CALLER, "3", "Main", 1)
    path.write_text("\n".join(rows) + "\n")


def console_data_dir(folder: Path) -> Path:
    """Replay the events into `folder`/data, with a reviewer ana and a viewer vic."""
    folder.mkdir(parents=True, exist_ok=True)
    events_csv(folder / "events.csv")
    data = folder / "data"
    replay([folder / "events.csv"], make_settings(data, detection={"alerts_jsonl": "off"}))
    accounts = Accounts.load(accounts_path(data))
    accounts.set_user("ana", "reviewer", PASSWORDS["ana"])
    accounts.set_user("vic", "viewer", PASSWORDS["vic"])
    accounts.save()
    return data
