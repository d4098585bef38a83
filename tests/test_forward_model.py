"""The forward-ramp model (models/forward.py): ramps caught while they grow, from the
first minute too; steady and common-mode growth left alone; the same findings however
event time is advanced or the stream is cut by a snapshot; bounded state per number."""

from __future__ import annotations

import math
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.apps.replay import replay
from engine.core.positions import Position
from engine.core.yamlfile import YamlFileError
from engine.detect.calls import Call
from engine.detect.rules import load_rules
from engine.detect.snapshot import decode, encode
from engine.detect.state import Snapshot
from engine.simulator.scenario import generate, load_scenario, write_files
from models import state_types  # noqa: F401  (how models are written in snapshots)
from models.base import ModelFinding
from models.catalogue import load_model_specs
from models.forward import ForwardModel
from models.registry import ModelSet
from models.spec import ModelSpec
from tests.conftest import make_settings

RULES = Path("rules")
T0 = 1_793_955_600.0  # 2026-11-05 10:00 UTC, a whole hour
HOUR = 3600.0


def shipped_spec() -> ModelSpec:
    problems: list[str] = []
    specs = [s for s, _ in load_model_specs(RULES / "models", problems) if s.kind == "forward"]
    assert not problems and len(specs) == 1
    return specs[0]


Rate = Callable[[float], float]  # calls an hour at a time from T0


def calls_at(
    rng: random.Random, rate: Rate, start: float, end: float, forward: str, menu: str = "4"
) -> list[Call]:
    """Answered calls at `rate` (Poisson, by thinning), each talking 1-8 minutes and
    finished (its deadline) when it ends."""
    peak = max(rate(t) for t in range(int(start), int(end), 60)) / HOUR
    calls, t = [], start
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= end:
            break
        if rng.random() * peak * HOUR > rate(t):
            continue
        talk = rng.uniform(60.0, 480.0)
        calls.append(
            Call(
                call_id=f"{forward or menu}-{len(calls)}",
                caller=f"86138{rng.randrange(10**6):06d}",
                callee="4008001000",
                forward=forward,
                menu_id=menu,
                menu_name="Customer service",
                started_at=T0 + t,
                answered_at=T0 + t + 3.0,
                ended_at=T0 + t + 3.0 + talk,
                outcome="answered",
                deadline=T0 + t + 9.0 + talk,
            )
        )
    return calls


def feed(
    model: ForwardModel | ModelSet, calls: list[Call], ticks: list[float]
) -> list[ModelFinding]:
    """Calls in the order they finish, event time advanced at each of `ticks` (and at
    the end), as the pipeline does: finished calls first, then the step."""
    calls = sorted(calls, key=lambda c: c.deadline)
    findings: list[ModelFinding] = []
    i = 0
    for tick in [*sorted(ticks), calls[-1].deadline + 60.0]:
        while i < len(calls) and calls[i].deadline <= tick:
            if isinstance(model, ModelSet):
                findings.extend(model.observe((calls[i],), lambda kind, entity: []))
            else:
                found = model.observe(calls[i], lambda kind, entity: [])
                assert found is None, "findings come at the ends of steps"
            i += 1
        findings.extend(model.advance(tick))
    return findings


def every(seconds: float, hours: float) -> list[float]:
    return [T0 + k * seconds for k in range(int(hours * HOUR / seconds) + 1)]


def steady(per_hour: float) -> Rate:
    return lambda t: per_hour


def ramp(start_s: float, over_s: float, low: float, high: float) -> Rate:
    def rate(t: float) -> float:
        if t < start_s:
            return low
        return low + (high - low) * min(1.0, (t - start_s) / over_s)

    return rate


def menu_traffic(rng: random.Random, hours: float, factor: Rate | None = None) -> list[Call]:
    """A menu's usual traffic: three call-centre numbers and calls forwarded nowhere."""
    factor = factor or steady(1.0)
    calls = calls_at(rng, lambda t: 60.0 * factor(t), 0, hours * HOUR, "", "4")
    for n in range(3):
        calls += calls_at(rng, lambda t: 50.0 * factor(t), 0, hours * HOUR, f"400800500{n}")
    return calls


def found_for(findings: list[ModelFinding], forward: str) -> list[float]:
    return [(f.raised_at - T0) / 60 for f in findings if f.entity == forward]


# -- what it catches, what it leaves alone --------------------------------------------


def test_a_ramp_after_a_quiet_history_is_caught_while_it_grows() -> None:
    rng = random.Random(7)
    # One call per 20 minutes for two hours, then up to three a minute over an hour.
    rate = ramp(2 * HOUR, HOUR, 3.0, 180.0)
    calls = menu_traffic(rng, 4) + calls_at(rng, rate, 0, 4 * HOUR, "+37167000001")
    findings = feed(ForwardModel(shipped_spec(), "v"), calls, every(30, 4))
    raised = found_for(findings, "+37167000001")
    assert raised and 120 < raised[0] < 180, raised
    assert all(f.entity == "+37167000001" for f in findings), [f.summary for f in findings]
    assert "ramps up" in findings[0].summary and findings[0].evidence


def test_a_ramp_from_minute_zero_with_no_history_is_caught_in_most_runs() -> None:
    """With no history the first calls come when the ramp is busy already: they are
    its usual, and the ramp must grow well beyond them (bench/README.md, "Forward
    ramps": how often, and how late, over the ranges)."""
    caught = []
    for seed in range(6):
        rng = random.Random(seed)
        rate = ramp(0.0, 1.5 * HOUR, 3.0, 240.0)
        calls = menu_traffic(rng, 4) + calls_at(rng, rate, 0, 4 * HOUR, "+37167000001")
        findings = feed(ForwardModel(shipped_spec(), "v"), calls, every(30, 4))
        assert {f.entity for f in findings} <= {"+37167000001"}
        raised = found_for(findings, "+37167000001")
        caught.append(bool(raised) and raised[0] < 90)
    assert sum(caught) >= 4, caught


def test_a_call_centre_number_busy_from_its_first_minute_stays_quiet() -> None:
    rng = random.Random(11)
    calls = menu_traffic(rng, 5) + calls_at(rng, steady(240.0), 0, 5 * HOUR, "4008005009")
    assert feed(ForwardModel(shipped_spec(), "v"), calls, every(30, 5)) == []


def test_a_campaign_that_lifts_a_whole_menu_is_not_a_ramp() -> None:
    rng = random.Random(13)
    # The menu's traffic (its numbers and its calls forwarded nowhere) triples over
    # half an hour at hour 2, and stays so for an hour.
    lift = ramp(2 * HOUR, 1800.0, 1.0, 3.0)
    campaign: Rate = lambda t: lift(t) if t < 3.5 * HOUR else 1.0  # noqa: E731
    calls = menu_traffic(rng, 5, campaign)
    assert feed(ForwardModel(shipped_spec(), "v"), calls, every(30, 5)) == []


def test_a_number_judged_against_its_own_start_not_the_time_before_it() -> None:
    """A number that appears at hour 1 at a steady rate is not a rise from nothing."""
    rng = random.Random(17)
    calls = menu_traffic(rng, 4) + calls_at(rng, steady(120.0), HOUR, 4 * HOUR, "4008005010")
    assert feed(ForwardModel(shipped_spec(), "v"), calls, every(30, 4)) == []


# -- event time: replay equals live ---------------------------------------------------


def ramp_day(seed: int) -> list[Call]:
    rng = random.Random(seed)
    return menu_traffic(rng, 4) + calls_at(
        rng, ramp(HOUR, HOUR, 3.0, 180.0), 0, 4 * HOUR, "+37167000002"
    )


def keys(findings: list[ModelFinding]) -> list[tuple[str, float, float, str]]:
    return [(f.entity, f.raised_at, f.value, f.summary) for f in findings]


def test_findings_do_not_depend_on_how_often_event_time_moves() -> None:
    calls = ramp_day(19)
    spec = shipped_spec()
    rng = random.Random(3)
    ragged = sorted(T0 + rng.uniform(0, 4 * HOUR) for _ in range(300))
    runs = [
        feed(ForwardModel(spec, "v"), calls, ticks)
        for ticks in (every(1, 4), every(45, 4), every(600, 4), ragged, [])
    ]
    assert runs[0], "the comparison covers a finding"
    for run in runs[1:]:
        assert keys(run) == keys(runs[0])


def test_a_snapshot_mid_ramp_carries_on_as_one_run() -> None:
    calls = sorted(ramp_day(19), key=lambda c: c.deadline)
    spec = shipped_spec()
    whole = feed(ModelSet([ForwardModel(spec, "v")]), calls, every(30, 4))
    assert whole
    cut = T0 + 1.25 * HOUR  # the ramp has begun, not yet been caught
    assert all(f.raised_at > cut for f in whole)
    first = [c for c in calls if c.deadline <= cut]
    models = ModelSet([ForwardModel(spec, "v")])
    before = feed(models, first, [t for t in every(30, 4) if t <= cut])
    saved = decode(encode(Snapshot(Position(1, 1), {"models": models.state()}, cut)))
    again = ModelSet([ForwardModel(spec, "v")])
    assert again.restore(saved.state["models"]) == [spec.id]
    after = feed(
        again, [c for c in calls if c.deadline > cut], [t for t in every(30, 4) if t > cut]
    )
    assert keys(before + after) == keys(whole)


def test_a_replay_split_differently_raises_the_same_ramp_alerts(tmp_path: Path) -> None:
    generated = generate(load_scenario(Path("data/scenarios/forward-ramps.yaml")))
    events, _ = write_files(generated, tmp_path / "events")
    runs = []
    for name, rows in (("whole", 1_000_000), ("parts", 997)):
        settings = make_settings(tmp_path / name, detection={"alerts_jsonl": "off"})
        result = replay([events], settings, part_rows=rows, detect_in_child=False)
        runs.append(sorted((a.rule_id, a.entity, a.raised_at) for a in result.alerts))
    ramps = {a[1] for a in runs[0] if a[0] == "model.forward-ramp"}
    assert ramps, "the comparison covers the ramp model's alerts"
    assert ramps <= {label.entity for label in generated.labels if label.must_alert}
    assert runs[0] == runs[1]


# -- bounded state --------------------------------------------------------------------


def test_state_per_tracked_number_is_small_and_bounded() -> None:
    spec = shipped_spec().model_copy(update={"max_numbers": 2000})
    model = ForwardModel(spec, "v")
    rng = random.Random(29)
    calls = []
    for n in range(3000):
        at = rng.uniform(0, 600)
        calls.append(
            Call(
                f"c{n}",
                "86138",
                "400",
                f"+3716{n:07d}",
                "4",
                "m",
                T0 + at,
                answered_at=T0 + at,
                ended_at=T0 + at + 60,
                outcome="answered",
                deadline=T0 + at + 66,
            )
        )
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    feed(model, calls, every(60, 0.5))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(model.numbers) == 2000 and model.dropped == 1000
    per_number = grown / len(model.numbers)
    assert per_number < 4096, per_number  # bench/README.md: "Forward ramps"
    assert model.drop_idle(T0 + 0.5 * HOUR + spec.forget_after + 120) == 2000
    assert not model.numbers and not model.counting and not model.menu_numbers


# -- the model file ---------------------------------------------------------------------


def test_a_forward_model_file_is_checked_with_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    (folder / "models").mkdir(parents=True)
    text = (RULES / "models" / "forward-ramp.yaml").read_text(encoding="utf-8")
    bad = text.replace("  slow: 2h", "  slow: 1m").replace("  min_growth: 1.5", "  min_growth: 0.5")
    (folder / "models" / "forward-ramp.yaml").write_text(bad + "surprise: 1\n", encoding="utf-8")
    (folder / "r.yaml").write_text((RULES / "forward-spike.yaml").read_text(), encoding="utf-8")
    from engine.apps.detectors import load_detectors

    with pytest.raises(YamlFileError) as raised:
        load_detectors(folder, 1000, models=True)
    problems = "\n".join(raised.value.problems)
    assert "forward-ramp.yaml:" in problems
    assert "min_growth" in problems and "surprise" in problems
    assert load_rules(RULES).rules, "the shipped files load"


def test_the_forward_model_gate_reads_the_calls_forward_number() -> None:
    spec = shipped_spec()
    models = ModelSet([ForwardModel(spec, "v")])
    calls = ramp_day(31)
    feed(models, calls, every(30, 4))
    gate = models.gate(spec.id, 0.99)
    ramped = next(c for c in calls if c.forward == "+37167000002")
    steady_call = next(c for c in calls if c.forward == "4008005000")
    model = models.models[0]
    assert isinstance(model, ForwardModel)
    bound = model.quantile(0.99)
    assert bound is not None and not math.isnan(bound)
    assert gate(steady_call) is False
    assert gate(ramped) == ((model.score("+37167000002") or 0.0) >= bound)
