"""A simulated call and the reports the switch sends for it."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator

from engine.events import CallEvent, CallState

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """'90s', '30m', '1h30m', '2d' or a number of seconds -> seconds.

    >>> parse_duration("1h30m"), parse_duration("2.5s"), parse_duration(42)
    (5400.0, 2.5, 42.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        position = 0
        seconds = 0.0
        for match in _DURATION.finditer(text):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
            position = match.end()
        if not text or position != len(text):
            raise ValueError(f"{value!r} is not a duration (write e.g. 90s, 30m, 1h30m)")
    else:
        raise ValueError(f"{value!r} is not a duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True, slots=True)
class Call:
    call_id: str
    start: float
    caller: str
    callee: str
    menu_id: str
    menu_name: str
    forward: str = ""
    ring_s: float = 5.0
    answered: bool = True
    talk_s: float = 60.0
    ring_code: int | None = 180

    @property
    def end(self) -> float:
        return self.start + self.ring_s + (self.talk_s if self.answered else 0.0)

    def reports(self) -> list[CallEvent]:
        """Ringing (serial 1), OK (2) when answered, Bye (last serial)."""

        def report(serial: int, ts: float, state: CallState, code: int | None) -> CallEvent:
            return CallEvent(
                round(ts, 3),
                self.call_id,
                serial,
                state,
                code,
                self.caller,
                self.callee,
                self.forward,
                self.menu_id,
                self.menu_name,
            )

        events = [report(1, self.start, CallState.RINGING, self.ring_code)]
        answered_at = self.start + self.ring_s
        if self.answered:
            events.append(report(2, answered_at, CallState.ANSWERED, None))
            events.append(report(3, answered_at + self.talk_s, CallState.HANGUP, None))
        else:
            events.append(report(2, answered_at, CallState.HANGUP, None))
        return events


def new_call_id(rng: random.Random, switch_ip: str = "10.0.0.5") -> str:
    return f"{rng.getrandbits(64):016x}@{switch_ip}"


def lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    return min(high, max(low, rng.lognormvariate(math.log(median), sigma)))
