"""The `paced` aggregate (engine/detect/aggregates.py): runs of calls at a machine's
steady pace, whoever places them, and no run of chance in a busy entity."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from engine.detect.aggregates import Paced
from engine.detect.calls import Call
from engine.detect.evaluate import CompiledRule
from engine.detect.schema import RuleSpec
from engine.detect.windows import EntityState

T0 = 1_790_000_000.0


def paced_rule(**aggregate: Any) -> CompiledRule:
    spec = RuleSpec.model_validate(
        {
            "id": "paced",
            "title": "paced",
            "severity": "low",
            "on": "call",
            "aggregate": {"type": "paced", "group_by": "menu", "window": 300, **aggregate},
            "condition": {"op": ">=", "threshold": 10},
        }
    )
    return CompiledRule(spec, {}, source="t", version="t", max_keys=1000)


def short_call(n: int, start: float, caller: str = "", talk: float = 2.0) -> Call:
    answered = start + 1.0
    return Call(
        f"c{n}",
        caller or f"86139{n:08d}",
        "4008001000",
        "",
        "1",
        "Main",
        start,
        ringing_at=start,
        ring_code=180,
        answered_at=answered,
        ended_at=answered + talk,
        outcome="answered",
        deadline=answered + talk,
    )


class Menu:
    """One menu's window of a `paced` rule, fed as a rule feeds it: each call when it
    ended, and measured then."""

    def __init__(self, **aggregate: Any) -> None:
        self.aggregate = paced_rule(**aggregate).aggregate
        assert isinstance(self.aggregate, Paced)
        self.state: EntityState = self.aggregate.new_state(T0)
        self.values: list[float] = []
        # The evidence of the first measure that reached the highest value.
        self.evidence: list[str] = []

    def feed(self, calls: list[Call]) -> float:
        """Every call in the order they ended; the highest value measured."""
        for call in sorted(calls, key=lambda c: c.ended_at or 0.0):
            ended = call.ended_at or 0.0
            self.aggregate.add(self.state, call, ended)
            self.state.leave_until(ended - self.aggregate.window_s)
            value = self.aggregate.measure(self.state, call) or 0.0
            if value > max(self.values, default=0.0):
                self.evidence = self.aggregate.evidence(self.state)
            self.values.append(value)
        return max(self.values, default=0.0)


def test_a_burst_spread_over_ten_callers_is_one_run_and_its_calls_are_the_evidence() -> None:
    burst = [short_call(n, T0 + 5.0 * n, talk=1.0 + (n * 7 % 3)) for n in range(12)]
    # Other short calls of the menu in between, at no pace.
    rng = random.Random(3)
    others = [short_call(100 + n, T0 - 30 + rng.uniform(0, 120)) for n in range(15)]
    menu = Menu()
    assert menu.feed(burst + others) == 12
    assert menu.evidence == [c.call_id for c in burst]


def test_the_calls_may_end_in_any_order() -> None:
    # Talk times of 1 to 14 s: the calls end out of their order of starting.
    rng = random.Random(7)
    burst = [short_call(n, T0 + 3.0 * n, talk=rng.uniform(1.0, 14.0)) for n in range(10)]
    assert Menu().feed(burst) == 10


def test_jitter_within_the_tolerance_keeps_the_run_and_beyond_it_breaks_it() -> None:
    rng = random.Random(11)
    jittered = [short_call(n, T0 + 6.0 * n + rng.uniform(-0.1, 0.1)) for n in range(12)]
    assert Menu().feed(jittered) == 12
    broken = [short_call(n, T0 + 6.0 * n + (0.6 if n == 6 else 0.0)) for n in range(12)]
    # Calls 0-5 and 7-11 are each a run; the moved call belongs to neither.
    assert Menu().feed(broken) == 6


def test_a_pace_that_drifts_slowly_stays_one_run() -> None:
    # 5.0 s between the first two, 0.03 s longer at each call after: each call lies
    # within the tolerance of the interval measured over the run so far.
    starts = [T0]
    for n in range(11):
        starts.append(starts[-1] + 5.0 + 0.03 * n)
    assert Menu().feed([short_call(n, s) for n, s in enumerate(starts)]) == 12


def test_intervals_outside_the_spacing_are_no_run() -> None:
    assert Menu().feed([short_call(n, T0 + 20.0 * n) for n in range(14)]) == 1
    # Every 1 s is also every 2 s: a run of the even calls (at min_spacing 2 s).
    assert Menu().feed([short_call(n, T0 + 1.0 * n) for n in range(20)]) == 10


def random_calls(seed: int, per_s: float, over: float = 900.0) -> list[Call]:
    """Short calls at random (Poisson) at `per_s` a second for `over` seconds."""
    rng = random.Random(seed)
    calls, t = [], T0
    for n in range(int(per_s * over)):
        t += rng.expovariate(per_s)
        calls.append(short_call(n, t))
    return calls


@pytest.mark.parametrize("per_s", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("seed", range(2))
def test_a_busy_menus_calls_at_random_make_no_run_of_ten(seed: int, per_s: float) -> None:
    # At two short calls a second, a call falls within a quarter second of a given
    # moment two times in three, and runs of ten would be common; narrowed to 5 %
    # (1/80 s there), a run of chance is five or six calls. bench/README.md has the
    # figures over twenty seeds.
    assert Menu().feed(random_calls(seed, per_s)) <= 7


def test_without_the_narrowing_a_busy_menu_makes_long_runs() -> None:
    assert Menu(chance=0.99).feed(random_calls(0, 2.0)) >= 10


def test_in_a_busy_menu_a_burst_paced_to_the_millisecond_still_shows() -> None:
    rng = random.Random(5)
    burst = [
        short_call(10_000 + n, T0 + 60.0 + 4.0 * n + rng.uniform(-0.002, 0.002)) for n in range(15)
    ]
    assert Menu().feed(random_calls(5, 2.0, 300.0) + burst) >= 15


def test_a_jittered_dialler_shows_in_a_quiet_menu_and_not_in_a_busy_one() -> None:
    # +-30 ms: within a quiet menu's quarter second, beyond a busy menu's narrowed
    # tolerance (about 12 ms at two short calls a second): the limit README states.
    rng = random.Random(9)
    burst = [
        short_call(10_000 + n, T0 + 60.0 + 5.0 * n + rng.uniform(-0.03, 0.03)) for n in range(15)
    ]
    assert Menu().feed(burst) == 15
    assert Menu().feed(random_calls(9, 2.0, 300.0) + burst) < 10


@pytest.mark.parametrize(
    ("aggregate", "problem"),
    [
        ({"type": "count", "tolerance": "1s"}, "tolerance: a paced aggregate's settings only"),
        ({"type": "paced", "min_spacing": "10s", "max_spacing": "5s"}, "must be shorter than"),
        ({"type": "paced", "max_spacing": "10m"}, "shorter than the window"),
        ({"type": "paced", "max_spacing": "5m"}, "a call one window old has left it"),
        ({"type": "paced", "window": "1m", "min_spacing": "7s"}, "could never fire"),
        ({"type": "paced", "tolerance": "1s", "min_spacing": "2s"}, "under half of min_spacing"),
        ({"type": "paced", "chance": 1.5}, "less than 1"),
        ({"type": "paced", "tolerance": "0s"}, "greater than 0"),
    ],
)
def test_settings_that_make_no_run_are_refused(aggregate: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RuleSpec.model_validate(
            {
                "id": "r",
                "title": "r",
                "severity": "low",
                "aggregate": {"group_by": "menu", "window": "5m", **aggregate},
                "condition": {"threshold": 10},
            }
        )


def test_only_a_paced_rule_dumps_the_paced_keys_so_other_rules_keep_their_logic() -> None:
    count = paced_rule().spec.aggregate.model_copy(update={"type": "count"})
    assert "tolerance" not in count.model_dump()
    assert paced_rule().spec.aggregate.model_dump()["tolerance"] == 0.25
