"""Labelled incidents: fraud patterns that must alert, and benign look-alikes that must not.

Each family is a strict model (its parameters, all with defaults) and a generator
of calls. A scenario file lists incidents by `family`; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from engine.core.durations import Duration
from engine.simulator.calls import Call, lognormal, new_call_id
from engine.simulator.destinations import check_country, check_kind, random_number
from engine.simulator.traffic import BenignSpec, MenuSpec, Population, benign_call

EntityType = Literal["caller", "menu", "forward", "callee"]
# A country (ISO 3166 code) a number is drawn from, and the type of that number.
Country = Annotated[str, AfterValidator(check_country)]
NumberKind = Annotated[str, AfterValidator(check_kind)]


class _Incident(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    # Offset from the scenario's start.
    at: Duration = 0.0
    must_alert: bool = True
    entity_type: EntityType = "caller"

    def calls(self, start: float, ctx: Context) -> list[Call]:
        raise NotImplementedError

    def onset(self, start: float, calls: list[Call]) -> float:
        """When the incident starts, for time to detect: its first call, unless the
        family says otherwise (a ramp after a quiet history starts with the ramp)."""
        return min(call.start for call in calls)


class Context:
    """What incidents draw on: the benign spec, its callers, a seeded random source."""

    def __init__(self, spec: BenignSpec, population: Population, rng: random.Random) -> None:
        self.spec = spec
        self.population = population
        self.rng = rng

    def menu(self, menu_id: str | None) -> MenuSpec:
        if menu_id is None:
            return self.spec.menus[0]
        for menu in self.spec.menus:
            if menu.id == menu_id:
                return menu
        known = ", ".join(m.id for m in self.spec.menus)
        raise ValueError(f"menu_id {menu_id!r} is not a menu of the benign traffic ({known})")

    def fresh_number(self, prefix: str, digits: int = 7) -> str:
        return f"{prefix}{self.rng.randrange(10 ** (digits - 1), 10**digits)}"

    def number_of(self, country: str, kind: str) -> str:
        return random_number(self.rng, country, kind)

    def ivr_number(self) -> str:
        return self.rng.choice(self.spec.ivr_numbers)


def poisson_offsets(rng: random.Random, per_hour: float, over: float) -> list[float]:
    """Arrival offsets of a Poisson process at `per_hour` within `over` seconds."""
    offsets: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(per_hour / 3600)
        if t >= over:
            return offsets
        offsets.append(t)


def _short_call(
    ctx: Context, caller: str, start: float, menu: MenuSpec, talk: tuple[float, float]
) -> Call:
    rng = ctx.rng
    return Call(
        new_call_id(rng),
        start,
        caller,
        ctx.ivr_number(),
        menu.id,
        menu.name,
        "",
        rng.uniform(0.5, 2.0),
        True,
        rng.uniform(*talk),
        180,
    )


class CallbackAbuse(_Incident):
    """A burst of very short answered calls from one caller, or spread over a few
    callers in one menu (then the menu is the entity to name, unless set)."""

    family: Literal["callback_abuse"]
    caller: str | None = None
    callers: int = Field(default=1, ge=1, le=1000)
    calls_count: int = Field(default=40, ge=1, alias="calls")
    spacing: Duration = 4.0
    talk_min: Duration = 1.0
    talk_max: Duration = 4.0
    menu_id: str | None = None
    # Each call starts up to this far before or after the dialler's pace (network and
    # switch delays); 0: on the pace exactly.
    jitter: Duration = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _menu_when_spread(self) -> CallbackAbuse:
        if self.callers > 1 and "entity_type" not in self.model_fields_set:
            return self.model_copy(update={"entity_type": "menu"})
        return self

    def calls(self, start: float, ctx: Context) -> list[Call]:
        if self.caller and self.callers == 1:
            callers = [self.caller]
        else:
            callers = [ctx.fresh_number("86139", 8) for _ in range(self.callers)]
        menu = ctx.menu(self.menu_id)
        rng = ctx.rng
        return [
            _short_call(
                ctx,
                callers[n % len(callers)],
                # Drawn only when asked for: a scenario without jitter draws as before.
                start
                + n * self.spacing
                + (rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0),
                menu,
                (self.talk_min, self.talk_max),
            )
            for n in range(self.calls_count)
        ]


class Wangiri(_Incident):
    """One caller ringing many distinct callees briefly and hanging up unanswered."""

    family: Literal["wangiri"]
    caller: str | None = None
    calls_count: int = Field(default=60, ge=1, alias="calls")
    spacing: Duration = 3.0
    ring_max: Duration = 3.0
    callee_prefix: str = "86135"
    # The caller is a number of this country (the one-ring call's origin), when set.
    caller_country: Country | None = None
    caller_kind: NumberKind = "any"

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        if self.caller:
            caller = self.caller
        elif self.caller_country:
            caller = ctx.number_of(self.caller_country, self.caller_kind)
        else:
            caller = ctx.fresh_number("88216", 8)
        menu = ctx.menu(None)
        callees = rng.sample(range(10**7, 10**8), self.calls_count)
        return [
            Call(
                new_call_id(rng),
                start + n * self.spacing,
                caller,
                f"{self.callee_prefix}{callee}",
                menu.id,
                menu.name,
                "",
                rng.uniform(0.5, self.ring_max),
                False,
                0.0,
                183,
            )
            for n, callee in enumerate(callees)
        ]


def _forward_number(
    ctx: Context,
    named: str | None,
    country: Country | None,
    kind: NumberKind,
    prefix: str,
    digits: int,
) -> str:
    """An incident's forward number: the one it names, else a valid number of
    `country`'s plan (of `kind`), else a fresh one of `digits` digits after `prefix`."""
    if named:
        return named
    if country:
        return ctx.number_of(country, kind)
    return ctx.fresh_number(prefix, digits)


class Irsf(_Incident):
    """A never-seen international forward number taking many long calls from many callers."""

    family: Literal["irsf"]
    entity_type: EntityType = "forward"
    forward: str | None = None
    calls_count: int = Field(default=30, ge=1, alias="calls")
    over: Duration = 1200.0
    talk_min: Duration = 480.0
    talk_max: Duration = 1800.0
    menu_id: str | None = None
    # The forward number is a valid number of this country's plan, when set.
    forward_country: Country | None = None
    forward_kind: NumberKind = "any"

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        # +882 16 and seven digits: a range the international networks' plan has (E.164),
        # so the number is a valid one, as the numbers IRSF leases are.
        forward = _forward_number(
            ctx, self.forward, self.forward_country, self.forward_kind, "+88216", 7
        )
        menu = ctx.menu(self.menu_id)
        offsets = sorted(rng.uniform(0, self.over) for _ in range(self.calls_count))
        return [
            Call(
                new_call_id(rng),
                start + offset,
                ctx.population.pick(rng),
                ctx.ivr_number(),
                menu.id,
                menu.name,
                forward,
                rng.uniform(1.0, 5.0),
                True,
                rng.uniform(self.talk_min, self.talk_max),
                180,
            )
            for offset in offsets
        ]


class MenuScan(_Incident):
    """Many calls through one menu, nearly all unanswered: its unanswered share jumps."""

    family: Literal["menu_scan"]
    entity_type: EntityType = "menu"
    menu_id: str = "3"
    calls_count: int = Field(default=80, ge=1, alias="calls")
    over: Duration = 600.0
    answer_rate: float = Field(default=0.05, ge=0, le=1)
    callers: int = Field(default=5, ge=1)

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        menu = ctx.menu(self.menu_id)
        scanners = [ctx.fresh_number("86137", 8) for _ in range(self.callers)]
        calls = []
        for n in range(self.calls_count):
            at = start + self.over * n / self.calls_count
            if rng.random() < self.answer_rate:
                calls.append(_short_call(ctx, rng.choice(scanners), at, menu, (1.0, 8.0)))
                continue
            calls.append(
                Call(
                    new_call_id(rng),
                    at,
                    rng.choice(scanners),
                    ctx.ivr_number(),
                    menu.id,
                    menu.name,
                    "",
                    rng.uniform(1.0, 6.0),
                    False,
                    0.0,
                    180,
                )
            )
        return calls


class SequentialDialling(_Incident):
    """One caller dialling a block of numbers in order."""

    family: Literal["sequential_dialling"]
    caller: str | None = None
    block_start: int = 8613912340000
    calls_count: int = Field(default=40, ge=2, alias="calls")
    spacing: Duration = 6.0
    step: int = Field(default=1, ge=1)
    answer_rate: float = Field(default=0.2, ge=0, le=1)

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        caller = self.caller or ctx.fresh_number("86136", 8)
        menu = ctx.menu(None)
        calls = []
        for n in range(self.calls_count):
            answered = rng.random() < self.answer_rate
            calls.append(
                Call(
                    new_call_id(rng),
                    start + n * self.spacing,
                    caller,
                    str(self.block_start + n * self.step),
                    menu.id,
                    menu.name,
                    "",
                    rng.uniform(1.0, 4.0),
                    answered,
                    rng.uniform(2.0, 10.0) if answered else 0.0,
                    180,
                )
            )
        return calls


class SimultaneousCalls(_Incident):
    """Too many calls in progress at once from one caller."""

    family: Literal["simultaneous_calls"]
    caller: str | None = None
    calls_count: int = Field(default=25, ge=2, alias="calls")
    within: Duration = 60.0
    talk_min: Duration = 300.0
    talk_max: Duration = 900.0

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        caller = self.caller or ctx.fresh_number("86133", 8)
        menu = ctx.menu(None)
        offsets = sorted(rng.uniform(0, self.within) for _ in range(self.calls_count))
        return [
            Call(
                new_call_id(rng),
                start + offset,
                caller,
                ctx.ivr_number(),
                menu.id,
                menu.name,
                "",
                rng.uniform(1.0, 4.0),
                True,
                rng.uniform(self.talk_min, self.talk_max),
                180,
            )
            for offset in offsets
        ]


class ForwardRamp(_Incident):
    """A forward number whose volume climbs slowly (rate rising linearly), after an
    optional quiet history at its starting rate (`history` long, from `at`)."""

    family: Literal["forward_ramp"]
    entity_type: EntityType = "forward"
    forward: str | None = None
    over: Duration = 7200.0
    rate_start_per_hour: float = Field(default=2.0, gt=0)
    rate_end_per_hour: float = Field(default=60.0, gt=0)
    menu_id: str | None = "4"
    history: Duration = 0.0
    # The forward number is a valid number of this country's plan, when set.
    forward_country: Country | None = None
    forward_kind: NumberKind = "any"

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        forward = _forward_number(
            ctx, self.forward, self.forward_country, self.forward_kind, "+37167", 6
        )
        menu = ctx.menu(self.menu_id)
        peak = max(self.rate_start_per_hour, self.rate_end_per_hour) / 3600
        times = [start + t for t in poisson_offsets(rng, self.rate_start_per_hour, self.history)]
        ramp = start + self.history
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= self.over:
                break
            rate = (
                self.rate_start_per_hour
                + (self.rate_end_per_hour - self.rate_start_per_hour) * t / self.over
            )
            if rng.random() * peak * 3600 > rate:
                continue
            times.append(ramp + t)
        return [
            Call(
                new_call_id(rng),
                at,
                ctx.population.pick(rng),
                ctx.ivr_number(),
                menu.id,
                menu.name,
                forward,
                rng.uniform(1.0, 5.0),
                True,
                lognormal(rng, 300.0, 0.5, 60.0, 1800.0),
                180,
            )
            for at in times
        ]

    def onset(self, start: float, calls: list[Call]) -> float:
        if self.history:
            return start + self.history
        return super().onset(start, calls)


class LowAndSlow(_Incident):
    """Short answered calls from one caller, spread thin over hours."""

    family: Literal["low_and_slow"]
    caller: str | None = None
    calls_count: int = Field(default=60, ge=1, alias="calls")
    spacing: Duration = 360.0
    jitter: Duration = 60.0
    talk_min: Duration = 1.0
    talk_max: Duration = 4.0
    menu_id: str | None = None

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        caller = self.caller or ctx.fresh_number("86134", 8)
        menu = ctx.menu(self.menu_id)
        return [
            _short_call(
                ctx,
                caller,
                start + n * self.spacing + rng.uniform(0, self.jitter),
                menu,
                (self.talk_min, self.talk_max),
            )
            for n in range(self.calls_count)
        ]


class MarketingCampaign(_Incident):
    """Benign: one menu's volume multiplied by a campaign, answer rates and talk times normal."""

    family: Literal["marketing_campaign"]
    must_alert: bool = False
    entity_type: EntityType = "menu"
    menu_id: str = "1"
    calls_per_hour: float = Field(default=1500.0, gt=0)
    over: Duration = 3600.0

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        menu = ctx.menu(self.menu_id)
        calls = []
        for offset in poisson_offsets(rng, self.calls_per_hour, self.over):
            # Campaigns bring mostly new callers.
            caller = (
                ctx.fresh_number("86150", 8) if rng.random() < 0.7 else ctx.population.pick(rng)
            )
            calls.append(benign_call(ctx.spec, menu, caller, start + offset, rng))
        return calls


class BusyTrunk(_Incident):
    """Benign: a company trunk or PBX making many ordinary calls (answered at the
    menus' usual rates, usual talk times), at `calls_per_hour` or one call `every`
    so many seconds on average."""

    family: Literal["busy_trunk"]
    must_alert: bool = False
    caller: str | None = None
    calls_per_hour: float = Field(default=300.0, gt=0)
    every: Duration | None = Field(default=None, gt=0)
    over: Duration = 7200.0

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        caller = self.caller or ctx.fresh_number("86021", 8)
        rate = 3600.0 / self.every if self.every else self.calls_per_hour
        return [
            benign_call(ctx.spec, rng.choice(ctx.spec.menus), caller, start + offset, rng)
            for offset in poisson_offsets(rng, rate, self.over)
        ]


class CallCentreForward(_Incident):
    """Benign: a call-centre forward number at steady high volume."""

    family: Literal["call_centre_forward"]
    must_alert: bool = False
    entity_type: EntityType = "forward"
    forward: str = "4008005009"
    calls_per_hour: float = Field(default=240.0, gt=0)
    over: Duration = 7200.0
    menu_id: str | None = "4"

    def calls(self, start: float, ctx: Context) -> list[Call]:
        rng = ctx.rng
        menu = ctx.menu(self.menu_id)
        calls = []
        for offset in poisson_offsets(rng, self.calls_per_hour, self.over):
            call = benign_call(
                ctx.spec, menu, ctx.population.pick(rng), start + offset, rng, answered=True
            )
            calls.append(dataclasses.replace(call, forward=self.forward))
        return calls


Incident = Annotated[
    CallbackAbuse
    | Wangiri
    | Irsf
    | MenuScan
    | SequentialDialling
    | SimultaneousCalls
    | ForwardRamp
    | LowAndSlow
    | MarketingCampaign
    | BusyTrunk
    | CallCentreForward,
    Field(discriminator="family"),
]

FAMILIES = (
    "callback_abuse",
    "wangiri",
    "irsf",
    "menu_scan",
    "sequential_dialling",
    "simultaneous_calls",
    "forward_ramp",
    "low_and_slow",
    "marketing_campaign",
    "busy_trunk",
    "call_centre_forward",
)


def entity_of(incident: _Incident, calls: list[Call]) -> str:
    """The entity an alert about this incident should name."""
    first = calls[0]
    return {
        "caller": first.caller,
        "menu": first.menu_id,
        "forward": first.forward,
        "callee": first.callee,
    }[incident.entity_type]
