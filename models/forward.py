"""Forward numbers whose volume ramps up: a River drift detector per number, on event time.

Every `step` of event time each tracked forward number closes a count: its answered
calls forwarded to it that finished within the step. The count goes, variance
stabilised (2 * sqrt(count + 3/8): about one unit of spread at any rate), into the
number's River `PageHinkley` (mode "up"), which fires when the counts have risen
above the number's running mean for long enough. A number whose volume grows steadily
over an hour keeps rising above its mean, where an EW baseline would follow it: that
is what rules comparing a window with the number's moving usual miss.

A detector firing is not yet an alert. Within `drift.hold` of it the number's recent
rate (EW, half-life `ramp.fast`) must reach `ramp.min_rate_per_hour` and be
`ramp.min_growth` times its usual rate (the mean of its first steps, then an EW with
half-life `ramp.slow`), and that growth must stand out among the forward numbers'
growths (River's rolling quantile over the population: a campaign that fills a
menu lifts all of its numbers, and then none is a ramp).

Cold start: a number is judged from its own first call, against the rate it started
with, so a ramp that begins at the engine's minute 0 is a rise like any other, while
a call-centre number busy from its first minute starts at its own level and never
rises. Nothing waits for a warm-up.

Everything is fed by event time (the calls' `deadline`, the steps' ends), so replay
equals live, and the same events split differently give the same findings.

    step   |  0  |  1  |  2  |  3  | ... counts per step, closed when time passes the end
    calls     x     .    xx    xxx        -> PageHinkley.update(2*sqrt(n+3/8)) per step
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Any

from engine.detect.calls import Call
from models.base import ModelFinding, Quiet, RecentCalls, finding, never_quiet
from models.river_modules import module as river_module
from models.running_stats import stats
from models.scoring import AdaptiveThreshold
from models.spec import ModelSpec

if TYPE_CHECKING:
    from river.drift.page_hinkley import PageHinkley

# The newest call ids a number keeps for an alert's evidence.
EVIDENCE = 20
# A menu's other forward numbers are a common-mode check when there are this many.
MIN_MENU_PEERS = 2
# Menus tracked at most (menu ids come from the network: past this many, the least
# recently called menu is let go).
MAX_MENUS = 1000


def stabilised(count: int) -> float:
    """Anscombe's transform: a Poisson count's spread is about 1 at any rate.

    >>> round(stabilised(0), 3), round(stabilised(4), 3), round(stabilised(100), 3)
    (1.225, 4.183, 20.037)
    """
    return 2.0 * math.sqrt(count + 0.375)


def page_hinkley() -> type[PageHinkley]:
    """River's PageHinkley class. Its module needs only river.stats and river.base, but
    `import river.drift` runs the package's __init__, which imports KSWIN and with it
    scipy.stats: about a second of every replay's start-up. So the module is loaded
    from its file under its own name (models.river_modules: a later `import
    river.drift` finds it there and uses the same class)."""
    found: type[PageHinkley] = river_module("river.drift.page_hinkley").PageHinkley
    return found


def new_detector(spec: ModelSpec) -> PageHinkley:
    return page_hinkley()(
        min_instances=spec.drift.min_instances,
        delta=spec.drift.delta,
        threshold=spec.drift.threshold,
        alpha=1.0,
        mode="up",
    )


class Rates:
    """Answered calls per step of one forward number or one menu: the step being
    counted, how many steps closed since its first call, and its recent rate (an EW,
    half-life `ramp.fast`, bias corrected) and usual rate (the mean of its first
    `ramp.first_steps` steps, or more until they hold `ramp.first_calls` calls, then
    an EW, half-life `ramp.slow`), in calls per step."""

    def __init__(self, step_start: float = 0.0, first_call: float = 0.0) -> None:
        self.step_start = step_start  # the step being counted: [start, start + step)
        self.count = 0
        self.first_call = first_call
        self.last_call = first_call
        self.steps = 0  # steps learned (closed after `ramp.settle`)
        self.fast = 0.0
        self.fast_weight = 0.0  # the EW's weight so far (its bias correction)
        self.slow = 0.0
        self.recent = 0.0
        self.calls = 0  # calls in the steps learned

    def roll(self, spec: ModelSpec) -> bool:
        """Close the step being counted; False while settling (nothing learned)."""
        ramp, step = spec.ramp, spec.step
        count = self.count
        ended = self.step_start + step
        self.step_start, self.count = ended, 0
        if ended <= self.first_call + ramp.settle:
            return False
        self.steps += 1
        self.calls += count
        fast_alpha = 1.0 - 0.5 ** (step / ramp.fast)
        self.fast += fast_alpha * (count - self.fast)
        self.fast_weight += fast_alpha * (1.0 - self.fast_weight)
        self.recent = self.fast / self.fast_weight
        if self.steps <= ramp.first_steps or self.calls < ramp.first_calls:
            # The rate it started with is its usual until it has a history (a few
            # calls at least: ten quiet minutes of a number with a call every five
            # are not its usual rate).
            self.slow += (count - self.slow) / self.steps
        else:
            self.slow += (1.0 - 0.5 ** (step / ramp.slow)) * (count - self.slow)
        return True


class ForwardNumber(Rates):
    """One tracked forward number: its rates, its River detector, when that last fired,
    its latest growth, its menu and the ids of its newest EVIDENCE calls: about 1.5
    to 2 KiB besides those ids (tests/test_forward_model.py bounds it at 4 KiB; the
    figures are in bench/README.md), so `max_numbers` bounds the model's memory."""

    def __init__(self, detector: PageHinkley, step_start: float, first_call: float) -> None:
        super().__init__(step_start, first_call)
        # River's detector (typed Any: River's methods are not annotated).
        self.detector: Any = detector
        self.fired_at = -math.inf
        self.held = 0  # judged steps in a row that met the ramp's conditions
        self.growth: float | None = None
        self.menu = ""  # of its latest call: the menu whose other traffic is its peer
        self.name = ""  # that menu's name, for the summary
        self.evidence: deque[str] = deque(maxlen=EVIDENCE)


class ForwardModel:
    """`kind: forward`: a ramp detector per forward number (see the module's docstring)."""

    def __init__(self, spec: ModelSpec, version: str, max_keys: int = 0) -> None:
        self.spec = spec
        self.version = version
        # Least recently called first (a number called is put back at the end).
        self.numbers: dict[str, ForwardNumber] = {}
        # Each menu's answered calls that go to no forward number.
        self.menus: dict[str, Rates] = {}
        # The forward numbers of each menu (by their latest call): each other's peers.
        self.menu_numbers: dict[str, dict[str, ForwardNumber]] = {}
        self.thresholds = AdaptiveThreshold(spec.threshold.quantiles())
        # The forward numbers' usual growth lately: River's rolling quantile over the
        # growths of the numbers at the steps they took calls (the latest `peer_window`).
        self.population = stats.RollingQuantile(spec.ramp.peer_quantile, spec.ramp.peer_window)
        self.next_step: float | None = None  # the end of the step being counted
        # The numbers that took calls in the step being counted (closed at its end;
        # a number without calls closes its empty steps at its next call).
        self.counting: dict[str, ForwardNumber] = {}
        # Findings of steps closed in `observe`, given out by the next `advance`.
        self.pending: list[ModelFinding] = []
        self.dropped = 0  # numbers let go past `max_numbers`

    # -- the Model protocol (models.base) ---------------------------------------------

    def observe(
        self, call: Call, recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> ModelFinding | None:
        if call.answered_at is None:
            return None
        step = self.spec.step
        at = call.deadline
        if self.next_step is None:
            self.next_step = math.floor(at / step) * step + step
        elif at >= self.next_step:
            # A step ended before this call (the pipeline has not advanced the models
            # yet): close it first, so each step holds the same calls however the
            # events were split; its findings go out with the next `advance`.
            found = self.advance(at)  # (it takes `pending`: extend only after)
            self.pending.extend(found)
        here = math.floor(at / step) * step
        forward = call.forward
        if not forward:
            # The menu's calls that go to no forward number: what lifts them (a
            # campaign, the morning) lifts its forwarded calls too, where a ramp and a
            # new call-centre number do not.
            menu = self.menus.get(call.menu_id)
            if menu is None:
                if len(self.menus) >= MAX_MENUS:
                    del self.menus[next(iter(self.menus))]
                menu = self.menus[call.menu_id] = Rates(here, at)
            while menu.step_start + step <= here:
                menu.roll(self.spec)  # (steps since the menu's last call are empty)
            menu.count += 1
            menu.last_call = at
            return None
        number = self.numbers.pop(forward, None)
        if number is None:
            number = ForwardNumber(new_detector(self.spec), here, at)
            if len(self.numbers) >= self.spec.max_numbers:
                self._forget(next(iter(self.numbers)))
                self.dropped += 1
        self.numbers[forward] = number
        if at >= number.step_start + step:
            # The number was quiet since its last counted step: those steps counted
            # nothing (closed now, as they would have been one by one).
            self._catch_up(number, here)
        number.count += 1
        self.counting[forward] = number
        number.last_call = max(number.last_call, at)
        number.evidence.append(call.call_id)
        if number.menu != call.menu_id or not number.steps:
            self.menu_numbers.get(number.menu, {}).pop(forward, None)
            self.menu_numbers.setdefault(call.menu_id, {})[forward] = number
        number.menu, number.name = call.menu_id, call.menu_name
        return None

    def _forget(self, forward: str) -> None:
        number = self.numbers.pop(forward)
        self.counting.pop(forward, None)
        peers = self.menu_numbers.get(number.menu)
        if peers is not None:
            peers.pop(forward, None)
            if not peers:
                del self.menu_numbers[number.menu]

    def advance(self, now: float) -> list[ModelFinding]:
        findings, self.pending = self.pending, []
        if self.next_step is None or now < self.next_step:
            return findings
        step = self.spec.step
        until = math.floor(now / step) * step
        # Step by step, the numbers that took calls in it, in the order of their first
        # call of the step (the same however event time was advanced).
        while self.next_step <= until:
            ended = self.next_step
            for menu in self.menus.values():
                while menu.step_start + step <= ended:
                    menu.roll(self.spec)
            closing = [(k, n) for k, n in self.counting.items() if n.step_start + step <= ended]
            for forward, _ in closing:
                del self.counting[forward]
            findings.extend(self._close_step(closing))
            self.next_step = ended + step
            if not self.counting:
                break  # nothing counted beyond: the rest of the steps are empty
        self.next_step = until + step
        return findings

    def wakes_at(self) -> float:
        # Before its first call the model cannot tell when its first step ends.
        return -math.inf if self.next_step is None else self.next_step

    def score(self, entity: str) -> float | None:
        number = self.numbers.get(entity)
        return None if number is None else number.growth

    def quantile(self, q: float) -> float | None:
        return self.thresholds.get(q)

    def drop_idle(self, now: float) -> int:
        cutoff = now - self.spec.forget_after
        idle = [key for key, number in self.numbers.items() if number.last_call < cutoff]
        for key in idle:
            self._forget(key)
        for key in [key for key, menu in self.menus.items() if menu.last_call < cutoff]:
            del self.menus[key]
        return len(idle)

    # -- one number's steps -------------------------------------------------------------

    def _catch_up(self, number: ForwardNumber, until: float) -> None:
        """Close the number's empty steps up to `until` (at most those of `forget_after`:
        a number quiet for longer goes on as if it had been quiet that long)."""
        step = self.spec.step
        closing = int((until - number.step_start) // step)
        most = max(1, int(self.spec.forget_after // step))
        if closing > most:
            number.step_start += (closing - most) * step
            closing = most
        for _ in range(closing):
            self._roll(number)

    def _close_step(self, closing: list[tuple[str, ForwardNumber]]) -> list[ModelFinding]:
        """The numbers that took calls in the step that just ended: each rolls on and
        is judged; then their growths join the population's."""
        usual = self.population.get()
        findings = []
        growths = []
        rolled = [(forward, number, self._roll(number)) for forward, number in closing]
        for forward, number, growth in rolled:
            if growth is None:
                continue
            growths.append(growth)
            finding = self._judge(forward, number, growth, usual)
            if finding is not None:
                findings.append(finding)
        for growth in growths:
            self.population.update(growth)
            self.thresholds.learn(growth)
        return findings

    def _roll(self, number: ForwardNumber) -> float | None:
        """Close the number's step: its count goes to its detector and rates. Returns
        its growth (None while it settles)."""
        count = number.count
        if not number.roll(self.spec):
            return None
        detector = number.detector
        detector.update(stabilised(count))
        if detector.drift_detected:
            number.fired_at = number.step_start
        floor = self.spec.ramp.floor_per_hour * self.spec.step / 3600.0
        growth = number.recent / max(number.slow, floor)
        number.growth = growth
        return growth

    def _menu_peers(self, forward: str, number: ForwardNumber) -> float:
        """The middle growth of the other forward numbers of the number's menu that
        took calls within `ramp.fast` (1.0 with fewer than MIN_MENU_PEERS of them): the
        middle, not a pooled sum, so one busy number does not speak for the menu, and
        each measured from its own start, so a new call-centre number busy from its
        first minute does not lift it."""
        lately = number.step_start - self.spec.ramp.fast
        growths = [
            other.growth
            for key, other in self.menu_numbers.get(number.menu, {}).items()
            if key != forward and other.growth is not None and other.last_call >= lately
        ]
        if len(growths) < MIN_MENU_PEERS:
            return 1.0
        return statistics.median(growths)

    def _surprise(self, number: ForwardNumber) -> float:
        """How many spreads the recent rate sits above the usual one, were the calls
        Poisson at the usual rate: the recent rate is an EW, whose spread is the
        rate's times sqrt(a / (2 - a)). A number with a call every two minutes doubles
        its recent rate by chance now and then; one that ramps does so beyond doubt."""
        spec = self.spec
        alpha = 1.0 - 0.5 ** (spec.step / spec.ramp.fast)
        floor = spec.ramp.floor_per_hour * spec.step / 3600.0
        usual = max(number.slow, floor)
        return (number.recent - usual) / math.sqrt(usual * alpha / (2.0 - alpha))

    def _menu_growth(self, number: ForwardNumber) -> float:
        """How much the number's menu's calls that go to no forward number grew (1.0
        while the menu has no history of them)."""
        menu = self.menus.get(number.menu)
        if menu is None or not menu.steps:
            return 1.0
        floor = self.spec.ramp.floor_per_hour * self.spec.step / 3600.0
        return menu.recent / max(menu.slow, floor)

    def _judge(
        self, forward: str, number: ForwardNumber, growth: float, usual: float | None
    ) -> ModelFinding | None:
        """A ramp: the detector fired lately, the recent rate is high enough, and the
        growth is `min_growth` times the largest of the population's usual growth, the
        growth of its menu's calls that go to no forward number and the middle growth
        of its menu's other numbers (a campaign or the morning's rise lifts them all:
        then no one number ramps)."""
        spec, ramp = self.spec, self.spec.ramp
        ended = number.step_start
        per_hour = 3600.0 / spec.step
        population = max(1.0, usual if usual is not None else 1.0)
        menu = max(1.0, self._menu_growth(number), self._menu_peers(forward, number))
        needed = ramp.min_growth * max(population, menu)
        if not (
            ended - number.fired_at <= spec.drift.hold
            and number.recent * per_hour >= ramp.min_rate_per_hour
            and growth >= needed
            and self._surprise(number) >= ramp.min_z
        ):
            number.held = 0
            return None
        # Held for `confirm_steps` steps with calls in a row: the numbers of a menu a
        # campaign fills rise a step or two apart, and their middle catches up.
        number.held += 1
        if number.held < ramp.confirm_steps:
            return None
        number.held = 0
        number.fired_at = -math.inf  # one finding per detection
        surprise = self._surprise(number)
        summary = (
            f"forward number {forward} ramps up: {number.recent * per_hour:.0f} answered "
            f"calls an hour lately, {growth:.1f} times its usual "
            f"{number.slow * per_hour:.1f} an hour, {surprise:.1f} spreads above it "
            f"(needed {needed:.1f} times: forward "
            f"numbers' usual growth {population:.2f}, menu {number.menu}'s other calls' "
            f"and numbers' {menu:.2f})"
        )
        return finding(
            spec,
            self.version,
            "forward",
            forward,
            raised_at=ended,
            window_start=ended - ramp.fast,
            window_end=ended,
            value=round(growth, 3),
            threshold=round(needed, 3),
            summary=summary,
            evidence=list(number.evidence),
        )


# -- snapshots: River's PageHinkley keeps a bound method of its own (`_test_drift`),
# -- which a snapshot may not name; its numbers are written and the method made again.


def detector_state(detector: PageHinkley) -> dict[str, Any]:
    return {k: v for k, v in vars(detector).items() if k != "_test_drift"}


def revive_detector(fields: dict[str, Any]) -> PageHinkley:
    detector = page_hinkley()(mode=fields.get("mode", "up"))
    detector.__dict__.update(fields)
    return detector
