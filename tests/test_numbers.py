"""Destinations: numbers read by a plan (prefixes, default region) into country, type and
validity (engine/detect/numbers.py), the fields rules select and group by, the
`new_value` aggregate, country lists, and the settings that set the plan."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.apps.detectors import make_pipeline
from engine.apps.settings import ConfigError, load_settings
from engine.core.events import CallEvent, CallState
from engine.core.yamlfile import YamlFileError
from engine.detect.calls import Call
from engine.detect.fields import FIELDS, entity_field
from engine.detect.numbers import (
    DESTINATIONS,
    NO_NUMBER,
    NOT_JUDGED,
    Destinations,
    NumberPlan,
)
from engine.detect.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
T0 = 1_790_000_000.0


@pytest.fixture
def default_plan() -> Iterator[None]:
    """The process's plan as a process starts, and again afterwards."""
    DESTINATIONS.use(NumberPlan())
    yield
    DESTINATIONS.use(NumberPlan())


@pytest.mark.parametrize(
    ("number", "country", "kind", "valid"),
    [
        ("+442079460000", "GB", "fixed_line", True),
        ("0044 20 7946 0000", "GB", "fixed_line", True),
        ("+18762345678", "JM", "mobile", True),
        ("+88213000001", "001", "voip", True),
        ("+979123456789", "001", "premium_rate", True),
        # Too short for London's plan; a country code no plan has.
        ("+4420794600", "GB", "unknown", False),
        ("+99912345678", "", "unknown", False),
    ],
)
def test_international_numbers_are_read_without_a_region(
    number: str, country: str, kind: str, valid: bool
) -> None:
    found = Destinations(NumberPlan()).of(number)
    assert (found.country, found.kind, found.valid) == (country, kind, valid)


def test_national_forms_are_judged_only_in_the_default_region() -> None:
    assert Destinations(NumberPlan()).of("13800000001") is NOT_JUDGED
    china = Destinations(NumberPlan(default_region="CN"))
    assert china.of("13800000001").country == "CN"
    assert china.of("13800000001").kind == "mobile"
    # The country code written without "+" (how the switch shows callers) is read too.
    assert china.of("8613800000001").country == "CN"
    assert china.of("4008001000").kind == "shared_cost"
    assert china.of("4008001000").valid is True


def test_carrier_prefixes_are_stripped_before_the_international_prefix() -> None:
    # A PBX's outside-line digit before the number dialled (China's own IP-call
    # prefixes, such as 17951, phonenumbers strips by itself in region CN).
    plain = Destinations(NumberPlan(default_region="CN"))
    trunk = Destinations(NumberPlan(dial_prefixes=("9",), default_region="CN"))
    number = "900442079460000"
    assert trunk.of(number).country == "GB"
    assert plain.of(number).country != "GB"
    # The longest matching prefix goes, once; a number that is only a prefix stays.
    longest = Destinations(NumberPlan(dial_prefixes=("1", "17951")))
    assert longest.of("17951+442079460000").country == "GB"
    assert Destinations(NumberPlan(dial_prefixes=("00",))).of("00").kind == "unknown"


@pytest.mark.parametrize("text", ["", "   ", "anonymous", "+", "x" * 500, "\x00+1"])
def test_text_that_is_no_number_is_never_valid_and_never_raises(text: str) -> None:
    found = Destinations(NumberPlan(default_region="GB")).of(text)
    assert found.valid is not True
    assert found.country == ""
    assert (found is NO_NUMBER) == (text.strip() == "")


def test_the_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    book = Destinations(NumberPlan(), cache_size=3)
    numbers = [f"+4420794600{n:02d}" for n in range(5)]
    for number in numbers:
        book.of(number)
    assert list(book.cache) == numbers[2:]
    # A number too long for any plan is not kept at all.
    book.of("+" + "1" * 100)
    assert len(book.cache) == 3
    # Another plan forgets what the last one found.
    book.use(NumberPlan(default_region="CN"))
    assert not book.cache


@pytest.mark.parametrize(
    "plan",
    [
        {"default_region": "cn"},
        {"default_region": "XX"},
        {"dial_prefixes": ("9a",)},
        {"international_prefixes": ("",)},
    ],
)
def test_a_plan_that_makes_no_sense_is_refused(plan: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NumberPlan(**plan)  # type: ignore[arg-type]


def _call(caller: str, callee: str, forward: str = "") -> Call:
    return Call("c1", caller, callee, forward, "1", "Main", T0)


def test_the_destination_fields_read_the_numbers_of_a_call(default_plan: None) -> None:
    call = _call("+8613800000001", "+442079460000", "+4420794600")
    read = {name: FIELDS[name].read(call) for name in FIELDS if "_" in name}
    assert read["caller_country"] == "CN"
    assert read["callee_country"] == "GB" and read["callee_type"] == "fixed_line"
    assert read["callee_valid"] is True
    assert read["forward_country"] == "GB" and read["forward_valid"] is False
    assert entity_field(("caller", "callee_country")).text(call) == "+8613800000001/GB"
    # No forward number: no country, no type, nothing judged.
    empty = _call("+8613800000001", "+442079460000")
    assert FIELDS["forward_country"].read(empty) == ""
    assert FIELDS["forward_type"].read(empty) == ""
    assert FIELDS["forward_valid"].read(empty) is None


def test_a_number_is_abroad_when_its_region_is_known_and_not_the_sites(
    default_plan: None,
) -> None:
    call = _call("+8613800000001", "4008001000", "+37163123456")
    # No site region: nothing is judged abroad, not even a number in international form
    # (the site's own numbers written so would all be).
    for field in ("forward_abroad", "caller_abroad", "callee_abroad"):
        assert FIELDS[field].read(call) is None, field
    DESTINATIONS.use(NumberPlan(default_region="CN"))
    assert FIELDS["forward_abroad"].read(_call("+8613800000001", "4008001000")) is None
    assert FIELDS["caller_abroad"].read(call) is False, "the site's own region"
    assert FIELDS["callee_abroad"].read(call) is False, "national: the site's region"
    assert FIELDS["forward_abroad"].read(call) is True


def test_the_settings_plan_is_the_one_detection_reads(tmp_path: Path, default_plan: None) -> None:
    config = tmp_path / "callsentry.toml"
    config.write_text(
        '[detection]\ndefault_region = "CN"\ndial_prefixes = ["17951"]\nnumber_cache_size = 5000\n'
    )
    settings = load_settings(config, environ={})
    call = _call("8613800000001", "4008001000", "17951004420794600")
    assert FIELDS["callee_valid"].read(call) is None, "national: not judged without a region"
    make_pipeline(settings.detection)
    assert DESTINATIONS.plan == NumberPlan(("17951",), ("00",), "CN")
    assert DESTINATIONS.cache_size == 5000
    assert FIELDS["callee_valid"].read(call) is True
    assert FIELDS["callee_country"].read(call) == "CN"
    assert FIELDS["forward_country"].read(call) == "GB"
    assert FIELDS["forward_valid"].read(call) is False


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[detection]\ndefault_region = 'Cn'", "'Cn' is not a region"),
        ("[detection]\ndial_prefixes = ['17951', '']", "is no dial prefix"),
        ("[detection]\ninternational_prefixes = ['+']", "is no dial prefix"),
    ],
)
def test_bad_number_settings_are_refused_naming_the_setting(
    tmp_path: Path, text: str, problem: str
) -> None:
    config = tmp_path / "callsentry.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, environ={})
    assert problem in str(error.value)
    assert "detection." in str(error.value)


def _rules_with_list(tmp_path: Path, list_text: str) -> Path:
    rules = tmp_path / "rules"
    (rules / "lists").mkdir(parents=True)
    (rules / "high-risk-country-forward.yaml").write_bytes(
        (RULES / "high-risk-country-forward.yaml").read_bytes()
    )
    (rules / "lists" / "high_risk_countries.yaml").write_text(list_text)
    return rules


def test_a_country_list_names_each_bad_code_with_its_line(tmp_path: Path) -> None:
    rules = _rules_with_list(
        tmp_path,
        "name: high_risk_countries\n"
        "kind: country\n"
        "entries:\n"
        "  - {value: CU, source: a}\n"
        "  - {value: cu, source: b}\n"
        "  - {value: XX, source: c}\n"
        "  - {value: GB}\n",
    )
    with pytest.raises(YamlFileError) as error:
        load_rules(rules)
    listed = str(rules / "lists" / "high_risk_countries.yaml")
    problems = error.value.problems
    assert any(p.startswith(f"{listed}:7:") and "source" in p for p in problems), problems
    # The codes are checked once the list's shape is valid: fixed, only they are left.
    fixed = _rules_with_list(
        tmp_path / "again",
        "name: high_risk_countries\nkind: country\nentries:\n"
        "  - {value: CU, source: a}\n  - {value: cu, source: b}\n  - {value: XX, source: c}\n",
    )
    with pytest.raises(YamlFileError) as error:
        load_rules(fixed)
    listed = str(fixed / "lists" / "high_risk_countries.yaml")
    assert [p.split(": ")[0] for p in error.value.problems] == [f"{listed}:5", f"{listed}:6"]
    assert "'cu' is no region" in error.value.problems[0]


def test_the_shipped_country_list_gives_every_entry_a_source() -> None:
    loaded = load_rules(RULES)
    countries = loaded.rules.lists["high_risk_countries"]
    assert {"DO", "JM", "001"} <= countries
    specs = [spec for spec, document in loaded.specs]
    assert any(spec.id == "high-risk-country-forward" for spec in specs)


def _events(caller: str, callee: str, at: float, n: int) -> list[CallEvent]:
    call_id = f"{caller}-{n}"
    return [
        CallEvent(at, call_id, 1, CallState.RINGING, 180, caller, callee, "", "1", "Main", ""),
        CallEvent(at + 3, call_id, 2, CallState.ANSWERED, 200, caller, callee, "", "1", "M", ""),
        CallEvent(at + 60, call_id, 3, CallState.HANGUP, None, caller, callee, "", "1", "Main", ""),
    ]


def test_a_known_caller_reaching_a_new_country_is_one_alert_and_survives_a_snapshot(
    default_plan: None,
) -> None:
    from engine.core.positions import Position
    from engine.detect.calls import CallTracker
    from engine.detect.pipeline import Pipeline
    from engine.detect.snapshot import decode, encode
    from engine.detect.state import Snapshot

    def run(pipeline: Pipeline, events: list[CallEvent]) -> list[str]:
        found = [alert.entity for alert in pipeline.feed(events).alerts]
        return found + [alert.entity for alert in pipeline.advance(events[-1].ts + 600).alerts]

    def fresh() -> Pipeline:
        return Pipeline(load_rules(RULES / "new-country-caller.yaml").rules, CallTracker())

    caller = "+8613900000001"
    history = [e for n in range(8) for e in _events(caller, "+442079460000", T0 + n * 600, n)]
    new_country = _events(caller, "+4930123456", T0 + 3 * 3600, 99)
    again = _events(caller, "+4930123456", T0 + 3 * 3600 + 700, 100)
    pipeline = fresh()
    assert run(pipeline, history) == []
    payload = encode(Snapshot(Position(0, 0), pipeline.state(), 0.0))
    restored = fresh()
    assert restored.restore(decode(payload).state) == ["new-country-caller"]
    assert run(restored, new_country + again) == [caller]
    # Without the history the caller is new itself: its first countries are not news.
    assert run(fresh(), new_country + again) == []
