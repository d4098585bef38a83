"""Detection: windows at their edges, calls from out-of-order reports, bounded state,
rules and their errors, hot reload, and the scenario library caught as labelled."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.apps.detectors import load_detectors, make_pipeline
from engine.apps.replay import replay
from engine.core.events import CallEvent, CallState
from engine.core.yamlfile import YamlFileError
from engine.detect.calls import Call, CallTracker
from engine.detect.evaluate import (
    EQ,
    IN,
    CompiledRule,
    RuleGroup,
    Selector,
    compile_selection,
    selection_tests,
)
from engine.detect.fields import FIELDS
from engine.detect.numbers import DESTINATIONS
from engine.detect.pipeline import Pipeline
from engine.detect.rules import load_rules
from engine.detect.schema import Matcher, RuleSpec
from engine.detect.snapshotfile import snapshot_path
from engine.detect.windows import FOLD_AT, KEEP_EXACT, Entries, EwBaseline, Folded, ValueEntries
from engine.ingest.codec import Vos3000TextCodec
from engine.lake.writer import LakeWriter
from engine.simulator.scenario import generate, load_scenario, write_files
from engine.simulator.switch import SwitchSettings, SwitchStandIn
from tests.conftest import RunningEngine, make_settings, wait_for

RULES = Path("rules")


def report(
    ts: float, call_id: str, serial: int, state: CallState, caller: str = "100"
) -> CallEvent:
    return CallEvent(ts, call_id, serial, state, None, caller, "200", "", "7", "Main", "t")


# -- windows --------------------------------------------------------------------------


def test_window_holds_entries_newer_than_its_length() -> None:
    # window 30 s, evaluated at t=30:  0 is out (exactly 30 old), 10, 20, 30 are in
    # (a rule keeps the length and lets out what is that old: leave_until(t - 30))
    window = ValueEntries()
    for ts in (0.0, 10.0, 20.0, 30.0):
        window.add(ts, f"c{ts:.0f}", 1.0)
    window.leave_until(30.0 - 30.0)
    assert len(window) == 3 and window.live_call_ids() == ["c10", "c20", "c30"]
    assert window.total == 3.0
    window.leave_until(59.999 - 30.0)
    assert window.live_call_ids() == ["c30"]
    window.leave_until(60.0 - 30.0)
    assert len(window) == 0 and window.total == 0.0


def test_distinct_count_stays_right_as_the_window_grows_and_slides() -> None:
    # Small windows count afresh, large ones keep a count per value: both must agree
    # with counting by hand at every step.
    window = ValueEntries()
    added: list[tuple[float, str]] = []
    for n in range(300):
        ts, value = float(n), f"callee{(n * 7) % 23 if n < 150 else n % 3}"
        window.add(ts, f"c{n}", value)
        added.append((ts, value))
        window.leave_until(ts - 100.0)
        expected = len({v for t, v in added if t > ts - 100.0})
        assert window.distinct() == expected, n


def test_window_slides_rather_than_resetting_in_buckets() -> None:
    # 5 events at 50..54 and 5 at 61..65: a fixed 60 s bucket would split them; a 30 s
    # sliding window at 65 sees all ten.
    window = Entries()
    for ts in [50, 51, 52, 53, 54, 61, 62, 63, 64, 65]:
        window.add(float(ts), "c")
    window.leave_until(65.0 - 30.0)
    assert len(window) == 10


def _fold_when_full(window: Entries, bucket_s: float, keep_values: bool) -> None:
    # What a rule does after each call (CompiledRule.evaluate).
    if len(window.entries) - window.head >= 2 * FOLD_AT:
        window.fold(bucket_s, keep_values)


@pytest.mark.parametrize("rate", [5.0, 40.0, 400.0])
def test_a_busy_window_holds_a_bounded_number_of_entries_whatever_its_rate(
    rate: float,
) -> None:
    # A 300 s window of one menu, calls at `rate` per second for 20 minutes, then
    # quiet: beside a window kept call by call (the reference), the folded one holds
    # at most FOLD_AT calls one by one and 64 + 1 buckets, counts and sums what the
    # reference does, give or take the calls of one bucket (300 / 64 s) at its old
    # edge, never fewer, and names the same evidence (the newest 200 calls).
    window_s, bucket_s = 300.0, 300.0 / 64
    folded, exact = ValueEntries(), ValueEntries()
    live: deque[float] = deque()  # the times the reference holds
    step, n, ts = 1.0 / rate, 0, 0.0
    widest = 0
    while ts < 1200.0:
        n += 1
        ts = n * step
        short = n % 3 == 0
        folded.add(ts, f"c{n}", short)
        exact.add(ts, f"c{n}", short)
        live.append(ts)
        while live[0] <= ts - window_s:
            live.popleft()
        folded.leave_until(ts - window_s)
        exact.leave_until(ts - window_s)
        _fold_when_full(folded, bucket_s, False)
        if n % 97 == 0 or n < 5:
            assert len(exact) == len(live)
            one_bucket = int(rate * bucket_s) + 2
            assert len(live) <= len(folded) <= len(live) + one_bucket, n
            assert exact.hits <= folded.hits <= exact.hits + one_bucket
            assert folded.live_call_ids() == exact.live_call_ids()
            assert folded.last_time() == exact.last_time()
            assert (folded.start() or 0.0) <= (exact.start() or 0.0)
        widest = max(widest, len(folded.entries))
    # Pairs held one by one (up to FOLD_AT), those gone but not yet compacted away
    # (as many again at most) and the folded part: bounded whatever the rate.
    assert widest <= 4 * FOLD_AT + 1
    if rate * window_s >= FOLD_AT:
        assert folded.head & 1 and isinstance(folded.entries[0], Folded)
        assert len(folded.entries[0].buckets) <= 65
    # Quiet: everything leaves, folded part and all; the window is as if never folded.
    folded.leave_until(ts + 1.0)
    exact.leave_until(ts + 1.0)
    assert len(folded) == 0 == len(exact) and folded.hits == 0
    assert folded.head & 1 == 0 and folded.start() is None


def test_a_folded_distinct_count_sees_each_value_leave() -> None:
    # Distinct callees in a 100 s window of one caller at 50 calls/s, 40 values
    # repeating, then new ones only: counted by hand at every step, the folded window
    # agrees, give or take the values of one bucket at its old edge.
    window_s, bucket_s = 100.0, 100.0 / 64
    window = ValueEntries()
    added: list[tuple[float, str]] = []
    for n in range(1, 20_000):
        ts = n / 50.0
        value = f"callee{n % 40}" if n < 10_000 else f"new{n}"
        window.add(ts, f"c{n}", value)
        added.append((ts, value))
        window.leave_until(ts - window_s)
        _fold_when_full(window, bucket_s, True)
        if n % 101 == 0:
            expected = len({v for t, v in added if t > ts - window_s})
            edge = {v for t, v in added if ts - window_s - bucket_s < t <= ts - window_s}
            assert expected <= window.distinct() <= expected + len(edge), n
    assert window.head & 1, "never folded"
    assert len(window.values) <= 2 * FOLD_AT and len(window) >= KEEP_EXACT


def test_baseline_counts_quiet_buckets_as_zero() -> None:
    baseline = EwBaseline(60.0, alpha=0.5)
    for ts in (0, 1, 2, 3):
        baseline.observe(float(ts))
    baseline.roll(300.0)  # five buckets closed by t=300: 4, 0, 0, 0, 0
    assert baseline.buckets == 5
    assert baseline.mean == pytest.approx(0.25)  # 4 -> 2 -> 1 -> 0.5 -> 0.25


# -- calls ----------------------------------------------------------------------------


def test_call_rebuilt_from_reports_in_order() -> None:
    tracker = CallTracker(settle_s=5)
    tracker.observe(report(0, "a", 1, CallState.RINGING))
    tracker.observe(report(4, "a", 2, CallState.ANSWERED))
    tracker.observe(report(64, "a", 3, CallState.HANGUP))
    assert tracker.advance(68.9) == []
    (call,) = tracker.advance(69.0)
    assert (call.outcome, call.ring_s, call.talk_s, call.reports) == ("answered", 4, 60, 3)


def test_a_flood_of_ended_calls_leaves_no_four_hour_entries_behind() -> None:
    # Each answered call is queued four hours out at its OK; its Bye brings it back to
    # seconds. The entries it left four hours out are dropped once they outnumber the
    # open calls' by far, and every call still finishes once, at its deadline, in order.
    tracker = CallTracker(settle_s=5)
    calls = 200_000
    finished: list[tuple[float, str]] = []
    most_entries = 0
    for n in range(calls):
        t = n * 0.01
        call_id = f"c{n:06d}"
        tracker.observe(report(t, call_id, 1, CallState.ANSWERED))
        tracker.observe(report(t + 0.005, call_id, 2, CallState.HANGUP))
        if n % 1_000 == 999 or n == calls - 1:
            finished += [(c.deadline, c.call_id) for c in tracker.advance(t)]
            queued = sum(len(q.items) - q.head for q in tracker._in_order) // 2
            most_entries = max(most_entries, queued + len(tracker.deadlines))
    finished += [(c.deadline, c.call_id) for c in tracker.advance(calls * 0.01 + 10)]
    assert [call_id for _, call_id in finished] == [f"c{n:06d}" for n in range(calls)]
    assert finished == sorted(finished)
    # Without dropping them: one entry four hours out per call ever answered.
    assert most_entries < 4 * 600 + 2 * 65_536 < calls


@given(
    reports=st.lists(
        st.tuples(
            st.sampled_from("abcdefgh"),
            st.sampled_from(list(CallState)),
            st.integers(0, 400).map(float),
        ),
        max_size=60,
    ),
    cuts=st.lists(st.integers(0, 700).map(float), max_size=6),
)
@settings(max_examples=300, deadline=None)
def test_calls_finish_at_their_deadlines_in_order_whatever_order_reports_come_in(
    reports: list[tuple[str, CallState, float]], cuts: list[float]
) -> None:
    # Reports in any order (late ones set deadlines earlier than others queued before
    # them), event time moved on now and then: after each move no call in progress is
    # past its deadline, the calls finished are in (deadline, call id) order, each
    # once, at the deadline its reports give it.
    tracker = CallTracker(settle_s=6.0, ring_timeout_s=60.0, max_call_s=300.0)
    finished: list[Call] = []

    def advance(now: float) -> None:
        batch = tracker.advance(now)
        assert [(c.deadline, c.call_id) for c in batch] == sorted(
            (c.deadline, c.call_id) for c in batch
        )
        assert all(c.deadline <= tracker.now for c in batch)
        assert all(c.deadline > tracker.now for c in tracker.open.values())
        finished.extend(batch)

    pending_cuts = sorted(cuts)
    for serial, (call_id, state, ts) in enumerate(reports):
        while pending_cuts and pending_cuts[0] <= ts:
            advance(pending_cuts.pop(0))
        tracker.observe(report(ts, call_id, serial, state))
    for cut in pending_cuts:
        advance(cut)
    advance(10_000.0)
    assert not tracker.open
    assert len({c.call_id for c in finished}) == len(finished)
    for call in finished:
        if call.ended_at is not None:
            assert call.deadline == call.ended_at + 6.0
        elif call.answered_at is not None:
            assert call.deadline == call.last_at + 300.0
        else:
            assert call.deadline == call.last_at + 60.0


def test_retried_ok_after_bye_still_makes_the_call_answered() -> None:
    tracker = CallTracker(settle_s=6)
    tracker.observe(report(0, "a", 1, CallState.RINGING))
    tracker.observe(report(10, "a", 3, CallState.HANGUP))
    tracker.observe(report(12, "a", 2, CallState.ANSWERED))  # the OK's first copies were lost
    (call,) = tracker.advance(20)
    assert call.outcome == "answered" and call.talk_s is None and call.ring_s is None


def test_outcomes_unanswered_abandoned_and_timed_out() -> None:
    tracker = CallTracker(abandon_s=10, ring_timeout_s=60, settle_s=0)
    tracker.observe(report(0, "abandoned", 1, CallState.RINGING))
    tracker.observe(report(3, "abandoned", 2, CallState.HANGUP))
    tracker.observe(report(0, "unanswered", 1, CallState.RINGING))
    tracker.observe(report(30, "unanswered", 2, CallState.HANGUP))
    tracker.observe(report(0, "ringing", 1, CallState.RINGING))
    outcomes = {c.call_id: c.outcome for c in tracker.advance(59)}
    assert outcomes == {"abandoned": "abandoned", "unanswered": "unanswered"}
    assert [c.outcome for c in tracker.advance(60)] == ["timed_out"]


def test_concurrency_comes_from_open_calls_and_cannot_drift() -> None:
    tracker = CallTracker(ring_timeout_s=60)
    for n in range(5):
        tracker.observe(report(n, f"c{n}", 1, CallState.RINGING, caller="X"))
    assert len(tracker.open_calls("X")) == 5
    tracker.observe(report(10, "c0", 2, CallState.HANGUP, caller="X"))
    # A Bye retried after the call is gone, and a Bye of a call never seen open:
    tracker.observe(report(11, "c0", 2, CallState.HANGUP, caller="X"))
    tracker.observe(report(11, "ghost", 2, CallState.HANGUP, caller="X"))
    assert len(tracker.open_calls("X")) == 4
    tracker.advance(1000)  # everything else times out
    assert tracker.open_calls("X") == [] and tracker.open == {}


# -- bounded state --------------------------------------------------------------------


def test_a_flood_of_invented_callers_is_bounded_and_counted() -> None:
    loaded = load_rules(RULES / "ringing-without-ok-caller.yaml", max_keys=1000)
    pipeline = Pipeline(loaded.rules, CallTracker(ring_timeout_s=30, settle_s=0))
    events = []
    for n in range(20_000):
        events.append(report(n * 0.01, f"f{n}", 1, CallState.RINGING, caller=f"9{n:09d}"))
        events.append(report(n * 0.01 + 0.005, f"f{n}", 2, CallState.HANGUP, caller=f"9{n:09d}"))
    pipeline.feed(events)
    pipeline.advance(1000)
    (rule,) = pipeline.rules.rules
    assert len(rule.state) <= 1000
    assert rule.state.evicted >= 19_000
    assert pipeline.tracker.open == {}


def test_an_entity_used_within_its_window_stays_however_late_its_place() -> None:
    """A rule moves an entity to the recently used end only when its place is more
    than `touch_s` behind (an eighth of its window): one lookup per call rather than
    a removal and an insertion. Dropping idle entities allows for that lag."""
    (rule,) = load_rules(RULES / "ringing-without-ok-caller.yaml").rules.rules
    window, lag = rule.window_s, rule.touch_s
    assert 0 < lag < window
    tracker = CallTracker()

    def use(caller: str, ts: float) -> None:
        rule.evaluate(Call(f"c{caller}{ts}", caller, "200", "", "7", "Main", ts), ts, tracker)

    use("A", 0.0)
    use("B", 1.0)
    use("A", 0.9 * lag)  # not moved: A's place stays ahead of B's
    assert list(rule.state.states) == ["A", "B"]
    rule.drop_idle(0.9 * lag + window - 1)  # A's last call is still in its window
    assert list(rule.state.states) == ["A", "B"]
    assert len(rule.state.states["A"]) == 2
    use("B", 1.0 + 1.5 * lag)  # moved: B's place was more than touch_s behind
    use("A", 2.5 * lag)
    assert list(rule.state.states) == ["B", "A"]
    rule.drop_idle(1.0 + 1.5 * lag + window + lag + 1)  # B's window is empty
    assert list(rule.state.states) == ["A"]


def test_a_flood_of_calls_that_never_end_is_bounded_and_counted() -> None:
    # A million OKs with no Bye would otherwise stay open for max_call_s (4 h).
    tracker = CallTracker(max_open_calls=1000)
    for n in range(5000):
        tracker.observe(report(n * 0.01, f"o{n}", 1, CallState.ANSWERED, caller="X"))
        assert len(tracker.open) <= 1000
    assert tracker.stats.evicted_calls == 5000 - len(tracker.open)
    evicted = tracker.advance(tracker.now)
    # The oldest went first, finished as timed out at the event time they were evicted.
    assert len(evicted) == tracker.stats.evicted_calls
    assert evicted[0].call_id == "o0" and {c.outcome for c in evicted} == {"timed_out"}
    assert all(c.deadline <= tracker.now for c in evicted)
    assert len(tracker.open_calls("X")) == len(tracker.open)
    # A late report of an evicted call opens nothing.
    assert tracker.observe(report(60, "o0", 2, CallState.HANGUP, caller="X")) is None
    assert tracker.stats.late_reports == 1


def test_a_suppressed_incident_costs_no_scans_of_open_calls(tmp_path: Path) -> None:
    # The rule without its `behaviour:` (which asks for a caller's history): the
    # mechanism under test is the suppression's, for any caller.
    text = (RULES / "simultaneous-calls-caller.yaml").read_text(encoding="utf-8")
    text = re.sub(r"\nbehaviour:\n(?:  .*\n)+", "\n", text)
    shutil.copytree(RULES / "lists", tmp_path / "lists")
    (tmp_path / "simultaneous-calls-caller.yaml").write_text(text, encoding="utf-8")
    loaded = load_rules(tmp_path / "simultaneous-calls-caller.yaml")
    assert loaded.rules.rules[0].spec.behaviour is None
    tracker = CallTracker()
    pipeline = Pipeline(loaded.rules, tracker)
    events = [
        report(n * 0.05, f"s{n}", 1, CallState.ANSWERED, caller="8613900000009")
        for n in range(3000)
    ]
    alerts = pipeline.feed(events).alerts
    # One incident, one alert; every later call that met the condition was suppressed
    # (asked before the scan of open calls and the evidence, which made a flood slow).
    # Before the alert, calls while the caller had fewer in progress than the
    # threshold were not scanned at all.
    assert [a.entity for a in alerts] == ["8613900000009"]
    threshold = int(loaded.rules.rules[0].condition.threshold)
    assert pipeline.alerts.suppressed == 3000 - threshold
    assert tracker.stats.open_call_scans == 1


# -- rules ----------------------------------------------------------------------------


def test_shipped_rules_are_valid_and_their_inline_tests_pass() -> None:
    from engine.detect.ruletest import run_rule_tests

    results = run_rule_tests(load_detectors(RULES, 10_000, models=True).rules)
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
    rule_ids = {r.rule_id for r in results}
    loaded = load_rules(RULES)
    assert rule_ids == {r.id for r in loaded.rules.rules}, "every rule has inline tests"
    for rule in loaded.rules.rules:
        assert any(not t.expect for t in rule.spec.tests), f"{rule.id} has no negative test"
        assert any(t.expect for t in rule.spec.tests), f"{rule.id} has no positive test"


def test_rule_errors_are_all_reported_with_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    (folder / "short-calls-caller.yaml").write_text(
        (folder / "short-calls-caller.yaml")
        .read_text()
        .replace("severity: high", "severity: severe")
        .replace("window: 5m", "window: 5m, colour: red")
    )
    severity_line = next(
        number
        for number, line in enumerate(
            (folder / "short-calls-caller.yaml").read_text().splitlines(), 1
        )
        if line.startswith("severity:")
    )
    (folder / "broken.yaml").write_text("id: broken\ntitle: [unclosed\n")
    (folder / "dup.yaml").write_text(
        (folder / "sequential-dialling.yaml").read_text().replace("known_trunks", "no_such")
    )
    (folder / "lists-missing.yaml").write_text(
        (folder / "risky-destination-callee.yaml")
        .read_text()
        .replace("id: risky-destination-callee", "id: risky-two")
        .replace("risky_prefixes", "no_such_list")
    )
    with pytest.raises(YamlFileError) as caught:
        load_rules(folder)
    text = "\n".join(caught.value.problems)
    assert (
        f"{folder}/short-calls-caller.yaml:{severity_line}: severity: Input should be 'low'" in text
    )
    assert f"{folder}/short-calls-caller.yaml:" in text and "colour: unknown key" in text
    assert (
        f"{folder}/broken.yaml:2: invalid YAML" in text
        or f"{folder}/broken.yaml:3: invalid YAML" in text
    )
    assert "rule id 'sequential-dialling' is also in" in text
    assert "list 'no_such_list' is not in" in text
    assert len(caught.value.problems) >= 5


def test_a_missing_rule_folder_is_named_with_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default, `rules`, is relative to where the engine was started.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(YamlFileError) as caught:
        load_rules(Path("rules"))
    assert caught.value.problems == [f"rules: no such rule file or folder (looked in {tmp_path})"]
    with pytest.raises(YamlFileError) as caught:
        load_rules(tmp_path / "none")
    assert caught.value.problems == [f"{tmp_path / 'none'}: no such rule file or folder"]


def test_suppression_shorter_than_the_window_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        (RULES / "short-calls-low-and-slow.yaml")
        .read_text()
        .replace("duration: 12h", "duration: 1h")
    )
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError, match=r"suppression .* is shorter than the window") as caught:
        load_rules(path)
    lines = path.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("suppression:"))
    assert caught.value.problems[0].startswith(f"{path}:{line}: suppression: "), caught.value


@pytest.mark.parametrize(
    ("rule", "suppression", "message"),
    [
        (
            "short-calls-menu.yaml",
            "{duration: 30m, new_incident_after: 30m}",
            r"new_incident_after \(1800 s\) must be shorter than the suppression's duration",
        ),
        (
            "simultaneous-calls-caller.yaml",
            "{duration: 30m, new_incident_after: 10m}",
            "new_incident_after is not for concurrent calls",
        ),
    ],
)
def test_a_new_incident_after_the_suppression_or_for_calls_in_progress_is_refused(
    tmp_path: Path, rule: str, suppression: str, message: str
) -> None:
    text = (RULES / rule).read_text()
    line = next(line for line in text.splitlines() if line.startswith("suppression:"))
    path = tmp_path / "r.yaml"
    path.write_text(text.replace(line, f"suppression: {suppression}"))
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError, match=message) as caught:
        load_rules(path)
    # Each names the suppression's own line.
    at = text.splitlines().index(line) + 1
    assert caught.value.problems[0].startswith(f"{path}:{at}: suppression"), caught.value


def test_a_window_longer_than_the_default_suppression_is_refused_when_it_is_left_out(
    tmp_path: Path,
) -> None:
    # Checked on the `suppression:` field alone, the default was never checked.
    text = (RULES / "short-calls-caller.yaml").read_text().replace("window: 5m", "window: 2h")
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(t for t in text.splitlines() if not t.startswith("suppression:")))
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError, match=r"suppression \(1800 s\) is shorter than the window"):
        load_rules(path)


def test_concurrent_calls_are_counted_per_caller_only(tmp_path: Path) -> None:
    # The call tracker knows calls in progress per caller: grouped otherwise, the
    # rule would never fire, so it is refused.
    path = tmp_path / "r.yaml"
    path.write_text(
        (RULES / "simultaneous-calls-caller.yaml")
        .read_text()
        .replace("group_by: caller", "group_by: menu")
    )
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError, match=r"concurrent calls are counted per caller"):
        load_rules(path)


def test_hot_reload_swaps_whole_sets_and_keeps_state_of_unchanged_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    # A rule may be called `conduct`: it is counted once, as a rule, beside the
    # callers' conduct.
    renamed = folder / "wangiri-abroad-caller.yaml"
    renamed.write_text(renamed.read_text().replace("id: wangiri-abroad-caller", "id: conduct"))
    settings = make_settings(tmp_path / "data")
    pipeline = make_pipeline(settings.detection, folder)
    writer = LakeWriter(tmp_path / "data", pipeline=pipeline)
    before = {rule.id: rule for rule in pipeline.rules.rules}
    assert "conduct" in before and pipeline.rules.conduct is not None
    before["short-calls-caller"].state.put("someone", object())  # type: ignore[arg-type]

    (folder / "short-calls-caller.yaml").write_text("id: [broken\n")
    assert writer.reload_rules(lambda: load_detectors(folder, 1000, models=True).rules) is False
    assert pipeline.rules.rules[0] is before[pipeline.rules.rules[0].id], "running set kept"
    assert "rules not reloaded, the running rules stay" in caplog.text

    shutil.copy(RULES / "short-calls-caller.yaml", folder / "short-calls-caller.yaml")
    text = (folder / "fanout-callee-caller.yaml").read_text()
    (folder / "fanout-callee-caller.yaml").write_text(text.replace("window: 30m", "window: 20m"))
    (folder / "sequential-dialling.yaml").write_text(
        (folder / "sequential-dialling.yaml").read_text().replace("threshold: 10", "threshold: 12")
    )
    caplog.set_level(logging.INFO, logger="engine.lake.writer")
    assert writer.reload_rules(lambda: load_detectors(folder, 1000, models=True).rules) is True
    after = {rule.id: rule for rule in pipeline.rules.rules}
    assert after["short-calls-caller"].state.get("someone") is not None, "same logic: state kept"
    assert after["sequential-dialling"].state is before["sequential-dialling"].state
    assert after["fanout-callee-caller"].state is not before["fanout-callee-caller"].state
    # The log says how many rules and models there are, and how many of each kept state.
    reloaded = re.search(
        r"rules reloaded: (\d+) rules and (\d+) models; unchanged, and keeping what they "
        r"learned: (\d+) rules and (\d+) models",
        caplog.text,
    )
    assert reloaded is not None
    assert int(reloaded[1]) == len(after) and int(reloaded[3]) == len(after) - 1
    assert int(reloaded[2]) == len(pipeline.rules.models)
    # Every model kept what it learned; the callers' conduct is said apart, not as one.
    assert int(reloaded[4]) == int(reloaded[2])
    assert "and the callers' conduct" in caplog.text


# -- the scenario library -------------------------------------------------------------


def replay_scenario(
    name: str, tmp_path: Path
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    generated = generate(load_scenario(Path(f"data/scenarios/{name}.yaml")))
    events_path, labels_path = write_files(generated, tmp_path / name)
    settings = make_settings(tmp_path / f"data-{name}", detection={"alerts_jsonl": "off"})
    result = replay([events_path], settings)
    alerts = [a.as_json() for a in result.alerts if a.mode == "alert"]
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    return alerts, labels


@pytest.mark.parametrize("name", ["fraud-mix", "lookalikes", "low-and-slow", "demo"])
def test_scenarios_incidents_caught_and_lookalikes_silent(name: str, tmp_path: Path) -> None:
    alerts, labels = replay_scenario(name, tmp_path)
    by_incident: dict[str, list[str]] = {}
    unexplained = []
    for alert in alerts:
        evidence = set(alert["evidence"])  # type: ignore[arg-type]
        owners = [label["incident"] for label in labels if evidence & set(label["call_ids"])]  # type: ignore[arg-type]
        if not owners:
            unexplained.append(alert["summary"])
        for owner in owners:
            by_incident.setdefault(str(owner), []).append(str(alert["rule_id"]))
    for label in labels:
        if label["must_alert"]:
            assert label["incident"] in by_incident, (
                f"{label['incident']} ({label['family']}) missed"
            )
        else:
            assert label["incident"] not in by_incident, f"look-alike {label['incident']} alerted"
    assert not unexplained, f"alerts that belong to no incident: {unexplained}"


def test_replaying_twice_gives_identical_alerts(tmp_path: Path) -> None:
    first, _ = replay_scenario("demo", tmp_path / "one")
    second, _ = replay_scenario("demo", tmp_path / "two")
    assert first and first == second


def test_alerts_table_has_exactly_the_contract_columns(tmp_path: Path) -> None:
    replay_scenario("demo", tmp_path)
    database = tmp_path / "data-demo" / "callsentry.duckdb"
    with duckdb.connect(str(database), read_only=True) as con:
        columns = [row[0] for row in con.execute("DESCRIBE alerts").fetchall()]
        current = con.execute("SELECT DISTINCT status FROM alerts_current").fetchall()
        calls = con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchone()
    assert columns[:15] == [
        "alert_id",
        "rule_id",
        "detector",
        "severity",
        "entity_type",
        "entity",
        "window_start",
        "window_end",
        "raised_at",
        "value",
        "threshold",
        "summary",
        "evidence",
        "rule_version",
        "level",
    ]
    assert set(columns[15:]) <= {"day"}
    assert current == [("open",)]
    assert calls is not None and calls[0] == calls[1] > 3000


def test_live_over_udp_and_replay_of_what_was_stored_give_the_same_alerts(
    engine_factory: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    running = engine_factory(detection={"tick_s": 0.5, "alerts_jsonl": "off"})
    host, port = running.address
    events = generate(load_scenario(Path("data/scenarios/demo.yaml"))).events
    switch = SwitchStandIn(Vos3000TextCodec(), SwitchSettings(host=host, port=port, window=500))
    summary = asyncio.run(switch.send(events))
    assert summary.answered == len(events)
    calls = len({e.call_id for e in events})
    live_db = tmp_path / "data" / "callsentry.duckdb"

    def finished() -> int:
        with duckdb.connect(str(live_db), read_only=True) as con:
            row = con.execute("SELECT count(*) FROM calls").fetchone()
        return int(row[0]) if row else 0

    # Quiet now: journaled ticks move event time past the last calls' settling.
    wait_for(lambda: finished() >= calls, 60, "every call finished")
    assert finished() == calls
    running.stop()
    assert snapshot_path(tmp_path / "data").exists(), "detection state saved on shutdown"
    exported = tmp_path / "stored.parquet"
    with duckdb.connect(str(live_db), read_only=True) as con:
        live = {row[0] for row in con.execute("SELECT alert_id FROM alerts").fetchall()}
        con.execute(
            "COPY (SELECT ts, call_id, serial, coalesce(CAST(code AS VARCHAR), state) AS state, "
            "caller, callee, forward, menu_id, menu_name FROM events ORDER BY seq) "
            f"TO '{exported}' (FORMAT parquet)"
        )
    assert live, "the compressed demo raises alerts"
    result = replay(
        [exported], make_settings(tmp_path / "again", detection={"alerts_jsonl": "off"})
    )
    assert {a.alert_id for a in result.alerts if a.mode == "alert"} == live


def test_serve_picks_up_rule_edits_and_keeps_running_rules_on_a_bad_edit(
    engine_factory: Callable[..., RunningEngine],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The lake writer process logs at this process's level, to the stderr it inherits:
    # what it says about reloading is read there.
    caplog.set_level(logging.INFO)
    folder = tmp_path / "rules"
    (folder / "lists").mkdir(parents=True)
    shutil.copy(RULES / "lists" / "known_trunks.yaml", folder / "lists")
    shutil.copy(RULES / "risky-destination-callee.yaml", folder)
    shutil.copy(RULES / "lists" / "risky_prefixes.yaml", folder / "lists")
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
            call_id = f"{caller}-{n}"
            for serial, state, at in (
                (1, CallState.RINGING, 0.0),
                (2, CallState.ANSWERED, 0.1),
                (3, CallState.HANGUP, 0.6),
            ):
                events.append(
                    CallEvent(
                        now + n * 0.05 + at,
                        call_id,
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
        offsets = [e.ts - now for e in events]
        switch = SwitchStandIn(Vos3000TextCodec(), SwitchSettings(host=host, port=port))
        assert asyncio.run(switch.send(events, offsets)).answered == len(events)

    def count(table: str, caller: str) -> int:
        column = "caller" if table == "calls" else "entity"
        with duckdb.connect(str(database), read_only=True) as con:
            row = con.execute(
                f"SELECT count(*) FROM {table} WHERE {column} = ?", [caller]
            ).fetchone()
        return int(row[0]) if row else 0

    said = ""

    def writer_said(text: str) -> bool:
        nonlocal said
        said += capfd.readouterr().err
        return text in said

    burst("1111")
    # Judged (its calls finished) by the rules as they were, before the edit below.
    wait_for(lambda: count("calls", "1111") == 4, 60, "1111's calls finished")

    # Three short calls, and no `behaviour:` (the callers at large it asks about are
    # not there to be seen in this test).
    quick = (RULES / "short-calls-caller.yaml").read_text().replace("threshold: 8", "threshold: 3")
    quick = re.sub(r"\nbehaviour:\n(?:  .*\n)+", "\n", quick)
    (folder / "short-calls-caller.yaml").write_text(quick)
    wait_for(lambda: writer_said("rules reloaded"), 30, "the edit read")
    burst("2222")
    wait_for(lambda: count("alerts", "2222") > 0, 60, "the added rule raising an alert")

    (folder / "short-calls-caller.yaml").write_text(
        quick.replace("severity: high", "severity: [oops")
    )
    wait_for(lambda: writer_said("rules not reloaded"), 30, "the bad edit refused")
    burst("3333")
    wait_for(lambda: count("alerts", "3333") > 0, 60, "the running rules raising an alert")
    # Written after 1111's calls (the lake is written in journal order), so 1111's
    # alerts would be in by now: there are none, there was no short-call rule yet.
    assert count("alerts", "1111") == 0, "no short-call rule yet"


def test_evidence_for_a_model_is_the_newest_calls_of_the_entity_oldest_first() -> None:
    loaded = load_rules(RULES / "short-calls-caller.yaml")
    pipeline = Pipeline(loaded.rules, CallTracker(settle_s=0))
    events = []
    for n in range(500):
        ts = n * 0.2
        events.append(report(ts, f"e{n:03d}", 1, CallState.ANSWERED, caller="8613900000007"))
        events.append(report(ts + 0.1, f"e{n:03d}", 2, CallState.HANGUP, caller="8613900000007"))
    pipeline.feed(events)
    pipeline.advance(100.0)
    evidence = pipeline.recent_calls("caller", "8613900000007", last=200)
    assert evidence == [f"e{n:03d}" for n in range(300, 500)]
    assert pipeline.recent_calls("caller", "nobody") == []


# -- generated selections ---------------------------------------------------------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 8),
    st.sampled_from([0.0, 2.5, 5.0, 7.25]),
    st.sampled_from(["", "answered", "unanswered", "0900", "09001", "4420", "88216", "x"]),
)


def _reference(matcher: Matcher, lists: dict[str, frozenset[str]], v: object) -> bool:
    """What each condition of a matcher means, read plainly from the schema's words."""

    def number(op: Callable[[float, float], bool], bound: float) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and op(v, bound)

    def starts(prefixes: object) -> bool:
        return isinstance(v, str) and any(v.startswith(p) for p in prefixes)  # type: ignore[attr-defined]

    checks = [
        matcher.in_ is None or v in matcher.in_,
        matcher.not_in is None or v not in matcher.not_in,
        matcher.in_list is None or v in lists[matcher.in_list],
        matcher.not_in_list is None or v not in lists[matcher.not_in_list],
        matcher.prefix is None or starts(matcher.prefix),
        matcher.prefix_list is None or (v != "" and starts(lists[matcher.prefix_list])),
        matcher.not_prefix_list is None or not starts(lists[matcher.not_prefix_list]),
        matcher.lt is None or number(lambda a, b: a < b, matcher.lt),
        matcher.le is None or number(lambda a, b: a <= b, matcher.le),
        matcher.gt is None or number(lambda a, b: a > b, matcher.gt),
        matcher.ge is None or number(lambda a, b: a >= b, matcher.ge),
        matcher.eq is None or v == matcher.eq,
        matcher.ne is None or v != matcher.ne,
        matcher.empty is None or (v in ("", None)) == matcher.empty,
    ]
    return all(checks)


# Bounds the values meet exactly now and then: the edges are where < and <= differ.
_BOUNDS = st.sampled_from([-1, 0, 2.5, 5, 5.0])

_CONDITIONS = {
    "in": st.lists(st.sampled_from(["answered", "unanswered", "x", 5, True]), max_size=3),
    "not_in": st.lists(st.sampled_from(["answered", "", 5]), max_size=2),
    "in_list": st.just("risky"),
    "not_in_list": st.just("risky"),
    "prefix": st.lists(st.sampled_from(["09", "44", ""]), min_size=1, max_size=2),
    "prefix_list": st.just("risky"),
    "not_prefix_list": st.just("risky"),
    "lt": _BOUNDS,
    "le": _BOUNDS,
    "gt": _BOUNDS,
    "ge": _BOUNDS,
    "eq": st.sampled_from(["answered", 5, True, 2.5]),
    "ne": st.sampled_from(["answered", 0, False]),
    "empty": st.booleans(),
}
# One or two conditions a matcher: with more, nearly every value fails one of them and
# the others are never put to the test.
_MATCHERS = st.lists(
    st.one_of([st.tuples(st.just(k), v) for k, v in _CONDITIONS.items()]), min_size=1, max_size=2
).map(lambda pairs: Matcher.model_validate(dict(pairs)))


@given(
    selections=st.lists(
        st.dictionaries(
            # Fields of free values: those of a closed set (outcome, talk_s) refuse a
            # value no call has, and the compiler is to be tried on any value.
            st.sampled_from(["menu_id", "callee", "menu_name", "forward"]),
            _MATCHERS,
            max_size=2,
        ),
        min_size=1,
        max_size=4,
    ),
    facts=st.lists(
        st.fixed_dictionaries({f: _VALUES for f in ("menu_id", "callee", "menu_name", "forward")}),
        min_size=1,
        max_size=5,
    ),
)
@settings(max_examples=300, deadline=None)
def test_generated_selections_mean_what_their_conditions_say(
    selections: list[dict[str, Matcher]], facts: list[dict[str, object]]
) -> None:
    # The selection of one rule, and a rule group's choice among several rules, are
    # generated Python; both must agree with the conditions read one by one.
    lists = {"risky": frozenset({"0900", "88216"})}

    def rule(number: int, selection: dict[str, Matcher]) -> CompiledRule:
        spec = RuleSpec.model_validate(
            {
                "id": f"r{number}",
                "title": "t",
                "severity": "low",
                "selection": {
                    name: m.model_dump(by_alias=True, exclude_none=True)
                    for name, m in selection.items()
                },
                "aggregate": {"type": "count", "group_by": "caller", "window": 60},
                "condition": {"threshold": 1},
            }
        )
        compiled = CompiledRule(spec, lists, source="t", version="t", max_keys=10)
        assert compiled.tests == selection_tests(selection, lists)
        return compiled

    def fields(selector: Selector, values: dict[str, object]) -> list[object]:
        # What `selector.values_of(call)` gives for a call with these field values.
        return [values[field] for field in selector.fields]

    rules = [rule(number, selection) for number, selection in enumerate(selections)]
    group = RuleGroup(rules)
    for values in facts:
        wanted = [
            all(_reference(m, lists, values[name]) for name, m in selection.items())
            for selection in selections
        ]
        for selection, want in zip(selections, wanted, strict=True):
            one = compile_selection(selection, lists)
            assert one.select(fields(one, values)) == ([True] if want else [])
        chosen = group.selector.select(fields(group.selector, values))
        assert chosen == [r for r, w in zip(rules, wanted, strict=True) if w]


def test_a_selector_reads_each_field_of_a_call_as_it_is() -> None:
    tracker = CallTracker(settle_s=1.0, abandon_s=5.0)
    reports = [
        (0.0, "a", 1, CallState.RINGING, "8613800000001", "0900123", "44207000"),
        (4.0, "a", 2, CallState.ANSWERED, "8613800000001", "0900123", "44207000"),
        (9.5, "a", 3, CallState.HANGUP, "8613800000001", "0900123", "44207000"),
        (1.0, "b", 1, CallState.RINGING, "8613800000002", "4008001000", ""),
        (3.0, "b", 2, CallState.HANGUP, "8613800000002", "4008001000", ""),
        (2.0, "c", 1, CallState.RINGING, "8613800000003", "4008001000", ""),
    ]
    for ts, call_id, serial, state, caller, callee, forward in reports:
        tracker.observe(
            CallEvent(ts, call_id, serial, state, 183, caller, callee, forward, "7", "Main", "t")
        )
    calls = tracker.advance(1_000.0)
    assert {c.outcome for c in calls} == {"answered", "abandoned", "timed_out"}
    every = Selector([(True, [(name, EQ, None) for name in FIELDS])])
    assert every.fields == list(FIELDS)

    def as_it_is(call: Call, name: str) -> object:
        if hasattr(call, name):
            return getattr(call, name)
        if name in ("hour", "weekday"):
            # When the call started, in UTC (the site's zone when none is given).
            started = datetime.fromtimestamp(call.started_at, UTC)
            return started.hour if name == "hour" else started.strftime("%a").lower()
        # A destination field: the number's, as the numbering plans read it.
        number, part = name.rsplit("_", 1)
        found = DESTINATIONS.of(getattr(call, number))
        if part == "abroad":
            home = DESTINATIONS.plan.default_region
            return found.country != home if found.country and home else None
        return {"country": found.country, "type": found.kind, "valid": found.valid}[part]

    for call in calls:
        assert every.values_of(call) == [as_it_is(call, name) for name in FIELDS]


def test_a_numbers_destination_is_read_only_for_calls_the_cheaper_tests_take() -> None:
    # The destination test first in the rule, the outcome's after it: the outcome is
    # still tested first, so an unanswered call's callee is never parsed.
    selector = Selector(
        [
            ("abroad", [("callee_country", IN, frozenset({"GB"})), ("outcome", EQ, "answered")]),
            ("answered", [("outcome", EQ, "answered")]),
        ]
    )
    tracker = CallTracker(settle_s=1.0, abandon_s=5.0)
    reports = [
        (0.0, "a", 1, CallState.RINGING, "+442079460001"),
        (4.0, "a", 2, CallState.ANSWERED, "+442079460001"),
        (9.5, "a", 3, CallState.HANGUP, "+442079460001"),
        (1.0, "b", 1, CallState.RINGING, "+442079460002"),
        (3.0, "b", 2, CallState.HANGUP, "+442079460002"),
    ]
    for ts, call_id, serial, state, callee in reports:
        tracker.observe(
            CallEvent(ts, call_id, serial, state, 183, "8613800000001", callee, "", "7", "M", "t")
        )
    calls = {call.call_id: call for call in tracker.advance(1_000.0)}
    DESTINATIONS.cache.clear()
    assert selector.choose(calls["b"]) == []
    assert "+442079460002" not in DESTINATIONS.cache, "an unanswered call's callee was read"
    assert selector.choose(calls["a"]) == ["abroad", "answered"]
    assert "+442079460001" in DESTINATIONS.cache
    # The same choice as from every field read beforehand.
    for call in calls.values():
        assert selector.choose(call) == selector.select(selector.values_of(call))


@pytest.mark.parametrize("op", [">=", ">", "<=", "<"])
def test_a_condition_holds_as_its_operator_says(op: str) -> None:
    spec = RuleSpec.model_validate(
        {
            "id": "r",
            "title": "t",
            "severity": "low",
            "aggregate": {"type": "count", "group_by": "caller", "window": 60},
            "condition": {"op": op, "threshold": 5},
        }
    )
    rule = CompiledRule(spec, {}, source="t", version="t", max_keys=10)
    expected = {">=": [False, True, True], ">": [False, False, True]}.get(op)
    if expected is None:
        expected = {"<=": [True, True, False], "<": [True, False, False]}[op]
    assert [rule.condition.holds(value) for value in (4.999, 5.0, 5.001)] == expected


def test_no_number_is_abroad_until_the_site_has_a_region() -> None:
    """Unset, a site's own numbers in international form would all read as abroad (and
    new-forward-abroad would take every forward number written so for IRSF)."""
    tracker = CallTracker(settle_s=1.0)
    for serial, state in ((1, CallState.ANSWERED), (2, CallState.HANGUP)):
        tracker.observe(
            CallEvent(
                float(serial), "a", serial, state, 200, "+8613800000001", "+37163123456",
                "+864008005001", "7", "Main", "t",
            )
        )  # fmt: skip
    (call,) = tracker.advance(1_000.0)
    fields = ["caller_abroad", "callee_abroad", "forward_abroad"]
    every = Selector([(True, [(name, EQ, None) for name in fields])])
    plan = DESTINATIONS.plan
    try:
        for region, expected in (("", [None, None, None]), ("CN", [False, True, False])):
            DESTINATIONS.use(dataclasses.replace(plan, default_region=region))
            assert every.values_of(call) == expected, region
    finally:
        DESTINATIONS.use(plan)
