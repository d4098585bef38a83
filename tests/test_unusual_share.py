"""`unusual_share` (engine/detect/aggregates.py): a share judged against the entity's
usual, with the volume accounted for. What it must tell apart: more calls at the usual
share (a campaign) from a few extra hits (a burst), in a quiet entity and a busy one;
a new entity against its peers; nothing judged before anything is known."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import pytest

from engine.core.events import CallEvent
from engine.core.positions import Position
from engine.detect import snapshot
from engine.detect.aggregates import PEERS_WARM, ShareState, UnusualShare, surprise
from engine.detect.calls import Call, CallTracker
from engine.detect.evaluate import CompiledRule
from engine.detect.pipeline import Output, Pipeline
from engine.detect.rules import RuleSet, load_rules
from engine.detect.ruletest import TEST_EPOCH, expand
from engine.detect.schema import RuleSpec
from engine.detect.schema import TestCalls as Series
from engine.detect.state import Snapshot
from engine.detect.windows import EntityState

T0 = 1_790_000_000.0
RULES = Path(__file__).resolve().parent.parent / "rules"


def share_rule(**aggregate: object) -> CompiledRule:
    spec = RuleSpec.model_validate(
        {
            "id": "short-share",
            "title": "short share",
            "severity": "low",
            "selection": {"outcome": "answered"},
            "aggregate": {
                "type": "unusual_share",
                "group_by": "menu",
                "window": 300,
                "numerator": {"talk_s": {"lt": 5}},
                **aggregate,
            },
            "condition": {"op": ">=", "threshold": 5},
        }
    )
    return CompiledRule(spec, {}, source="t", version="t", max_keys=100)


def answered(n: int, ts: float, menu: str, talk: float) -> Call:
    return Call(
        f"c{n}",
        f"86138{n % 5000:08d}",
        "4008001000",
        "",
        menu,
        "Menu",
        ts - talk - 3.0,
        ringing_at=ts - talk - 3.0,
        ring_code=180,
        answered_at=ts - talk,
        ended_at=ts,
        outcome="answered",
        deadline=ts,
    )


class Menu:
    """Calls through one menu of a rule, one a `gap` seconds, every `short_every`-th
    short; `measured` is the most the aggregate measured since last asked."""

    def __init__(self, rule: CompiledRule, menu: str) -> None:
        self.rule = rule
        self.menu = menu
        self.states: dict[str, EntityState] = {}
        self.n = 0
        self.measured: float | None = None

    @property
    def aggregate(self) -> UnusualShare:
        aggregate = self.rule.aggregate
        assert isinstance(aggregate, UnusualShare)
        return aggregate

    def call(self, ts: float, short: bool) -> None:
        aggregate = self.aggregate
        state = self.states.get(self.menu)
        if state is None:
            state = self.states[self.menu] = aggregate.new_state(ts)
        self.n += 1
        call = answered(self.n, ts, self.menu, 2.0 if short else 60.0)
        if not aggregate.add(state, call, ts):
            return
        state.leave_until(ts - aggregate.window_s)
        value = aggregate.measure(state, call)
        if value is not None:
            self.measured = value if self.measured is None else max(self.measured, value)

    def traffic(
        self, start: float, seconds: float, gap: float, short_every: int, extra: int = 0
    ) -> float:
        """Calls `gap` apart for `seconds`, every `short_every`-th short, and `extra`
        short calls besides, spread evenly over the time; returns when it ended."""
        calls = [(start + gap * n, (n + 1) % short_every == 0) for n in range(int(seconds / gap))]
        calls += [(start + seconds * (n + 0.5) / extra, True) for n in range(extra)]
        for ts, short in sorted(calls):
            self.call(ts, short)
        return start + seconds

    def most(self) -> float | None:
        value, self.measured = self.measured, None
        return value


@pytest.mark.parametrize("gap", [0.2, 4.0], ids=["busy menu", "quiet menu"])
def test_a_campaign_at_the_usual_share_is_no_burst_and_a_burst_is(gap: float) -> None:
    # An hour at the menu's usual 5 % short ...
    menu = Menu(share_rule(), "1")
    end = menu.traffic(T0, 3600, gap, 20)
    menu.most()
    # ... then half an hour five times as busy, at the same share: no surprise.
    end = menu.traffic(end, 1800, gap / 5, 20)
    campaign = menu.most()
    assert campaign is not None and campaign < 3.5
    # Back to usual; then thirty extra short calls within a minute.
    end = menu.traffic(end, 900, gap, 20)
    menu.most()
    menu.traffic(end, 60, gap, 20, extra=30)
    burst = menu.most()
    assert burst is not None and burst >= 5


def test_a_new_menu_is_judged_against_its_peers_from_their_first_calls() -> None:
    rule = share_rule()
    known = Menu(rule, "1")
    end = known.traffic(T0, 1200, 0.5, 20)
    fresh = Menu(rule, "9")
    fresh.states = known.states  # one rule: its entities' states side by side
    for n in range(25):
        fresh.call(end + 3.0 * n, True)
    value = fresh.most()
    assert value is not None and value >= 5, "25 short calls where peers make 5 % short"


def test_a_burst_in_the_first_minutes_is_judged_against_the_other_menus_not_itself() -> None:
    # From a start: a busy menu and a quieter one, both at 5 % short, and forty short
    # calls within a minute in the busy one a minute in. Counted among its own peers,
    # they made the peers' share nearly twice the usual and hid in it (3.2).
    rule = share_rule()
    busy = Menu(rule, "1")
    other = Menu(rule, "2")
    other.states = busy.states
    calls = [(T0 + 0.25 + 0.5 * n, busy, (n + 1) % 20 == 0) for n in range(600)]
    calls += [(T0 + 1.0 * n, other, (n + 1) % 20 == 0) for n in range(300)]
    calls += [(T0 + 60.0 + 1.5 * n, busy, True) for n in range(40)]
    for ts, menu, short in sorted(calls, key=lambda call: call[0]):
        menu.call(ts, short)
    value = busy.most()
    assert value is not None and value >= 5
    assert not other.most()


def test_a_menu_that_is_all_of_its_peers_is_judged_by_them_all() -> None:
    # A site of one menu: left out of its peers it would have none (or what rounding
    # leaves of its own calls, a share of 0.4). Eighty short calls in its first window.
    menu = Menu(share_rule(), "1")
    calls = [(T0 + 0.5 * n, (n + 1) % 20 == 0) for n in range(500)]
    calls += [(T0 + 200.0 + 1.0 * n, True) for n in range(80)]
    for ts, short in sorted(calls):
        menu.call(ts, short)
    value = menu.most()
    assert value is not None and value >= 5


def test_nothing_is_judged_before_a_usual_or_peers_are_known() -> None:
    menu = Menu(share_rule(), "1")
    for n in range(int(PEERS_WARM) - 1):
        menu.call(T0 + n * 0.1, True)
    assert menu.most() is None


def test_a_few_extra_hits_in_a_menu_of_a_few_calls_are_too_few() -> None:
    # Peers at 5 %; a quiet menu with 3 short of 4 calls: surprising, but fewer than
    # min_excess (8) beyond the usual.
    rule = share_rule()
    busy = Menu(rule, "1")
    end = busy.traffic(T0, 600, 0.5, 20)
    quiet = Menu(rule, "2")
    quiet.states = busy.states
    for n in range(4):
        quiet.call(end + 10.0 * n, n < 3)
    assert quiet.most() == 0.0


@pytest.mark.parametrize(("hits", "expected"), [(12, 2.0), (20, 6.0), (40, 20.0), (130, 100.0)])
def test_surprise_is_close_to_the_exact_poisson_tail(hits: int, expected: float) -> None:
    tail = 1.0 - sum(
        math.exp(-expected + k * math.log(expected) - math.lgamma(k + 1)) for k in range(hits)
    )
    exact = NormalDist().inv_cdf(1.0 - tail)
    assert surprise(float(hits), expected) == pytest.approx(exact, abs=0.35)
    assert surprise(expected, expected) == 0.0
    assert surprise(float(hits), 0.0) == 0.0


def test_only_a_share_rule_dumps_the_share_keys_so_other_rules_keep_their_logic() -> None:
    # A rule's logic hash is made from its aggregate's dump: keys every rule gained
    # would change every rule's hash, and a snapshot of an earlier build would then
    # restore no rule's window.
    count = RuleSpec.model_validate(
        {
            "id": "count",
            "title": "count",
            "severity": "low",
            "aggregate": {"type": "count", "group_by": "menu", "window": 300},
            "condition": {"threshold": 5},
        }
    )
    assert not {"usual_over", "peer_weight", "min_excess", "numerator_behaviour"} & set(
        count.aggregate.model_dump()
    )
    share = share_rule(usual_over=7200).spec.aggregate.model_dump()
    assert share["usual_over"] == 7200 and share["min_excess"] == 8
    # Nor does a share rule without numerator_behaviour: short-calls-menu's logic, and
    # so its windows in a snapshot of the release before, are kept.
    assert "numerator_behaviour" not in share
    narrowed = share_rule(numerator_behaviour={"min_calls": 2, "short_share": {"gt": 0.99}})
    assert narrowed.spec.aggregate.model_dump()["numerator_behaviour"]["min_calls"] == 2


def test_numerator_behaviour_narrows_a_share_only() -> None:
    with pytest.raises(ValueError, match="numerator_behaviour narrows an unusual_share"):
        RuleSpec.model_validate(
            {
                "id": "count",
                "title": "count",
                "severity": "low",
                "aggregate": {
                    "type": "count",
                    "group_by": "menu",
                    "window": 300,
                    "numerator_behaviour": {"calls": {"gt": 1}},
                },
                "condition": {"threshold": 5},
            }
        )


def test_a_short_call_is_a_hit_only_when_its_callers_calls_have_all_been_short() -> None:
    rule = share_rule(numerator_behaviour={"min_calls": 2, "short_share": {"gt": 0.99}})
    rules = RuleSet([rule], {})
    ledger = rules.conduct
    assert ledger is not None, "a ledger of the callers' conduct is kept for the gate"
    aggregate = rule.aggregate
    assert isinstance(aggregate, UnusualShare)
    state = aggregate.new_state(T0)
    first_short = answered(1, T0, "1", 2.0)
    first_short.caller = "8613900000001"
    second_short = answered(2, T0 + 20, "1", 2.0)
    second_short.caller = "8613900000001"
    ordinary = answered(3, T0 + 30, "1", 60.0)
    ordinary.caller = "8613900000002"
    after_ordinary = answered(4, T0 + 40, "1", 2.0)
    after_ordinary.caller = "8613900000002"
    taken = []
    for call in (first_short, second_short, ordinary, after_ordinary):
        ledger.observe(call)  # before the rules, as the pipeline does
        taken.append(aggregate.add(state, call, call.deadline))
    assert taken == [False, True, False, False]
    assert isinstance(state, ShareState) and sum(state.bucket_calls) == 4


def test_buckets_leaving_the_window_after_a_gap_join_the_usual_decayed() -> None:
    # One window of calls, then three quiet hours (usual_over: 1 h): what the menu did
    # three hours ago is worth about e^-3 of what it does now, not all of it.
    menu = Menu(share_rule(usual_over=3600), "1")
    end = menu.traffic(T0, 300, 1.0, 20)
    menu.call(end + 3 * 3600, False)
    state = menu.states["1"]
    assert isinstance(state, ShareState)
    assert 300 * math.exp(-3.1) < state.usual_calls < 300 * math.exp(-2.8)
    assert 15 * math.exp(-3.1) < state.usual_hits < 15 * math.exp(-2.8)


def test_buckets_leaving_the_window_as_calls_come_join_the_usual_whole() -> None:
    menu = Menu(share_rule(usual_over=3600), "1")
    end = menu.traffic(T0, 600, 1.0, 20)
    state = menu.states["1"]
    assert isinstance(state, ShareState)
    # The first five minutes have left the window, each bucket as it left.
    assert 270 < state.usual_calls <= 300
    assert sum(state.bucket_calls) + state.usual_calls == pytest.approx(600, abs=30)
    assert end == T0 + 600


def _busy_menu_then_a_burst_in_a_new_one() -> list[CallEvent]:
    """Twenty minutes of menu 1 (5 % of its calls short), then 25 short calls into a
    menu first seen after them: judged against the peers' share, it is a burst."""
    series = [
        Series(caller="8613800000009", menu_id="1", repeat=1200, every=1.0, talk=60.0),
        Series(caller="8613800000008", menu_id="1", repeat=60, every=20.0, talk=2.0, at=0.5),
        Series(caller="8613900000001", menu_id="9", repeat=25, every=3.0, talk=2.0, at=1300.0),
    ]
    events = [e for i, s in enumerate(series) for e in expand(s, "share", i)]
    return sorted(events, key=lambda e: (e.ts, e.call_id, e.serial))


def _share_rules() -> RuleSet:
    return load_rules(RULES / "short-calls-menu.yaml").rules


def _alerts(output: Output) -> list[tuple[str, str, float]]:
    return sorted((a.rule_id, a.entity, a.raised_at) for a in output.alerts)


def _run(pipeline: Pipeline, events: list[CallEvent]) -> list[tuple[str, str, float]]:
    output = pipeline.feed(events)
    output.extend(pipeline.advance(events[-1].ts + 3600))
    return _alerts(output)


def test_a_restart_from_a_snapshot_judges_as_a_run_that_never_stopped(tmp_path: Path) -> None:
    events = _busy_menu_then_a_burst_in_a_new_one()
    whole = _run(Pipeline(_share_rules(), CallTracker()), events)
    assert [entity for _, entity, _ in whole] == ["9"], "the burst is found against peers"
    cut = next(n for n, e in enumerate(events) if e.ts >= TEST_EPOCH + 1250)
    first = Pipeline(_share_rules(), CallTracker())
    alerts = _alerts(first.feed(events[:cut]))
    path = tmp_path / "detection.snapshot"
    snapshot.save(path, Snapshot(Position(1, cut), first.state(), 0.0))
    loaded = snapshot.load(path)
    assert loaded is not None
    second = Pipeline(_share_rules(), CallTracker())
    assert "short-calls-menu" in second.restore(loaded.state)
    alerts += _run(second, events[cut:])
    assert alerts == whole


def test_a_snapshot_from_before_the_peers_were_kept_loads_and_they_start_cold() -> None:
    events = _busy_menu_then_a_burst_in_a_new_one()
    cut = next(n for n, e in enumerate(events) if e.ts >= TEST_EPOCH + 1250)
    old = Pipeline(_share_rules(), CallTracker())
    old.feed(events[:cut])
    state = old.state()
    del state["learned"]  # what a snapshot of the release before holds
    decoded = snapshot.decode(snapshot.encode(Snapshot(Position(1, 1), state, 0.0)))
    fresh = Pipeline(_share_rules(), CallTracker())
    assert "short-calls-menu" in fresh.restore(decoded.state)
    aggregate = fresh.rules.rules[0].aggregate
    assert isinstance(aggregate, UnusualShare) and aggregate.peer_seen == 0


def test_a_rule_reload_keeps_the_peers_share() -> None:
    events = _busy_menu_then_a_burst_in_a_new_one()
    whole = _run(Pipeline(_share_rules(), CallTracker()), events)
    cut = next(n for n, e in enumerate(events) if e.ts >= TEST_EPOCH + 1250)
    pipeline = Pipeline(_share_rules(), CallTracker())
    alerts = _alerts(pipeline.feed(events[:cut]))
    assert "short-calls-menu" in pipeline.swap_rules(_share_rules())
    alerts += _run(pipeline, events[cut:])
    assert alerts == whole


def _campaign_then_a_burst_in_it() -> list[CallEvent]:
    """An hour of a menu at 5 % short; then ten times its calls at the same share, its
    long calls three minutes long, for half an hour; twenty minutes in,
    forty-five extra short calls within a minute."""
    series = [
        Series(caller="8613800000009", menu_id="1", repeat=1710, every=2.1, talk=60.0),
        Series(caller="8613800000008", menu_id="1", repeat=90, every=40.0, talk=2.0, at=1.0),
        Series(caller="8615000000001", menu_id="1", repeat=8570, every=0.21, talk=180.0, at=3600),
        Series(caller="8615000000002", menu_id="1", repeat=450, every=4.0, talk=2.0, at=3601),
        Series(caller="8613900000001", menu_id="1", repeat=15, every=4.0, talk=2.0, at=4800),
        Series(caller="8613900000002", menu_id="1", repeat=15, every=4.0, talk=2.0, at=4801),
        Series(caller="8613900000003", menu_id="1", repeat=15, every=4.0, talk=2.0, at=4802),
    ]
    events = [e for i, s in enumerate(series) for e in expand(s, "surge", i)]
    return sorted(events, key=lambda e: (e.ts, e.call_id, e.serial))


def test_a_surge_is_judged_by_when_its_calls_were_answered_not_when_they_ended() -> None:
    # The campaign's short calls end minutes before its long ones: by when they ended,
    # its first minutes are nearly all short; by when they were answered, at the usual.
    alerts = _run(Pipeline(_share_rules(), CallTracker()), _campaign_then_a_burst_in_it())
    assert [(entity, ts - TEST_EPOCH >= 4800) for _, entity, ts in alerts] == [("1", True)]


def test_a_state_from_before_calls_were_counted_by_when_they_settled_judges_by_end() -> None:
    menu = Menu(share_rule(), "1")
    menu.traffic(T0, 120, 1.0, 20)
    state = menu.states["1"]
    assert isinstance(state, ShareState)
    state.settled_calls, state.settled_hits = [], []  # what such a snapshot restores
    menu.traffic(T0 + 120, 60, 1.0, 20)
    assert len(state.settled_calls) == len(state.settled_hits) == len(state.bucket_start)
    # The buckets from before are unknown until they leave the window; the new ones count.
    assert state.settled_calls[0] == -1 and state.settled_calls[-1] > 0
    assert menu.aggregate.settled(state, answered(0, T0 + 180, "1", 2.0), 7.0, [], []) == 7.0
    menu.traffic(T0 + 180, 360, 1.0, 20)
    assert min(state.settled_calls) >= 0


def _events(name: str, series: list[Series]) -> list[CallEvent]:
    events = [e for i, s in enumerate(series) for e in expand(s, name, i)]
    return sorted(events, key=lambda e: (e.ts, e.call_id, e.serial))


def test_the_tracker_counts_each_menus_answered_calls_in_progress(tmp_path: Path) -> None:
    events = _events(
        "open",
        [
            Series(menu_id="1", repeat=3, every=10.0, talk=100.0),
            # Answered and never hung up: in progress until they time out.
            Series(caller="8613800000002", menu_id="2", repeat=2, every=10.0, hangup=False, at=5),
            # Not answered: never counted.
            Series(caller="8613800000003", menu_id="2", repeat=2, answered=False, at=6),
        ],
    )
    pipeline = Pipeline(_share_rules(), CallTracker(max_call_s=600.0))
    pipeline.feed([e for e in events if e.ts < TEST_EPOCH + 50])
    tracker = pipeline.tracker
    assert (tracker.answered_open, tracker.answered_open_all) == ({"1": 3, "2": 2}, 5)
    # A retried OK counts once; a snapshot holds the calls, and the count is made again.
    pipeline.feed([e for e in events if e.ts < TEST_EPOCH + 50 and e.serial == 2])
    assert tracker.answered_open_all == 5
    decoded = snapshot.decode(snapshot.encode(Snapshot(Position(1, 1), pipeline.state(), 0.0)))
    restored = Pipeline(_share_rules(), CallTracker(max_call_s=600.0))
    restored.restore(decoded.state)
    assert (restored.tracker.answered_open, restored.tracker.answered_open_all) == (
        {"1": 3, "2": 2},
        5,
    )
    pipeline.feed([e for e in events if e.ts >= TEST_EPOCH + 50])
    assert (tracker.answered_open, tracker.answered_open_all) == ({"2": 2}, 2)
    # Timed out (no Bye within max_call_s): no longer in progress.
    pipeline.advance(TEST_EPOCH + 700)
    assert (tracker.answered_open, tracker.answered_open_all) == ({}, 0)


def test_a_bye_before_its_ok_leaves_no_call_in_progress() -> None:
    ringing, answer, bye = expand(Series(talk=30.0), "order", 0)
    pipeline = Pipeline(_share_rules(), CallTracker())
    pipeline.feed([ringing, bye, answer])
    assert (pipeline.tracker.answered_open, pipeline.tracker.answered_open_all) == ({}, 0)


def _first_minutes_with_a_burst() -> list[CallEvent]:
    """From a start: two menus at 5 % short whose other calls last four minutes, and
    twenty short calls from twenty callers into the quieter one five minutes in (6.5
    standard deviations; 4.1 by the ended calls alone)."""
    series = [
        Series(caller="8613800000009", menu_id="1", repeat=2400, every=0.25, talk=240.0),
        Series(caller="8613800000008", menu_id="1", repeat=120, every=5.0, talk=2.0, at=0.1),
        Series(caller="8613800000007", menu_id="2", repeat=300, every=2.0, talk=240.0, at=0.2),
        Series(caller="8613800000006", menu_id="2", repeat=15, every=40.0, talk=2.0, at=0.3),
    ]
    series += [
        Series(caller=f"86139000000{n:02d}", menu_id="2", talk=2.0, at=300.0 + 2.5 * n)
        for n in range(20)
    ]
    return _events("minutes", series)


def test_the_peers_answered_calls_in_progress_count_in_their_share() -> None:
    # Five minutes in, the peers' calls that have ended are their short ones and the
    # first minute's long ones: by those, a sixth of their calls are short. Counted
    # with the long ones still going on, a twentieth: the burst stands out.
    alerts = _run(Pipeline(_share_rules(), CallTracker()), _first_minutes_with_a_burst())
    assert [entity for _, entity, _ in alerts] == ["2"]
    assert all(ts - TEST_EPOCH < 420 for _, _, ts in alerts)


Mark = tuple[float, dict[str, int], int]


def _marks(pipeline: Pipeline, events: list[CallEvent], made: list[Mark]) -> list[Mark]:
    """`made` and each mark of the calls in progress the tracker makes after it, fed one
    report at a time."""
    for event in events:
        pipeline.feed([event])
        marks = pipeline.tracker.answered_marks
        if marks and (not made or marks[-1][0] != made[-1][0]):
            made.append(marks[-1])
    return made


def test_the_calls_in_progress_are_counted_as_of_the_judged_calls_end() -> None:
    # Cut anywhere in the burst, time moved on to the cut's last report and a few
    # seconds (as a replay's end does), and resumed from a snapshot: the same marks
    # of the calls in progress, and the same alerts at the same values, as a run that
    # never stopped. The reports after a judged call's end are read before it is
    # judged in one and not in the other.
    events = _first_minutes_with_a_burst()

    def raised(output: Output) -> list[tuple[str, float, float]]:
        return [(a.entity, a.raised_at, round(a.value, 9)) for a in output.alerts]

    whole = Pipeline(_share_rules(), CallTracker())
    expected = raised(whole.feed(events)) + raised(whole.advance(events[-1].ts + 3600))
    assert [entity for entity, _, _ in expected] == ["2"]
    burst = [n for n, e in enumerate(events) if 300 <= e.ts - TEST_EPOCH <= 360]
    never_cut = _marks(Pipeline(_share_rules(), CallTracker()), events, [])
    for cut in burst[::7]:
        first = Pipeline(_share_rules(), CallTracker())
        got = raised(first.feed(events[:cut]))
        got += raised(first.advance(events[cut - 1].ts + 6.0))
        state = snapshot.decode(snapshot.encode(Snapshot(Position(1, cut), first.state(), 0.0)))
        second = Pipeline(_share_rules(), CallTracker())
        second.restore(state.state)
        got += raised(second.feed(events[cut:])) + raised(second.advance(events[-1].ts + 3600))
        assert got == expected, f"cut at report {cut}"
    for cut in burst[::23]:
        first = Pipeline(_share_rules(), CallTracker())
        made = _marks(first, events[:cut], [])
        first.advance(events[cut - 1].ts + 6.0)
        state = snapshot.decode(snapshot.encode(Snapshot(Position(1, cut), first.state(), 0.0)))
        second = Pipeline(_share_rules(), CallTracker())
        second.restore(state.state)
        assert _marks(second, events[cut:], made) == never_cut, f"cut at report {cut}"
