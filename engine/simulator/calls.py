"""A simulated call and the reports the switch sends for it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from engine.core.events import CallEvent, CallState


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
