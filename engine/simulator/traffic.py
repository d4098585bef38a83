"""Benign IVR traffic that looks like an operator's: heavy-tailed callers, a few busy
company trunks, menus of different popularity, realistic ring and talk times, call-centre
forward numbers, and a day/night rhythm."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.core.durations import Duration
from engine.simulator.calls import Call, lognormal, new_call_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MenuSpec(_Strict):
    id: str = Field(min_length=1)
    name: str = ""
    weight: float = Field(default=1.0, gt=0)
    answer_rate: float = Field(default=0.9, ge=0, le=1)
    ring_median: Duration = 4.0
    talk_median: Duration = 90.0
    # Share of this menu's answered calls forwarded to a call-centre number.
    forward_share: float = Field(default=0.0, ge=0, le=1)
    forwards: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _forwards_when_forwarding(self) -> MenuSpec:
        if self.forward_share > 0 and not self.forwards:
            raise ValueError("forward_share is set but forwards lists no number")
        return self


def _default_menus() -> list[MenuSpec]:
    return [
        MenuSpec(id="1", name="Main menu", weight=5, answer_rate=0.93, talk_median=45),
        MenuSpec(id="2", name="账单查询", weight=3, answer_rate=0.9, talk_median=120),
        MenuSpec(id="3", name="Sales, support and returns", weight=2, answer_rate=0.85),
        MenuSpec(
            id="4",
            name="Customer service",
            weight=3,
            answer_rate=0.95,
            talk_median=180,
            forward_share=0.8,
            forwards=["4008005001", "4008005002", "4008005003"],
        ),
        MenuSpec(id="5", name="English / 国际", weight=1, answer_rate=0.88, talk_median=150),
        MenuSpec(id="6", name="Night line", weight=0.5, answer_rate=0.7, talk_median=60),
    ]


class BenignSpec(_Strict):
    # The afternoon peak's rate; with `swing` set, the day's mean rate instead.
    calls_per_hour: float = Field(default=1500.0, ge=0)
    # Volume at 04:00 relative to the afternoon peak (UTC hours of event time).
    night_factor: float = Field(default=0.25, ge=0, le=1)
    # The day/night swing around the mean, instead of `night_factor`: 0.4 is +-40 %
    # (the peak 1.4 times the mean, 04:00 0.6 times).
    swing: float | None = Field(default=None, ge=0, lt=1)
    callers: int = Field(default=4000, ge=1)
    caller_prefix: str = "86138"
    # Pareto shape of callers' activity: smaller means a heavier tail.
    caller_skew: float = Field(default=1.3, gt=0)
    # Zipf exponent of callers' activity instead of `caller_skew`: the caller of rank k
    # places a share proportional to 1 / k**caller_zipf (0.5-0.9: a few callers
    # place a large share of the calls, most call once or never).
    caller_zipf: float | None = Field(default=None, gt=0, le=5)
    trunks: int = Field(default=4, ge=0)
    trunk_share: float = Field(default=0.15, ge=0, lt=1)
    trunk_prefix: str = "86010"
    ivr_numbers: list[str] = Field(
        default_factory=lambda: ["4008001000", "4008001001"], min_length=1
    )
    short_call_share: float = Field(default=0.04, ge=0, le=1)
    menus: list[MenuSpec] = Field(default_factory=_default_menus, min_length=1)


def daily_level(ts: float, night_factor: float) -> float:
    """1.0 at 16:00 UTC, `night_factor` at 04:00, smooth in between."""
    hour = (ts % 86400) / 3600
    day = 0.5 * (1 - math.cos(2 * math.pi * (hour - 4) / 24))
    return night_factor + (1 - night_factor) * day


def peak_and_night(spec: BenignSpec) -> tuple[float, float]:
    """The peak rate (calls/s) and the night factor `daily_level` takes. With a swing
    s, the night factor is (1 - s) / (1 + s) and the peak (1 + s) times the mean: the
    daily shape averages (1 + night) / 2, so the mean rate is `calls_per_hour`."""
    rate = spec.calls_per_hour / 3600.0
    if spec.swing is None:
        return rate, spec.night_factor
    return rate * (1 + spec.swing), (1 - spec.swing) / (1 + spec.swing)


@dataclass
class Population:
    """Who calls: occasional callers and trunks, with their weights."""

    numbers: list[str]
    cumulative: list[float]
    trunks: list[str]

    def pick(self, rng: random.Random) -> str:
        return self.numbers[bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])]


def make_population(spec: BenignSpec, rng: random.Random) -> Population:
    # Six digits after the prefix, eight past a million callers (a month's population).
    space, digits = (1_000_000, 6) if spec.callers <= 1_000_000 else (100_000_000, 8)
    numbers = [
        f"{spec.caller_prefix}{n:0{digits}d}" for n in rng.sample(range(space), spec.callers)
    ]
    if spec.caller_zipf is not None:
        # The numbers are in random order: rank k is the k-th of them.
        weights = [1.0 / (rank + 1) ** spec.caller_zipf for rank in range(len(numbers))]
    else:
        weights = [rng.paretovariate(spec.caller_skew) for _ in numbers]
    trunks = [f"{spec.trunk_prefix}{8000 + n:04d}" for n in range(spec.trunks)]
    if trunks and spec.trunk_share > 0:
        # Trunks together take `trunk_share` of the calls.
        each = sum(weights) * spec.trunk_share / (1 - spec.trunk_share) / len(trunks)
        numbers += trunks
        weights += [each] * len(trunks)
    return Population(numbers, list(itertools.accumulate(weights)), trunks)


def benign_call(
    spec: BenignSpec,
    menu: MenuSpec,
    caller: str,
    start: float,
    rng: random.Random,
    *,
    answered: bool | None = None,
) -> Call:
    if answered is None:
        answered = rng.random() < menu.answer_rate
    callee = rng.choice(spec.ivr_numbers)
    ring_code = rng.choice((180, 183))
    forward = ""
    talk = 0.0
    if answered:
        ring = lognormal(rng, menu.ring_median, 0.5, 0.5, 40.0)
        if rng.random() < spec.short_call_share:
            talk = rng.uniform(1.0, 6.0)
        else:
            talk = lognormal(rng, menu.talk_median, 0.9, 6.0, 3600.0)
        if menu.forwards and rng.random() < menu.forward_share:
            forward = rng.choice(menu.forwards)
    else:
        # Unanswered: the caller gives up or the ring times out.
        ring = lognormal(rng, 12.0, 0.6, 2.0, 60.0)
    return Call(
        new_call_id(rng),
        start,
        caller,
        callee,
        menu.id,
        menu.name,
        forward,
        ring,
        answered,
        talk,
        ring_code,
    )


def generate_benign(
    spec: BenignSpec, start: float, duration: float, rng: random.Random
) -> list[Call]:
    """Poisson arrivals at the daily rhythm (thinning), callers by weight, menus by weight."""
    return list(iter_benign(spec, start, duration, rng))


def iter_benign(
    spec: BenignSpec, start: float, duration: float, rng: random.Random
) -> Iterator[Call]:
    """`generate_benign`'s calls one at a time, in order of their start (a month of them
    need not be held at once)."""
    population = make_population(spec, rng)
    menu_cumulative = list(itertools.accumulate(m.weight for m in spec.menus))
    peak_rate, night_factor = peak_and_night(spec)
    if peak_rate <= 0:
        return
    t = start
    end = start + duration
    while True:
        t += rng.expovariate(peak_rate)
        if t >= end:
            break
        if rng.random() > daily_level(t, night_factor):
            continue
        menu = spec.menus[bisect.bisect(menu_cumulative, rng.random() * menu_cumulative[-1])]
        yield benign_call(spec, menu, population.pick(rng), t, rng)
