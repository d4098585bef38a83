"""Callers' conduct (engine.detect.conduct) and rules' `behaviour:` conditions: what a
caller's calls look like judged against its peers and its own usual, not only how many."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.events import CallEvent
from engine.core.positions import Position
from engine.core.yamlfile import YamlFileError
from engine.detect import snapshot
from engine.detect.calls import Call, CallTracker
from engine.detect.conduct import (
    ANSWERED,
    CALLS,
    CONDUCT_KEPT,
    OWN_AFTER,
    RATE,
    SHORT,
    Conduct,
    ConductLedger,
)
from engine.detect.pipeline import Pipeline
from engine.detect.rules import RuleSet, load_rules
from engine.detect.ruletest import expand
from engine.detect.schema import TestCalls as Series
from engine.detect.state import Snapshot

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"


def finished(
    caller: str, ts: float, *, answered: bool, ring: float = 3.0, talk: float = 60.0
) -> Call:
    call = Call(f"{caller}-{ts}", caller, "4008001000", "", "1", "Main menu", ts)
    call.ringing_at = ts
    if answered:
        call.answered_at = ts + ring
        call.ended_at = ts + ring + talk
    else:
        call.ended_at = ts + ring
    call.outcome = "answered" if answered else "unanswered"
    call.deadline = call.ended_at + 6.0
    return call


def test_a_callers_first_call_sets_its_means_and_later_calls_move_them() -> None:
    conduct = Conduct()
    conduct.start(95.0)
    conduct.learn(False, 2.0, -1.0, 100.0)
    assert (conduct.recent(ANSWERED), conduct.has(SHORT), conduct.has(RATE)) == (0.0, False, False)
    conduct.start(105.0)
    conduct.learn(True, 4.0, 2.0, 110.0)
    assert conduct.recent(ANSWERED) == pytest.approx(0.2)
    assert conduct.recent(SHORT) == 1.0  # its first answered call was short
    assert conduct.recent(RATE) == pytest.approx(6.0)  # ten seconds apart: six a minute
    assert conduct.recent(CALLS) == 2.0


def test_an_answered_call_of_unknown_length_moves_no_short_share() -> None:
    conduct = Conduct()
    conduct.learn(True, 3.0, -1.0, 100.0)
    assert conduct.answered == 1.0 and not conduct.has(SHORT)


def test_peers_say_nothing_until_enough_calls_are_seen() -> None:
    ledger = ConductLedger(100)
    for n in range(10):
        ledger.observe(finished(f"86138{n:06d}", 100.0 + n, answered=True))
    assert ledger.peers.typical(ANSWERED) is None
    for n in range(10, 200):
        ledger.observe(finished(f"86138{n:06d}", 100.0 + n, answered=n % 10 != 0))
    assert ledger.peers.typical(ANSWERED) == pytest.approx(0.9, abs=0.01)
    assert ledger.peers.typical(2) == pytest.approx(3.0)  # the median ring time


def test_a_steady_caller_is_judged_by_its_own_usual_once_it_has_a_history() -> None:
    ledger = ConductLedger(100)
    for n in range(3000):  # callers at large: 4 % short
        ledger.observe(
            finished(f"86138{n:06d}", float(n), answered=True, talk=2.0 if n % 25 == 0 else 60.0)
        )
    robot = "8602100000001"
    for n in range(OWN_AFTER - 1):  # an automated line: every call short
        ledger.observe(finished(robot, 4000.0 + n, answered=True, talk=2.0))
    conduct = ledger.of(robot)
    assert conduct is not None
    # Still new: its peers' (its own calls among them, so a little above their 4 %).
    assert 0.04 < (ledger.usual(conduct, SHORT) or 0.0) < 0.1
    ledger.observe(finished(robot, 5000.0, answered=True, talk=2.0))
    assert ledger.usual(conduct, SHORT) == pytest.approx(1.0)  # its own


def _rule_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "lists").symlink_to(RULES / "lists")
    (folder / "r.yaml").write_text(text, encoding="utf-8")
    return folder


RULE = """\
id: r
title: t
severity: high
on: call
aggregate: {type: count, group_by: caller, window: 10m}
condition: {op: ">=", threshold: 3}
"""


@pytest.mark.parametrize(
    ("behaviour", "said"),
    [
        ("behaviour: {min_calls: 2}", "behaviour names no measure"),
        ("behaviour: {answered_share: {}}", "a behaviour bound needs one of"),
        ("behaviour: {answered: {lt: 0.2}}", "behaviour.answered"),
        ("behaviour: {answered_share: {below_peers: 0}}", "below_peers"),
        ("behaviour: {calls: {below_peers: 0.5}}", "calls is bounded by lt or gt only"),
        ("behaviour: {answered_share: {lt: .nan}}", "answered_share.lt"),
    ],
)
def test_a_bad_behaviour_is_refused_with_its_file_and_line(
    tmp_path: Path, behaviour: str, said: str
) -> None:
    folder = _rule_folder(tmp_path, RULE + behaviour + "\n")
    with pytest.raises(YamlFileError) as error:
        load_rules(folder)
    [problem] = error.value.problems
    assert problem.startswith(f"{folder / 'r.yaml'}:7"), problem
    assert said in problem


def test_behaviour_is_judged_per_caller_only(tmp_path: Path) -> None:
    text = RULE.replace("group_by: caller", "group_by: menu")
    folder = _rule_folder(tmp_path, text + "behaviour: {answered_share: {lt: 0.2}}\n")
    with pytest.raises(YamlFileError, match="behaviour is judged per caller"):
        load_rules(folder)


def test_rules_validate_names_the_file_and_line_of_a_bad_behaviour(tmp_path: Path) -> None:
    folder = _rule_folder(tmp_path, RULE + "behaviour: {answered_share: {above_usual: -1}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "rules", "validate", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert f"{folder / 'r.yaml'}:7" in done.stderr and "Traceback" not in done.stderr


def _events(series: list[Series]) -> list[CallEvent]:
    events = [event for index, s in enumerate(series) for event in expand(s, "t", index)]
    return sorted(events, key=lambda e: (e.ts, e.call_id, e.serial))


def _wangiri_among_a_pbx_and_callers() -> list[CallEvent]:
    return _events(
        [
            Series(caller="8613800000002", repeat=600, every=2.0, talk=40.0),
            # A PBX: many distinct callees, a normal answer rate.
            Series(
                caller="8602112345678",
                callee="8613700000000",
                callee_step=3,
                repeat=200,
                every=6.0,
                talk=90.0,
            ),
            Series(
                caller="8602112345678",
                callee="8613600000000",
                callee_step=11,
                repeat=25,
                every=48.0,
                ring=25.0,
                answered=False,
                at=4.0,
            ),
            # Wangiri from a caller first seen at minute 10.
            Series(
                caller="882160000001",
                callee="8613500000000",
                callee_step=7,
                repeat=20,
                every=20.0,
                ring=2.0,
                answered=False,
                at=600.0,
            ),
        ]
    )


def _run(pipeline: Pipeline, events: list[CallEvent]) -> list[tuple[str, str, float]]:
    output = pipeline.feed(events)
    output.extend(pipeline.advance(events[-1].ts + 7200))
    return sorted((a.rule_id, a.entity, a.raised_at) for a in output.alerts)


def _caller_rules() -> RuleSet:
    rules = load_rules(RULES).rules
    keep = {"fanout-callee-caller", "ringing-without-ok-caller", "short-calls-caller"}
    return RuleSet([r for r in rules.rules if r.id in keep], rules.lists)


def test_a_pbx_is_quiet_and_a_wangiri_caller_first_seen_is_caught() -> None:
    alerts = _run(Pipeline(_caller_rules(), CallTracker()), _wangiri_among_a_pbx_and_callers())
    assert {entity for _, entity, _ in alerts} == {"882160000001"}
    assert {rule for rule, _, _ in alerts} == {"fanout-callee-caller", "ringing-without-ok-caller"}


def test_conduct_is_restored_from_a_snapshot_and_gives_the_same_alerts(tmp_path: Path) -> None:
    events = _wangiri_among_a_pbx_and_callers()
    whole = _run(Pipeline(_caller_rules(), CallTracker()), events)
    first = Pipeline(_caller_rules(), CallTracker())
    cut = len(events) * 2 // 3  # within the Wangiri run
    alerts = [(a.rule_id, a.entity, a.raised_at) for a in first.feed(events[:cut]).alerts]
    path = tmp_path / "detection.snapshot"
    snapshot.save(path, Snapshot(Position(1, cut), first.state(), 0.0))
    loaded = snapshot.load(path)
    assert loaded is not None
    second = Pipeline(_caller_rules(), CallTracker())
    assert CONDUCT_KEPT in second.restore(loaded.state)
    assert second.rules.conduct is not None and len(second.rules.conduct) == 3
    # What the restore says it held counts rules and models; the conduct is neither.
    third = Pipeline(_caller_rules(), CallTracker())
    assert snapshot.restore_into(third, path) == (Position(1, cut), len(third.rules.rules))
    assert len(third.rules.models) == 0 and third.rules.conduct is not None
    alerts += _run(second, events[cut:])
    assert sorted(alerts) == whole


def test_a_snapshot_from_before_conduct_loads_and_conduct_starts_cold() -> None:
    events = _wangiri_among_a_pbx_and_callers()[:2000]
    old = Pipeline(_caller_rules(), CallTracker())
    old.feed(events)
    state = old.state()
    del state["conduct"]  # what a v4 snapshot of the release before holds
    decoded = snapshot.decode(snapshot.encode(Snapshot(Position(1, 1), state, 0.0)))
    fresh = Pipeline(_caller_rules(), CallTracker())
    restored = fresh.restore(decoded.state)
    assert CONDUCT_KEPT not in restored and "fanout-callee-caller" in restored
    assert fresh.rules.conduct is not None and len(fresh.rules.conduct) == 0


def test_a_rule_reload_keeps_the_callers_conduct() -> None:
    pipeline = Pipeline(_caller_rules(), CallTracker())
    pipeline.feed(_wangiri_among_a_pbx_and_callers()[:3000])
    before = pipeline.rules.conduct
    assert before is not None and len(before) > 0
    kept = pipeline.swap_rules(_caller_rules())
    assert CONDUCT_KEPT in kept
    after = pipeline.rules.conduct
    assert after is not None and after is not before and len(after) == len(before)


def test_rules_without_behaviour_keep_no_conduct() -> None:
    rules = load_rules(RULES / "sequential-dialling.yaml").rules
    assert rules.conduct is None


def test_a_callers_answered_calls_in_progress_count_as_answered(tmp_path: Path) -> None:
    """Unanswered calls end within seconds and answered ones minutes later: a caller
    first seen whose three answered calls are still going on is not judged by its
    unanswered calls alone (the calls in progress are the pipeline's tracker's, after a
    rule reload and a restore too)."""
    events = _events(
        [
            Series(caller="8613800000002", repeat=600, every=2.0, talk=40.0),
            Series(caller="8613800000003", repeat=3, every=20.0, talk=900.0, at=60.0),
            Series(
                caller="8613800000003",
                callee="8613600000000",
                callee_step=1,
                repeat=8,
                every=30.0,
                ring=12.0,
                answered=False,
                at=90.0,
            ),
        ]
    )
    pipeline = Pipeline(_caller_rules(), CallTracker())
    assert _run(pipeline, events) == []
    # With none of its answered calls in progress the same unanswered ones alert.
    unanswered_only = [e for e in events if not e.call_id.startswith("test-t-1-")]
    assert len(unanswered_only) < len(events)
    alerts = _run(Pipeline(_caller_rules(), CallTracker()), unanswered_only)
    assert ("ringing-without-ok-caller", "8613800000003") in {(r, e) for r, e, _ in alerts}
    pipeline.swap_rules(_caller_rules())
    assert pipeline.rules.conduct is not None
    assert pipeline.rules.conduct.tracker is pipeline.tracker
    restored = Pipeline(_caller_rules(), CallTracker())
    restored.restore(pipeline.state())
    assert restored.rules.conduct is not None
    assert restored.rules.conduct.tracker is restored.tracker
