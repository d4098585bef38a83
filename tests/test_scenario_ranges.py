"""Scenario values drawn from ranges (engine.simulator.ranges), the variety files, and the
generators' new parameters (Zipf callers, day/night swing, spread bursts, ramps after a
quiet history, numbers of a country)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import phonenumbers
import pytest

from engine.core.events import CallState
from engine.core.yamlfile import YamlFileError
from engine.detect.numbers import Destinations, NumberPlan
from engine.simulator.destinations import random_number
from engine.simulator.incidents import FAMILIES
from engine.simulator.scenario import Scenario, generate, load_scenario
from engine.simulator.traffic import BenignSpec, daily_level, make_population, peak_and_night

VARIETY = sorted(Path("data/scenarios/variety").glob("*.yaml"))
RANGED = """\
name: small
seed: 3
duration: {between: [20m, 40m]}
benign:
  calls_per_hour: {between: [300, 900]}
  callers: {between: [200, 2000]}
  caller_zipf: {between: [0.5, 0.9]}
  swing: {between: [0.0, 0.4]}
incidents:
  - id: trunk
    family: busy_trunk
    repeat: {between: [1, 3]}
    every: {between: [5s, 60s]}
    over: 20m
  - id: wg
    family: wangiri
    at: {between: [0s, 10m]}
    calls: {between: [15, 80]}
    spacing: {between: [5s, 45s]}
    caller_country: {one_of: [LV, CU, SO]}
  - id: cb
    family: callback_abuse
    at: {between: [0s, 10m]}
    calls: {between: [10, 40]}
    spacing: {between: [3s, 10s]}
    callers: {between: [2, 20]}
    menu_id: {one_of: ["1", "3"]}
  - {id: cb1, family: callback_abuse, at: 5m, calls: 12, callers: 1}
  - id: sim
    family: simultaneous_calls
    at: {between: [0s, 10m]}
    calls: {between: [10, 25]}
    within: {between: [1m, 3m]}
  - id: ramp
    family: forward_ramp
    at: 0s
    history: {one_of: [0s, 5m]}
    rate_start_per_hour: {between: [2.0, 6.0]}
    rate_end_per_hour: {between: [60, 300]}
    over: {between: [10m, 15m]}
    forward_country: {one_of: [MV, LR, GN]}
  - {id: irsf, family: irsf, at: 1m, calls: 20, over: 10m, forward_country: {one_of: [LV, TN]}}
  - {id: scan, family: menu_scan, at: 2m, menu_id: {one_of: ["1", "3"]}, calls: {between: [60, 90]}}
  - {id: seq, family: sequential_dialling, at: 3m,
     calls: {between: [20, 30]}, step: {between: [1, 3]}}
  - {id: slow, family: low_and_slow, at: 0s, calls: {between: [3, 6]}, spacing: {between: [4m, 6m]}}
  - {id: campaign, family: marketing_campaign, at: 5m,
     calls_per_hour: {between: [300, 600]}, over: 5m}
  - {id: cc, family: call_centre_forward, at: 0s, forward: {one_of: ["4008005009", "4008005010"]}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_same_seed_gives_the_same_scenario_and_the_same_traffic(tmp_path: Path) -> None:
    path = write(tmp_path, RANGED)
    first, second = load_scenario(path), load_scenario(path)
    assert first == second and first.seed == 3
    assert generate(first).events == generate(second).events
    assert load_scenario(path, 8) == load_scenario(path, 8)


def test_different_seeds_draw_different_values_within_the_ranges(tmp_path: Path) -> None:
    path = write(tmp_path, RANGED)
    drawn = [load_scenario(path, seed) for seed in range(1, 21)]
    assert {s.seed for s in drawn} == set(range(1, 21))
    rates = {s.benign.calls_per_hour for s in drawn}
    zipfs = {s.benign.caller_zipf for s in drawn}
    assert len(rates) > 10 and len(zipfs) > 10
    assert all(300 <= r <= 900 and float(r).is_integer() for r in rates)
    assert all(z is not None and 0.5 <= z <= 0.9 for z in zipfs)
    # Each scenario's drawn `duration` parameter (event time, `between: [20m, 40m]`).
    assert all(1200 <= s.duration <= 2400 for s in drawn)
    trunks = [sum(i.family == "busy_trunk" for i in s.incidents) for s in drawn]
    assert set(trunks) == {1, 2, 3}, trunks
    for scenario in drawn:
        ids = [i.id for i in scenario.incidents]
        assert ids[: trunks[drawn.index(scenario)]] == [
            f"trunk-{n}" for n in range(1, trunks[drawn.index(scenario)] + 1)
        ]
        by_id = {i.id: i for i in scenario.incidents}
        wangiri = by_id["wg"]
        assert wangiri.family == "wangiri"
        assert 15 <= wangiri.calls_count <= 80 and 5 <= wangiri.spacing <= 45
        assert wangiri.caller_country in ("LV", "CU", "SO")
        burst = by_id["cb"]
        assert burst.family == "callback_abuse" and 2 <= burst.callers <= 20
        assert burst.entity_type == "menu" and burst.menu_id in ("1", "3")
        assert by_id["cb1"].entity_type == "caller"
    # Copies of one incident draw their own values.
    copies = [s for s, n in zip(drawn, trunks, strict=True) if n == 3]
    assert copies and any(
        len({i.every for i in s.incidents if i.family == "busy_trunk"}) == 3 for s in copies
    )


def test_a_range_added_to_one_incident_leaves_the_others_draws_alone(tmp_path: Path) -> None:
    before = load_scenario(write(tmp_path, RANGED), 5)
    after = load_scenario(
        write(tmp_path, RANGED.replace("at: 5m, calls: 12", "at: {between: [1m, 9m]}, calls: 12")),
        5,
    )
    assert [i for i in before.incidents if i.id != "cb1"] == [
        i for i in after.incidents if i.id != "cb1"
    ]


def test_every_family_names_the_entity_its_calls_carry(tmp_path: Path) -> None:
    book = Destinations(NumberPlan())
    path = write(tmp_path, RANGED)
    for seed in (1, 2, 3):
        scenario = load_scenario(path, seed)
        generated = generate(scenario)
        calls: dict[str, list] = {}
        for event in generated.events:
            calls.setdefault(event.call_id, []).append(event)
        incidents = {i.id: i for i in scenario.incidents}
        assert {label.family for label in generated.labels} == set(FAMILIES)
        for label in generated.labels:
            mine = [calls[c][0] for c in label.call_ids]
            assert mine, label.incident
            field = {"caller": "caller", "menu": "menu_id", "forward": "forward"}
            values = {getattr(e, field[label.entity_type]) for e in mine}
            assert values == {label.entity}, (label.incident, values)
            incident = incidents[label.incident]
            if label.incident == "cb":
                assert label.entity_type == "menu"
                assert len({e.caller for e in mine}) == incident.callers > 1
            if label.incident in ("ramp", "irsf"):
                found = book.of(label.entity)
                assert found.country == incident.forward_country and found.valid, label
            if label.incident == "wg":
                found = book.of(label.entity)
                assert found.country == incident.caller_country and found.valid, label
                assert all(e.state is CallState.RINGING for e in mine)
            if label.incident == "seq":
                callees = [int(e.callee) for e in sorted(mine, key=lambda e: e.ts)]
                assert callees == list(
                    range(callees[0], callees[0] + incident.step * len(mine), incident.step)
                )
            if label.incident == "ramp" and incident.history:
                # Time to detect counts from the ramp, after the quiet history.
                assert math.isclose(label.start, scenario.start.timestamp() + incident.history)
                assert min(e.ts for e in mine) >= scenario.start.timestamp()
            elif label.incident != "ramp":
                assert math.isclose(label.start, min(e.ts for e in mine), abs_tol=1e-3)


@pytest.mark.parametrize(
    ("value", "line", "expected"),
    [
        ("calls: {between: [80, 15]}", 5, "the low end is above the high end"),
        ("calls: {between: [15]}", 5, "between takes a list of two values"),
        ("calls: {between: [15, nope]}", 5, "'nope' is not a duration"),
        ("calls: {between: [15, 80], step: 2}", 5, "a range is {between"),
        ("calls: {one_of: []}", 5, "one_of takes a list of at least one value"),
        ("calls: {between: [1.5, 8.5]}", 5, "valid integer"),
        ("calls: {between: [-5, 8]}", 5, "greater than or equal to 1"),
        ("calls: {one_of: [10, {between: [1, 2]}]}", 5, "may not itself be a range"),
        ("calls: {one_of: [10, -3, 12, 14, 20]}", 5, "with every range at one_of's value 2"),
        ("repeat: {between: [1, 5000]}", 5, "repeat is a whole number from 0 to 1000"),
        ("repeat: two", 5, "repeat is a whole number"),
        ("at: {between: [1h, 3h]}", 1, "after the scenario's"),
        ("spacing: {between: [5s, [1]]}", 5, "is not a number or a duration"),
    ],
)
def test_a_bad_range_is_its_file_line_and_reason(
    tmp_path: Path, value: str, line: int, expected: str
) -> None:
    path = write(
        tmp_path,
        "name: bad\nduration: 2h\nincidents:\n  - id: a\n    "
        + value
        + "\n    family: callback_abuse\n",
    )
    with pytest.raises(YamlFileError) as caught:
        load_scenario(path)
    problems = caught.value.problems
    assert any(p.startswith(f"{path}:{line}:") and expected in p for p in problems), problems


def test_the_seed_is_no_range_and_a_benign_range_has_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: bad\nseed: {between: [1, 3]}\n")
    with pytest.raises(YamlFileError) as caught:
        load_scenario(path)
    assert caught.value.problems == [
        f"{path}:2: seed: seed is the draw's seed: a whole number, not a range"
    ]
    path = write(tmp_path, "name: bad\nbenign:\n  calls_per_hour: 10\n  swing: {between: [0, 1]}\n")
    with pytest.raises(YamlFileError) as caught:
        load_scenario(path)
    assert caught.value.problems[0].startswith(f"{path}:4: benign.swing: "), caught.value.problems
    assert "(with every range at its high end)" in caught.value.problems[0]


def test_a_copy_of_a_repeated_incident_reports_the_line_it_came_from(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: bad\nduration: 1h\nincidents:\n"
        "  - {id: ok, family: wangiri, repeat: 2}\n"
        "  - id: b\n    family: wangiri\n    calls: 0\n",
    )
    with pytest.raises(YamlFileError) as caught:
        load_scenario(path)
    assert caught.value.problems == [
        f"{path}:7: incidents.1.calls: Input should be greater than or equal to 1"
    ]


@pytest.mark.parametrize("path", VARIETY, ids=lambda p: p.stem)
def test_the_variety_files_draw_within_issue_25s_ranges(path: Path) -> None:
    for seed in range(1, 11):
        scenario = load_scenario(path, seed)
        benign = scenario.benign
        assert 3 * 3600 <= benign.calls_per_hour <= 12 * 3600
        assert benign.caller_zipf is not None and 0.5 <= benign.caller_zipf <= 0.9
        assert 20_000 <= benign.callers <= 100_000
        assert benign.swing is not None and benign.swing <= 0.4 and benign.trunks == 0
        families = [i.family for i in scenario.incidents]
        assert 1 <= families.count("busy_trunk") <= 5
        assert {"marketing_campaign", "call_centre_forward"} <= set(families)
        fraud = [i for i in scenario.incidents if i.must_alert]
        assert {i.family for i in fraud} >= {
            "wangiri",
            "callback_abuse",
            "simultaneous_calls",
            "forward_ramp",
            "irsf",
        }
        assert any(i.at <= 1800 for i in fraud), "incidents in the first 30 minutes"
        for incident in scenario.incidents:
            assert incident.at <= scenario.duration
            if incident.family == "busy_trunk":
                assert incident.at <= 60 and incident.every is not None
                assert 5 <= incident.every <= 60
            if incident.family == "wangiri":
                assert 15 <= incident.calls_count <= 80 and 5 <= incident.spacing <= 45
            if incident.family == "callback_abuse":
                assert 10 <= incident.calls_count <= 40 and 3 <= incident.spacing <= 10
                assert 1 <= incident.callers <= 20
            if incident.family == "simultaneous_calls":
                assert 10 <= incident.calls_count <= 25 and 60 <= incident.within <= 180
            if incident.family == "forward_ramp":
                assert 2 <= incident.rate_start_per_hour <= 6
                assert 60 <= incident.rate_end_per_hour <= 300
                assert 1800 <= incident.over <= 5400
                assert incident.at + incident.history <= 3 * 3600


def test_zipf_callers_weigh_one_over_rank_to_the_exponent() -> None:
    spec = BenignSpec(callers=1000, caller_zipf=0.7, trunks=0)
    population = make_population(spec, random.Random(1))
    weights = [population.cumulative[0]] + [
        b - a for a, b in zip(population.cumulative, population.cumulative[1:], strict=False)
    ]
    assert weights[0] == 1.0
    assert math.isclose(weights[9], 10**-0.7) and math.isclose(weights[999], 1000**-0.7)


def test_a_swing_keeps_the_days_mean_at_calls_per_hour() -> None:
    spec = BenignSpec(calls_per_hour=3600, swing=0.4)
    peak, night = peak_and_night(spec)
    mean = statistics_mean([peak * daily_level(t, night) for t in range(0, 86400, 60)])
    assert math.isclose(mean, 1.0, rel_tol=1e-6)
    assert math.isclose(peak, 1.4) and math.isclose(peak * night, 0.6)


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("region", ["LV", "CU", "MV", "DO", "JM", "GM", "TN"])
def test_numbers_of_a_country_are_valid_there_and_differ(region: str) -> None:
    rng = random.Random(region)
    numbers = {random_number(rng, region) for _ in range(5)}
    assert len(numbers) > 1
    for number in numbers:
        parsed = phonenumbers.parse(number)
        assert phonenumbers.is_valid_number(parsed)
        assert phonenumbers.region_code_for_number(parsed) == region


def test_old_scenario_files_load_as_they_did() -> None:
    scenario = load_scenario(Path("data/scenarios/fraud-mix.yaml"))
    assert isinstance(scenario, Scenario) and scenario.seed == 21
    assert scenario.benign.caller_zipf is None and scenario.benign.swing is None
    assert load_scenario(Path("data/scenarios/fraud-mix.yaml"), 4).seed == 4
