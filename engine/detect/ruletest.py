"""`callsentry rules test`: each rule's inline tests through the real pipeline, in event time.

A test lists series of calls (each expanded into the reports a switch sends:
Ringing, OK when answered, Bye unless it never hangs up) and the alerts
expected per entity; an empty `expect` means the rule must stay silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.core.events import CallEvent, CallState
from engine.detect.calls import CallTracker
from engine.detect.detectors import Models, NoModels
from engine.detect.evaluate import CompiledRule
from engine.detect.numbers import DESTINATIONS
from engine.detect.pipeline import Pipeline
from engine.detect.rules import RuleSet
from engine.detect.schema import RuleTest, TestCalls

# Tests run from a fixed moment so exception expiry dates behave the same every run,
# and so does a selection by hour or weekday: a Monday, and the rule's fresh copy reads
# the hour in UTC whatever the site's zone, so a rule's tests pass the same anywhere.
TEST_EPOCH = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def expand(series: TestCalls, test_name: str, index: int) -> list[CallEvent]:
    events: list[CallEvent] = []
    for n in range(series.repeat):
        start = TEST_EPOCH + series.at + n * series.every
        call_id = f"test-{test_name[:20]}-{index}-{n}".replace(" ", "_")
        callee = (
            str(int(series.callee) + n * series.callee_step)
            if series.callee_step
            else series.callee
        )
        fields = (
            series.caller,
            callee,
            series.forward,
            series.menu_id,
            series.menu_name,
            "test",
            series.switch,
        )
        answered_at = start + series.ring
        events.append(CallEvent(start, call_id, 1, CallState.RINGING, 180, *fields))
        if series.answered:
            events.append(CallEvent(answered_at, call_id, 2, CallState.ANSWERED, None, *fields))
            if series.hangup:
                events.append(
                    CallEvent(
                        answered_at + series.talk, call_id, 3, CallState.HANGUP, None, *fields
                    )
                )
        elif series.hangup:
            events.append(CallEvent(answered_at, call_id, 2, CallState.HANGUP, None, *fields))
    return events


@dataclass
class TestResult:
    rule_id: str
    source: str
    test: str
    passed: bool
    expected: dict[str, int]
    actual: dict[str, int]
    # The level each entity's alerts reached (`critical` once one was raised so or
    # escalated), and the levels the test expects (where it names one).
    expected_levels: dict[str, str] = field(default_factory=dict)
    actual_levels: dict[str, str] = field(default_factory=dict)


def run_test(
    rule: CompiledRule,
    test: RuleTest,
    lists: dict[str, frozenset[str]],
    models: Models | None = None,
) -> TestResult:
    """Run one inline test on a fresh copy of the rule (and, when the rule asks for
    a model's agreement, a fresh copy of that model, learning from the test's calls)."""
    fresh = CompiledRule(
        rule.spec,
        lists,
        source=rule.source,
        version=rule.version,
        max_keys=10_000,
    )
    needed: Models = NoModels()
    if rule.spec.model is not None and models is not None:
        needed = models.unlearned(rule.spec.model.model, 10_000)
    pipeline = Pipeline(RuleSet([fresh], lists, needed), CallTracker())
    events = [e for i, s in enumerate(test.calls) for e in expand(s, test.name, i)]
    events.sort(key=lambda e: (e.ts, e.call_id, e.serial))
    plan, cache_size = DESTINATIONS.plan, DESTINATIONS.cache_size
    if test.region is not None:
        DESTINATIONS.use(replace(plan, default_region=test.region), cache_size)
    try:
        output = pipeline.feed(events)
        last = events[-1].ts if events else TEST_EPOCH
        tracker = pipeline.tracker
        settled = last + max(tracker.settle_s, tracker.ring_timeout_s) + 1
        output.extend(pipeline.advance(settled))
    finally:
        if test.region is not None:
            DESTINATIONS.use(plan, cache_size)
    actual: dict[str, int] = {}
    levels: dict[str, str] = {}
    for alert in output.alerts:
        if alert.rule_id != rule.id:
            continue  # the model's own alerts are not what this test is about
        if not alert.escalation:  # an escalation is the same alert, not another
            actual[alert.entity] = actual.get(alert.entity, 0) + 1
        if alert.level == "critical" or alert.entity not in levels:
            levels[alert.entity] = alert.level
    expected = {e.entity: e.min_alerts for e in test.expect}
    expected_levels: dict[str, str] = {
        e.entity: e.level for e in test.expect if e.level is not None
    }
    passed = (
        set(actual) == set(expected)
        and all(actual[k] >= v for k, v in expected.items())
        and all(levels.get(k) == v for k, v in expected_levels.items())
    )
    return TestResult(
        rule.id, rule.source, test.name, passed, expected, actual, expected_levels, levels
    )


def run_rule_tests(rules: RuleSet) -> list[TestResult]:
    """Every inline test of every rule in `rules` (loaded with its models where the
    process is wired: engine.apps.detectors.load_detectors)."""
    results = []
    for rule in rules.rules:
        for test in rule.spec.tests:
            results.append(run_test(rule, test, rules.lists, rules.models))
    return results
