"""Exception files (rules/exceptions/): their format and its errors with file:line, the
`alerts except` command from a replayed data dir to a replay that no longer alerts,
expiry by event time, hostile entity text, the reload of a running serve, backtest's
view of them and the console's."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.apps.backtest import backtest, stored_span
from engine.apps.detectors import check_detectors
from engine.apps.replay import ReplayReport, replay
from engine.console.accounts import session_secret
from engine.console.lakeview import LakeView, RuleBook
from engine.console.web import Console, create_app
from engine.core.events import CallEvent, CallState
from engine.core.yamlfile import YamlFileError, load_yaml
from engine.detect.exceptionfiles import (
    ExceptionSpec,
    file_name,
    read_exception_files,
    render,
    write_exception,
)
from engine.detect.rules import load_rules
from engine.ingest.codec import Vos3000TextCodec
from engine.lake.reviews import list_alerts
from engine.simulator.scenario import generate, load_scenario, write_files
from engine.simulator.switch import SwitchSettings, SwitchStandIn
from tests.conftest import RunningEngine, make_settings, wait_for
from tests.console_data import PASSWORDS, SCRIPT_CALLER, console_data_dir
from tests.test_backtest import short_calls
from tests.test_console import alert_id_of, csrf_of, signed_in

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
START = 1_790_000_000.0  # 2026-09-21T14:13:20Z, where short_calls starts


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def plain_burst(text: str) -> str:
    """short-calls-caller as a plain count (15 in 3 min, no `behaviour:`): these tests
    are about exceptions, on files of a few callers, where the shipped rule's
    comparison with callers at large has nobody to go by."""
    text = re.sub(r"\nbehaviour:\n(?:  .*\n)+", "\n", text)
    return text.replace("window: 5m}", "window: 3m}").replace("threshold: 8}", "threshold: 15}")


def rules_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    burst = folder / "short-calls-caller.yaml"
    burst.write_text(plain_burst(burst.read_text(encoding="utf-8")), encoding="utf-8")
    return folder


GOOD = """\
rule: short-calls-caller
entity_type: caller
entity: "8613900000001"
reason: the Acme PBX
expires: 2027-03-05
created_by: ana
"""


# -- the file format --------------------------------------------------------------------


@pytest.mark.parametrize(
    "expires",
    [
        date(2027, 3, 5),
        datetime(2027, 3, 5, 12, 30, tzinfo=UTC),
        "never",
    ],
)
def test_a_written_exception_reads_back_as_the_same_exception(
    tmp_path: Path, expires: object
) -> None:
    spec = ExceptionSpec.model_validate(
        {
            "model": "model.caller-behaviour",
            "entity_type": "caller",
            "entity": "+8613900000001",
            "reason": "our test robot: 'short' on purpose",
            "expires": expires,
            "created_by": "ana",
            "created_at": datetime(2026, 12, 5, 16, 0, tzinfo=UTC),
            "alert_id": "0f2c",
            "verdict": "false_positive",
        }
    )
    path = write_exception(tmp_path, spec)
    problems: list[str] = []
    ((read, _),) = read_exception_files(tmp_path, problems)
    assert problems == [] and read == spec and read.until == spec.until
    assert path.read_text() == render(spec)


def test_an_expiry_date_holds_through_its_day_and_a_time_until_that_moment() -> None:
    day = ExceptionSpec.model_validate(
        {**load_yaml_text(GOOD), "expires": "2027-03-05"}
    )  # through 2027-03-05 23:59:59 UTC
    assert day.until == datetime(2027, 3, 6, tzinfo=UTC).timestamp()
    moment = ExceptionSpec.model_validate(
        {**load_yaml_text(GOOD), "expires": "2027-03-05T12:00:00+08:00"}
    )
    assert moment.until == datetime(2027, 3, 5, 4, tzinfo=UTC).timestamp()
    naive = ExceptionSpec.model_validate({**load_yaml_text(GOOD), "expires": "2027-03-05T12:00"})
    assert naive.until == datetime(2027, 3, 5, 12, tzinfo=UTC).timestamp(), "UTC unless stated"


def load_yaml_text(text: str) -> dict[str, object]:
    import yaml

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (GOOD.replace("short-calls-caller", "no-such-rule"), 1, "rule: no rule 'no-such-rule'"),
        (
            GOOD.replace("rule: short-calls-caller", "model: model.nope"),
            1,
            "model: no model 'model.nope'",
        ),
        (
            GOOD.replace("entity_type: caller", "entity_type: menu"),
            2,
            "entity_type: rule 'short-calls-caller' alerts per caller, not menu",
        ),
        (GOOD.replace('"8613900000001"', "0012"), 3, "entity: write the entity in quotes"),
        (GOOD.replace('"8613900000001"', '""'), 3, "entity: String should have at least 1"),
        (GOOD.replace("2027-03-05", "next week"), 5, "expires: 'next week' is not a date"),
        (GOOD.replace("2027-03-05", "2027-02-30"), 5, "invalid value"),
        # The day after the last date there is does not exist: never is how to say it.
        (GOOD.replace("2027-03-05", "9999-12-31"), 5, "the year must be from 1970 to 9998"),
        (GOOD.replace("2027-03-05", "0001-01-01T00:00:00+05:00"), 5, "out of range"),
        (GOOD.replace("expires: 2027-03-05\n", ""), 1, "expires: Field required"),
        (GOOD.replace("reason: the Acme PBX", "reason: '  '"), 4, "reason: must not be blank"),
        (GOOD + "model: model.caller-behaviour\n", 1, "name either the rule"),
        (GOOD + "colour: red\n", 7, "colour: unknown key"),
        ("- a list\n", 1, "expected an exception"),
        ("rule: [unclosed\n", 2, "invalid YAML"),
    ],
)
def test_each_bad_field_is_named_with_its_file_and_line(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    path = folder / "exceptions" / "x.yaml"
    path.write_text(text)
    with pytest.raises(YamlFileError) as raised:
        check_detectors(folder)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}:{line}: "), problem
    assert expected in problem, problem
    # `rules validate` says the same, with the models beside the rules.
    validated = run_cli("rules", "validate", str(folder))
    assert validated.returncode == 1 and f"{path}:{line}: " in validated.stderr


def test_a_duplicate_is_named_with_both_files(tmp_path: Path) -> None:
    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    (folder / "exceptions" / "a.yaml").write_text(GOOD)
    (folder / "exceptions" / "b.yaml").write_text("# the same again\n" + GOOD)
    with pytest.raises(YamlFileError) as raised:
        load_rules(folder)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{folder / 'exceptions' / 'b.yaml'}:4: the same exception")
    assert str(folder / "exceptions" / "a.yaml:3") in problem
    # A renewal (another expiry) is no duplicate: the longest one holds.
    (folder / "exceptions" / "b.yaml").write_text(GOOD.replace("2027-03-05", "never"))
    rule = load_rules(folder).rules.by_id()["short-calls-caller"]
    assert rule.excepted("8613900000001", datetime(2040, 1, 1, tzinfo=UTC).timestamp())


def test_a_composite_entity_names_each_of_its_values(tmp_path: Path) -> None:
    folder = rules_copy(tmp_path)
    rule = (folder / "short-calls-caller.yaml").read_text()
    (folder / "short-calls-caller.yaml").write_text(
        rule.replace("group_by: caller", "group_by: [switch, caller]")
    )
    (folder / "exceptions").mkdir()
    path = folder / "exceptions" / "x.yaml"
    path.write_text(GOOD.replace("entity_type: caller", "entity_type: switch/caller"))
    with pytest.raises(YamlFileError, match=r"x.yaml:3: entity: a switch/caller entity names 2"):
        load_rules(folder)
    path.write_text(
        GOOD.replace("entity_type: caller", "entity_type: switch/caller").replace(
            '"8613900000001"', '"east/8613900000001"'
        )
    )
    assert load_rules(folder).rules.exceptions[0].entity == "east/8613900000001"


def test_a_rule_loaded_alone_takes_its_own_exceptions_only(tmp_path: Path) -> None:
    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    (folder / "exceptions" / "a.yaml").write_text(GOOD)
    other = GOOD.replace("short-calls-caller", "fanout-callee-caller")
    (folder / "exceptions" / "b.yaml").write_text(other)
    alone = load_rules(folder / "short-calls-caller.yaml").rules
    assert [e.source for e in alone.exceptions] == ["short-calls-caller"]
    assert alone.rules[0].excepted("8613900000001", START)


def test_an_inline_exception_holds_through_its_expiry_day_in_event_time(tmp_path: Path) -> None:
    folder = rules_copy(tmp_path)
    path = folder / "short-calls-caller.yaml"
    text = path.read_text()
    assert "exceptions:\n" in text
    inline = "  - {name: robot, values: ['8613900000001'], reason: test, expires: 2026-09-21}\n"
    path.write_text(text.replace("exceptions:\n", "exceptions:\n" + inline))
    rule = load_rules(path).rules.rules[0]
    last_moment = datetime(2026, 9, 21, 23, 59, 59, tzinfo=UTC).timestamp()
    assert rule.excepted("8613900000001", last_moment)
    assert not rule.excepted("8613900000001", last_moment + 1)
    assert not rule.excepted("8613900000002", START)


def test_an_inline_exception_to_the_last_date_there_is_never_ends(tmp_path: Path) -> None:
    folder = rules_copy(tmp_path)
    path = folder / "short-calls-caller.yaml"
    inline = "  - {name: robot, values: ['8613900000001'], reason: test, expires: 9999-12-31}\n"
    path.write_text(path.read_text().replace("exceptions:\n", "exceptions:\n" + inline))
    rule = load_rules(path).rules.rules[0]
    assert rule.excepted("8613900000001", datetime(9999, 12, 31, 23, tzinfo=UTC).timestamp())


# -- hostile entity text ----------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    entity=st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300),
        st.sampled_from(["../../etc/passwd", "a\0b", "x\nrule: other\nentity: y", "." * 300]),
    )
)
def test_any_entity_text_makes_a_safe_file_name_and_stays_one_value(entity: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "exceptions"
        spec = ExceptionSpec.model_validate(
            {
                "rule": "short-calls-caller",
                "entity_type": "caller",
                "entity": entity,
                "reason": f"why: {entity}",
                "expires": "never",
                "created_by": f"ana {entity}",
            }
        )
        path = write_exception(folder, spec)
        assert path.parent == folder and list(Path(root).iterdir()) == [folder]
        assert re.fullmatch(r"[A-Za-z0-9+_.-]+\.yaml", path.name) and len(path.name) < 140
        assert not path.name.startswith(".")
        document = load_yaml(path)
        assert set(document.data) == {"rule", "entity_type", "entity", "reason", "expires"} | {
            "created_by"
        }
        problems: list[str] = []
        ((read, _),) = read_exception_files(folder, problems)
        assert problems == [] and read == spec and read.reason == f"why: {entity}"


def test_entities_that_clean_up_alike_get_files_of_their_own() -> None:
    assert file_name("r", "86/139") != file_name("r", "86_139")
    assert file_name("r", "x") != file_name("r", "x", 1)


# -- the command, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def fraud_mix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReplayReport]:
    """A data dir made by a replay of the fraud mix (rule and model alerts), and the
    event file it was made from."""
    root = tmp_path_factory.mktemp("excepting")
    generated = generate(load_scenario(ROOT / "data" / "scenarios" / "fraud-mix.yaml"))
    events, _ = write_files(generated, root / "events")
    report = replay([events], make_settings(root / "data", detection={"alerts_jsonl": "off"}))
    return events, report


def test_alerts_except_stops_the_entitys_alerts_in_the_next_replay_and_no_others(
    fraud_mix: tuple[Path, ReplayReport], tmp_path: Path
) -> None:
    events, first = fraud_mix
    data = tmp_path / "data"
    replay([events], make_settings(data, detection={"alerts_jsonl": "off"}))
    folder = rules_copy(tmp_path)
    rule_alert = next(a for a in first.alerts if a.detector == "rule")
    model_alert = next(a for a in first.alerts if a.detector == "model")
    made = []
    for alert in (rule_alert, model_alert):
        done = run_cli(
            "alerts", "except", alert.alert_id[:12], "--reason", "benign by nature",
            "--rules", str(folder), "--data-dir", str(data), "--reviewer", "ana",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        path = Path(re.search(r"exception written: (\S+)", done.stdout)[1])  # type: ignore[index]
        assert path.parent == folder / "exceptions"
        assert "commit" in done.stdout and f"{alert.alert_id} is false_positive" in done.stdout
        made.append(path)
    rule_file = load_yaml(made[0]).data
    assert rule_file["rule"] == rule_alert.rule_id and rule_file["entity"] == rule_alert.entity
    assert rule_file["alert_id"] == rule_alert.alert_id and rule_file["created_by"] == "ana"
    assert load_yaml(made[1]).data["model"] == model_alert.rule_id
    # The verdict is in the review trail, as `alerts review` records it.
    reviewed = {a["alert_id"]: a for a in list_alerts(data, "false_positive", 100)}
    assert {rule_alert.alert_id, model_alert.alert_id} <= set(reviewed)
    assert reviewed[rule_alert.alert_id]["reviewer"] == "ana"

    again = run_cli(
        "alerts", "except", rule_alert.alert_id, "--reason", "again",
        "--rules", str(folder), "--data-dir", str(data),
    )  # fmt: skip
    assert again.returncode == 1
    assert "already has an exception for this entity until" in again.stderr
    assert len(list((folder / "exceptions").iterdir())) == 2, "nothing more written"
    listed = run_cli("rules", "exceptions", "--rules", str(folder))
    assert listed.returncode == 0 and listed.stdout.startswith("in force (2):")
    assert rule_alert.entity in listed.stdout and "benign by nature (ana" in listed.stdout
    assert run_cli("rules", "validate", str(folder)).returncode == 0
    # The folder a settings file names, as `serve --config` would run it.
    config = tmp_path / "callsentry.toml"
    config.write_text(f"[detection]\nrules_dir = {json.dumps(str(folder))}\n")
    by_config = run_cli("rules", "exceptions", "--config", str(config))
    assert by_config.returncode == 0 and by_config.stdout == listed.stdout
    validated = run_cli("rules", "validate", "--config", str(config))
    assert validated.returncode == 0 and validated.stdout.startswith(f"{folder}: ")

    second = replay(
        [events], make_settings(tmp_path / "again", detection={"alerts_jsonl": "off"}), folder
    )
    excepted = {(rule_alert.rule_id, rule_alert.entity), (model_alert.rule_id, model_alert.entity)}
    kept = {a.alert_id for a in first.alerts if (a.rule_id, a.entity) not in excepted}
    assert kept, "other alerts for this test to mean anything"
    assert {a.alert_id for a in second.alerts} == kept


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--expires", "yesterday"], "--expires 'yesterday': not a duration"),
        (["--expires", "2020-01-01"], "--expires '2020-01-01': that is not in the future"),
        (["--reason", " "], "--reason: say why"),
        (["--reviewer", " "], "--reviewer: give the reviewer's name"),
        (["--expires", "9999-12-31"], "--expires '9999-12-31': '9999-12-31' is out of range"),
    ],
)
def test_alerts_except_refuses_clearly_and_writes_nothing(
    fraud_mix: tuple[Path, ReplayReport], tmp_path: Path, args: list[str], expected: str
) -> None:
    events, first = fraud_mix
    data = tmp_path / "data"
    replay([events], make_settings(data, detection={"alerts_jsonl": "off"}))
    folder = rules_copy(tmp_path)
    alert = first.alerts[0]
    done = run_cli(
        "alerts", "except", alert.alert_id, "--reason", "r", "--rules", str(folder),
        "--data-dir", str(data), *args,
    )  # fmt: skip
    # A value the option cannot take: exit code 2, as click's own refusals.
    assert done.returncode == 2 and done.stderr.startswith(f"callsentry: {expected}"), done.stderr
    unknown = run_cli(
        "alerts", "except", "ffffffff", "--reason", "r", "--rules", str(folder),
        "--data-dir", str(data),
    )  # fmt: skip
    assert unknown.returncode == 1 and "no alert 'ffffffff'" in unknown.stderr
    assert not (folder / "exceptions").exists()
    assert list_alerts(data, "false_positive", 10) == []


def bursts_csv(path: Path, bursts: list[tuple[str, float]]) -> None:
    """Per (caller, start): 20 answered calls of 2 s, one every 6 s."""
    rows = ["ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name"]
    for index, (caller, start) in enumerate(bursts):
        for n in range(20):
            t = start + n * 6
            call = f"b{index}-{n}@10.0.0.5"
            for serial, (dt, state) in enumerate(((0, "180"), (1, "OK"), (3, "Bye")), 1):
                rows.append(f"{t + dt},{call},{serial},{state},{caller},4008001000,,1,Main")
    rows[1:] = sorted(rows[1:], key=lambda row: float(row.split(",")[0]))
    path.write_text("\n".join(rows) + "\n")


def test_an_exception_stops_holding_at_its_expiry_in_event_time(tmp_path: Path) -> None:
    events = tmp_path / "bursts.csv"
    # The excepted caller's bursts before and after the expiry, and another caller's.
    bursts_csv(
        events,
        [("8613900000001", START), ("8613900000003", START), ("8613900000001", START + 7200)],
    )
    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    # An hour after the first burst, in event time: whenever this test runs.
    expiry = datetime.fromtimestamp(START + 3600, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (folder / "exceptions" / "robot.yaml").write_text(GOOD.replace("2027-03-05", expiry))
    settings_ = make_settings(tmp_path / "data", detection={"alerts_jsonl": "off"})
    report = replay([events], settings_, folder)
    bursts = [a for a in report.alerts if a.rule_id == "short-calls-caller"]
    mine = [a.raised_at for a in bursts if a.entity == "8613900000001"]
    assert len(mine) == 1 and mine[0] > START + 7200, "only the burst after the expiry"
    assert [a.entity for a in bursts if a.raised_at < START + 3600] == ["8613900000003"]
    # Without the file, both bursts alert (the test can fail).
    (folder / "exceptions" / "robot.yaml").unlink()
    plain = replay([events], make_settings(tmp_path / "plain"), folder)
    assert (
        sum(a.entity == "8613900000001" and a.rule_id == "short-calls-caller" for a in plain.alerts)
        == 2
    )


# -- backtest ---------------------------------------------------------------------------


def test_backtest_names_the_alerts_an_exception_holds_back(tmp_path: Path) -> None:
    events = tmp_path / "short.csv"
    short_calls(events, {"8613900000001": 20, "8613900000002": 20})
    data = tmp_path / "data"
    replay([events], make_settings(data))
    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    (folder / "exceptions" / "robot.yaml").write_text(GOOD)
    against = rules_copy(tmp_path / "in-use")
    first, last = stored_span(data)
    report = backtest(data, folder, against, make_settings(data).detection, first, last + 1)
    (removed,) = [a for a in report.removed if a.rule_id == "short-calls-caller"]
    assert removed.entity == "8613900000001"
    assert report.excepted[removed.alert_id].where.startswith(str(folder / "exceptions"))
    shown = run_cli(
        "rules", "backtest", str(folder), "--against", str(against), "--data-dir", str(data)
    )
    assert shown.returncode == 0, shown.stderr
    assert "(excepted: " in shown.stdout and "held back by the change's exception" in shown.stdout


# -- a running serve --------------------------------------------------------------------


def test_serve_picks_up_a_new_exception_file_at_its_reload(
    engine_factory: Callable[..., RunningEngine],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True)
    shutil.copy(RULES / "lists" / "known_trunks.yaml", folder / "lists")
    quick = plain_burst((RULES / "short-calls-caller.yaml").read_text())
    quick = quick.replace("threshold: 15", "threshold: 3")
    (folder / "short-calls-caller.yaml").write_text(quick)
    running = engine_factory(
        detection={
            "rules_dir": str(folder),
            "reload_interval_s": 0.3,
            "tick_s": 0.3,
            "settle_s": 0.5,
            "alerts_jsonl": "off",
        }
    )
    host, port = running.address
    database = tmp_path / "data" / "callsentry.duckdb"

    def burst(caller: str) -> None:
        now = time.time()
        events = []
        for n in range(4):
            for serial, state, at in (
                (1, CallState.RINGING, 0.0),
                (2, CallState.ANSWERED, 0.1),
                (3, CallState.HANGUP, 0.6),
            ):
                events.append(
                    CallEvent(
                        now + n * 0.05 + at,
                        f"{caller}-{n}",
                        serial,
                        state,
                        None,
                        caller,
                        "400",
                        "",
                        "1",
                        "m",
                    )
                )
        events.sort(key=lambda e: e.ts)
        switch = SwitchStandIn(Vos3000TextCodec(), SwitchSettings(host=host, port=port))
        offsets = [e.ts - now for e in events]
        assert asyncio.run(switch.send(events, offsets)).answered == len(events)

    def alerts_of(caller: str) -> int:
        with duckdb.connect(str(database), read_only=True) as con:
            row = con.execute("SELECT count(*) FROM alerts WHERE entity = ?", [caller]).fetchone()
        return int(row[0]) if row else 0

    said = ""

    def writer_said(text: str) -> bool:
        nonlocal said
        said += capfd.readouterr().err
        return text in said

    burst("1111")
    wait_for(lambda: alerts_of("1111") > 0, 60, "the rule raising an alert before")
    (folder / "exceptions").mkdir()
    (folder / "exceptions" / "pbx.yaml").write_text(
        GOOD.replace('"8613900000001"', '"2222"').replace("2027-03-05", "never")
    )
    wait_for(lambda: writer_said("rules reloaded"), 30, "the new exception file read")
    burst("2222")
    burst("3333")
    wait_for(lambda: alerts_of("3333") > 0, 60, "another caller still alerting")
    # The lake is written in journal order: 2222's calls came before 3333's.
    assert alerts_of("2222") == 0, "the excepted caller raised nothing"


# -- the console ------------------------------------------------------------------------


def test_the_alert_page_says_excepted_until_or_how_to_make_one(tmp_path: Path) -> None:
    data = console_data_dir(tmp_path / "console")
    client = signed_in(data)
    alert_id = alert_id_of(data, SCRIPT_CALLER)
    page = client.get(f"/alerts/{alert_id}").text
    assert f"callsentry alerts except {alert_id} --reason" in page
    assert "excepted until" not in page

    folder = rules_copy(tmp_path)
    (folder / "exceptions").mkdir()
    spec = ExceptionSpec.model_validate(
        {
            "rule": "short-calls-caller",
            "entity_type": "caller",
            "entity": SCRIPT_CALLER,
            "reason": "<b>robot</b>",
            "expires": "never",
            "created_by": "ana",
        }
    )
    write_exception(folder / "exceptions", spec)
    console = Console(data, LakeView(data), RuleBook.read(folder))
    client = TestClient(create_app(console, session_secret(data)), base_url="http://127.0.0.1")
    token = csrf_of(client.get("/login").text)
    client.post(
        "/login",
        data={"username": "ana", "password": PASSWORDS["ana"], "csrf": token, "next": "/"},
    )
    page = client.get(f"/alerts/{alert_id}").text
    shown = re.search(r'<dd id="alert-exception">(.*?)</dd>', page, re.S)
    assert shown is not None and shown[1].startswith("excepted until never: ")
    assert "&lt;b&gt;robot&lt;/b&gt;" in shown[1] and "<b>" not in shown[1]
