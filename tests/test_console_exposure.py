"""The console's estimated exposure: the tariff list (engine/console/tariffs.py), each
alert's exposure counted in DuckDB on a real replayed lake and checked against the
same calls counted here with polars, the queue sorted by it (page and API), an alert's
breakdown, and the setting and option that name the list."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from engine.apps.replay import replay
from engine.console.accounts import Accounts, accounts_path, session_secret
from engine.console.lakeview import LakeView, RuleBook
from engine.console.tariffs import load_tariffs
from engine.console.web import Console, create_app
from engine.core.yamlfile import YamlFileError
from engine.detect.numbers import NumberPlan
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "rules" / "tariffs" / "tariffs.yaml"
PASSWORD = "ana-password-1"

TARIFFS = """\
currency: EUR
rates:
  - {prefix: "44", rate: 0.10, name: UK}
  - {prefix: "447", rate: 0.50, name: UK mobile}
  - {prefix: "+881", rate: 8.00, name: Satellite}
"""

# -- the tariff file ---------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tariffs.yaml"
    path.write_text(text)
    return path


def test_a_tariff_list_is_read_with_its_currency_and_longest_prefix(tmp_path: Path) -> None:
    tariffs = load_tariffs(write(tmp_path, TARIFFS))
    assert tariffs.currency == "EUR"
    assert [(t.prefix, t.rate) for t in tariffs.tariffs] == [
        ("44", 0.1),
        ("447", 0.5),
        ("881", 8.0),
    ]
    uk_mobile = tariffs.rate_of("447700900123")
    uk_fixed = tariffs.rate_of("442079460000")
    assert uk_mobile is not None and uk_mobile.name == "UK mobile"
    assert uk_fixed is not None and uk_fixed.rate == 0.1
    assert tariffs.rate_of("33142000000") is None
    shipped = load_tariffs(SHIPPED)
    assert shipped.currency == "EUR" and len(shipped.tariffs) >= 5


@pytest.mark.parametrize(
    ("text", "line", "said"),
    [
        (TARIFFS.replace('"447"', '"44x"'), 4, "is no E.164 prefix"),
        (TARIFFS.replace('"447"', "447"), 4, "write it in quotes"),
        (TARIFFS.replace("rate: 0.50", "rate: -0.5"), 4, "is not a finite number >= 0"),
        (TARIFFS.replace("rate: 0.50", "rate: .nan"), 4, "is not a finite number >= 0"),
        (TARIFFS.replace("rate: 0.50", "rate: cheap"), 4, "is no number"),
        (TARIFFS.replace('"+881"', '"44"'), 5, "prefix '44' is also on line 3"),
        (TARIFFS.replace('"+881"', '"+44"'), 5, "prefix '44' is also on line 3"),
        (TARIFFS.replace("currency: EUR", "currency: euro"), 1, "is no ISO 4217 code"),
        (TARIFFS.replace("currency: EUR\n", ""), 1, "currency: missing"),
        (TARIFFS.replace("name: UK}", "name: UK, tax: 3}"), 3, "unknown key"),
        (TARIFFS + "discount: 5\n", 6, "unknown key 'discount'"),
        ("currency: EUR\nrates: []\n", 2, "a list of destinations is needed"),
        ("currency: EUR\nrates:\n  - 44\n", 3, "expected prefix and rate"),
        ("- 44\n", 1, "expected a tariff list"),
        ("currency: EUR\nrates: &r [1]\nmore: *r\n", 3, "aliases"),
        ("currency: EUR\nrates: [\n", 3, "invalid YAML"),
    ],
)
def test_each_bad_tariff_list_is_refused_at_its_line(
    tmp_path: Path, text: str, line: int, said: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(YamlFileError) as raised:
        load_tariffs(path)
    assert any(
        problem.startswith(f"{path}:{line}:") and said in problem
        for problem in raised.value.problems
    ), raised.value.problems


def test_a_tariff_list_past_the_size_limit_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    from engine.core.yamlfile import YamlLimits

    path = write(tmp_path, TARIFFS)
    with pytest.raises(YamlFileError, match="larger than 100 bytes"):
        load_tariffs(path, YamlLimits(max_bytes=100))


# -- exposure on a replayed lake ---------------------------------------------------------

A = "8613800000001"  # short calls to every kind of destination, some forwarded
B = "8613800000002"  # short calls to UK mobiles only
SATELLITE = "00881612345678"


def events_csv(path: Path) -> None:
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    start = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    number = 0

    def call(
        at: datetime, caller: str, callee: str, forward: str, talk: int, answered: bool = True
    ) -> None:
        nonlocal number
        number += 1
        who = f"{caller},{callee},{forward},3,Main"
        states = (("180", 0), ("OK", 3), ("BYE", 3 + talk)) if answered else (("180", 0),)
        states += () if answered else (("BYE", 20),)
        for serial, (state, offset) in enumerate(states, 1):
            moment = (at + timedelta(seconds=offset)).isoformat()
            rows.append(f"{moment},c{number},{serial},{state},{who}")

    for n in range(30):
        call(start + timedelta(seconds=120 * n), f"86139000{n % 5:05d}", "95588", "", 60)
    destinations = [
        ("0044207946000", ""),  # UK fixed, 0.10
        ("+447700900123", ""),  # UK mobile, 0.50
        ("95588", SATELLITE),  # forwarded: the forward number is priced, 8.00
        ("0099123456", ""),  # no tariff: unpriced
        ("95588", ""),  # a national form, no default region: unpriced
    ]
    for n in range(20):
        callee, forward = destinations[n % len(destinations)]
        call(start + timedelta(minutes=20, seconds=6 * n), A, callee, forward, 1 + n % 4)
        if n % 3 == 0:
            call(start + timedelta(minutes=20, seconds=6 * n + 2), A, "0044207946001", "", 0, False)
    for n in range(17):
        call(start + timedelta(minutes=50, seconds=7 * n), B, f"00447700900{n:03d}", "", 3)
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def priced_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("exposure")
    events_csv(folder / "events.csv")
    data = folder / "data"
    replay([folder / "events.csv"], make_settings(data, detection={"alerts_jsonl": "off"}))
    accounts = Accounts.load(accounts_path(data))
    accounts.set_user("ana", "reviewer", PASSWORD)
    accounts.save()
    (folder / "tariffs.yaml").write_text(TARIFFS)
    return data


def client_for(data: Path, priced: bool = True) -> TestClient:
    view = LakeView(data)
    if priced:
        view.price_with(load_tariffs(data.parent / "tariffs.yaml"), NumberPlan())
    console = Console(data, view, RuleBook.read(ROOT / "rules"))
    client = TestClient(create_app(console, session_secret(data)), base_url="http://127.0.0.1")
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
    assert csrf is not None
    answer = client.post(
        "/login",
        data={"username": "ana", "password": PASSWORD, "csrf": csrf.group(1)},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    return client


def counted_by_hand(data: Path) -> dict[str, tuple[float, float]]:
    """Per alert: (exposure, unpriced minutes) from the lake's own tables, by polars."""
    lake = data / "lake"
    alerts = pl.read_parquet(lake / "alerts" / "**" / "*.parquet", hive_partitioning=False)
    calls = pl.read_parquet(lake / "calls" / "**" / "*.parquet", hive_partitioning=False)
    rates = {"44": 0.10, "447": 0.50, "881": 8.00}

    def rate_of(number: str) -> float | None:
        # The numbers here are international forms: "+" or "00", then the country code.
        digits = number[1:] if number.startswith("+") else number[2:]
        if not number.startswith(("+", "00")) or not digits.isdigit():
            return None
        found = [p for p in rates if digits.startswith(p)]
        return rates[max(found, key=len)] if found else None

    legs = (
        alerts.select("alert_id", "evidence")
        .explode("evidence")
        .join(calls, left_on="evidence", right_on="call_id")
        .filter(pl.col("outcome") == "answered")
        .with_columns(
            pl.when(pl.col("forward").fill_null("") != "")
            .then(pl.col("forward"))
            .otherwise(pl.col("callee"))
            .alias("number"),
            (pl.col("talk_s").fill_null(0) / 60).alias("minutes"),
        )
    )
    expected = {a: (0.0, 0.0) for a in alerts["alert_id"]}
    for alert_id, number, minutes in legs.select("alert_id", "number", "minutes").iter_rows():
        rate = rate_of(number)
        exposure, unpriced = expected[alert_id]
        expected[alert_id] = (
            exposure + minutes * (rate or 0.0),
            unpriced + (minutes if rate is None else 0.0),
        )
    return expected


def test_exposure_is_the_answered_minutes_times_their_rate(priced_data: Path) -> None:
    expected = counted_by_hand(priced_data)
    client = client_for(priced_data)
    answer = client.get("/api/alerts", params={"status": "all", "sort": "exposure"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["currency"] == "EUR"
    alerts = body["alerts"]
    assert {a["alert_id"] for a in alerts} == set(expected)
    for alert in alerts:
        exposure, unpriced = expected[alert["alert_id"]]
        assert alert["exposure"] == pytest.approx(exposure, abs=1e-9), alert
        assert alert["unpriced_minutes"] == pytest.approx(unpriced, abs=1e-9), alert
    # The scenario gives each kind of alert: priced, with unpriced minutes, and the
    # forwarded calls' (only the forward number priced, at the satellite rate).
    of_a = [a for a in alerts if a["entity"] == A]
    assert of_a and of_a[0]["exposure"] > 0 and of_a[0]["unpriced_minutes"] > 0
    forwarded = [a for a in alerts if a["entity"] == SATELLITE]
    assert forwarded and forwarded[0]["exposure"] > 0, [a["entity"] for a in alerts]
    assert forwarded[0]["unpriced_minutes"] == 0
    # Largest first.
    exposures = [a["exposure"] for a in alerts]
    assert exposures == sorted(exposures, reverse=True) and exposures[0] > exposures[-1]


def test_the_queue_page_sorts_by_exposure_and_shows_it(priced_data: Path) -> None:
    client = client_for(priced_data)
    api = client.get("/api/alerts", params={"status": "all", "sort": "exposure"}).json()
    page = client.get("/", params={"status": "all", "sort": "exposure"}).text
    assert "Exposure (EUR)" in page and '<option value="exposure" selected>' in page
    assert re.findall(r'data-alert-id="([^"]+)"', page) == [a["alert_id"] for a in api["alerts"]]
    top = api["alerts"][0]
    assert f"{top['exposure']:,.2f}" in page
    # The default stays severity then time, with the exposure column still shown.
    default = client.get("/", params={"status": "all"}).text
    assert '<option value="severity" selected>' in default and "Exposure (EUR)" in default
    by_severity = client.get("/api/alerts", params={"status": "all", "sort": "severity"}).json()
    ranks = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    order = [ranks[a["severity"]] for a in by_severity["alerts"]]
    assert order == sorted(order) and len(set(order)) > 1
    assert re.findall(r'data-alert-id="([^"]+)"', default) == [
        a["alert_id"] for a in by_severity["alerts"]
    ]
    bad = client.get("/api/alerts", params={"sort": "price"})
    assert bad.status_code == 400 and "sort 'price'" in bad.json()["detail"]


def test_an_alert_page_breaks_its_exposure_down_by_prefix(priced_data: Path) -> None:
    client = client_for(priced_data)
    alerts = client.get("/api/alerts", params={"status": "all", "sort": "exposure"}).json()
    of_a = next(a for a in alerts["alerts"] if a["entity"] == A)
    detail = client.get(f"/api/alerts/{of_a['alert_id']}").json()
    assert detail["exposure"] == pytest.approx(of_a["exposure"], abs=1e-9)
    assert detail["unpriced_minutes"] == pytest.approx(of_a["unpriced_minutes"], abs=1e-9)
    parts = {part["prefix"]: part for part in detail["exposure_by_prefix"]}
    assert set(parts) == {"44", "447", "881", None}
    assert parts["881"]["exposure"] == pytest.approx(parts["881"]["minutes"] * 8.0)
    page = client.get(f"/alerts/{of_a['alert_id']}").text
    assert 'id="exposure"' in page and "Satellite" in page and "unpriced" in page
    assert f"{of_a['exposure']:,.2f} EUR" in page


def test_without_a_tariff_list_there_is_no_exposure_and_no_such_sort(priced_data: Path) -> None:
    client = client_for(priced_data, priced=False)
    answer = client.get("/api/alerts", params={"status": "all", "sort": "exposure"})
    assert answer.status_code == 400 and "tariff list" in answer.json()["detail"]
    plain = client.get("/api/alerts", params={"status": "all"}).json()
    assert "currency" not in plain and all("exposure" not in a for a in plain["alerts"])
    page = client.get("/", params={"status": "all"}).text
    assert "Exposure" not in page and 'name="sort"' not in page
    assert client.get("/", params={"sort": "exposure"}).status_code == 400


def test_new_calls_of_an_unsettled_alert_are_counted_on_the_next_look(
    priced_data: Path, tmp_path: Path
) -> None:
    """An alert whose evidence calls are not all in `calls` is counted again when a
    file of `calls` changes: here its calls are left out of the lake, then put back."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(priced_data, data)
    (tmp_path / "tariffs.yaml").write_text(TARIFFS)
    calls = sorted((data / "lake" / "calls").rglob("*.parquet"))
    kept = tmp_path / "kept"
    kept.mkdir()
    for index, path in enumerate(calls):
        shutil.copy(path, kept / f"{index}.parquet")
    evidence = set(
        pl.read_parquet(data / "lake" / "alerts" / "**" / "*.parquet", hive_partitioning=False)
        .explode("evidence")["evidence"]
        .to_list()
    )
    for path in calls:
        table = pl.read_parquet(path, hive_partitioning=False)
        table.filter(~pl.col("call_id").is_in(list(evidence))).write_parquet(path)
    view = LakeView(data, exposure_max_age_s=0)
    view.price_with(load_tariffs(tmp_path / "tariffs.yaml"), NumberPlan())
    from engine.console.lakeview import QueueFilter

    before = view.queue(QueueFilter(status="all"), 100, "exposure")
    assert before and all(a["exposure"] == 0 for a in before)
    for index, path in enumerate(calls):
        shutil.copy(kept / f"{index}.parquet", path)
    after = view.queue(QueueFilter(status="all"), 100, "exposure")
    expected = counted_by_hand(data)
    assert after[0]["exposure"] > 0
    for alert in after:
        assert alert["exposure"] == pytest.approx(expected[alert["alert_id"]][0], abs=1e-9)
    view.close()


# -- where the list is named ---------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSENTRY_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_a_bad_tariff_list_is_refused_by_the_console_and_config_check(tmp_path: Path) -> None:
    bad = write(tmp_path, TARIFFS.replace("rate: 0.50", "rate: -1"))
    config = tmp_path / "callsentry.toml"
    config.write_text(f'[console]\ntariffs = "{bad}"\n')
    for argv in (
        ["console", "--tariffs", str(bad), "--data-dir", str(tmp_path)],
        ["console", "--config", str(config), "--data-dir", str(tmp_path)],
        ["config", "check", "--config", str(config)],
    ):
        done = cli(*argv, cwd=tmp_path)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[0].startswith(f"{bad}:4: rates.1.rate: -1"), done.stderr
        assert lines[-1] == "callsentry: the tariff list is invalid (1 problem(s))"
    missing = cli("console", "--tariffs", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nope.yaml: cannot read" in missing.stderr
    config.write_text(f'[console]\ntariffs = "{SHIPPED}"\n')
    good = cli("config", "check", "--config", str(config), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert f"tariffs = {str(SHIPPED)!r}".replace("'", '"') in good.stdout
    assert "# console.tariffs: 12 destination(s), in EUR" in good.stdout
