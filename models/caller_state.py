"""What the caller model keeps per caller (models/caller.py): a few numbers, by name.

With a million callers tracked, this is most of what the model costs in memory, so it
is compiled by mypyc with the detection (engine/detect/__init__.py): compiled, each
number is a field of the object, where as Python each would be a float object of its
own. It keeps no doctests for that reason.
"""

from __future__ import annotations

from typing import Any

from engine.detect.windows import Snapshotted

# The own-history means move by this much per call (about the last 50 calls).
SLOW_ALPHA = 0.02


class CallerState(Snapshotted):
    """One caller's recent calls and its own history.

    - `calls`: how many calls it made; `first_ts`, `last_ts`: the deadlines of its
      first and latest; `last_callee`: a checksum of the latest's callee;
    - `histories`: for each yes/no fact of a call (the model's FLAGS: short,
      unanswered, forwarded, to another callee than the last), whether each of its
      last `width` calls had it, as bits: flag i in bits i*width to (i+1)*width - 1,
      the latest call lowest;
    - `ring`, `talk`: recent exponentially weighted means of ring time and log talk time;
    - `own_short` ... `own_change`: its own long-run rate of each flag, and
      `own_ring`, `own_talk`: its own long-run means (they move by `SLOW_ALPHA` a call).
    """

    __slots__ = (
        "calls",
        "first_ts",
        "histories",
        "last_callee",
        "last_ts",
        "own_change",
        "own_forward",
        "own_ring",
        "own_short",
        "own_talk",
        "own_unanswered",
        "ring",
        "talk",
    )

    def state_fields(self) -> tuple[str, ...]:
        return (
            "calls",
            "first_ts",
            "histories",
            "last_callee",
            "last_ts",
            "own_change",
            "own_forward",
            "own_ring",
            "own_short",
            "own_talk",
            "own_unanswered",
            "ring",
            "talk",
        )

    def __init__(
        self,
        first_ts: float = 0.0,
        ring: float = 0.0,
        talk: float = 0.0,
        own_short: float = 0.0,
        own_unanswered: float = 0.0,
        own_forward: float = 0.0,
        own_change: float = 0.0,
    ) -> None:
        self.calls = 0
        self.first_ts = first_ts
        self.last_ts = 0.0
        self.last_callee = 0
        self.histories = 0
        self.ring = ring
        self.talk = talk
        self.own_short = own_short
        self.own_unanswered = own_unanswered
        self.own_forward = own_forward
        self.own_change = own_change
        self.own_ring = ring
        self.own_talk = talk

    def state_row(self) -> tuple[Any, ...]:
        # Field by field, in `state_fields`' order: a snapshot writes every caller's.
        return (
            self.calls,
            self.first_ts,
            self.histories,
            self.last_callee,
            self.last_ts,
            self.own_change,
            self.own_forward,
            self.own_ring,
            self.own_short,
            self.own_talk,
            self.own_unanswered,
            self.ring,
            self.talk,
        )

    def set_row(self, row: tuple[Any, ...]) -> None:
        (
            self.calls,
            self.first_ts,
            self.histories,
            self.last_callee,
            self.last_ts,
            self.own_change,
            self.own_forward,
            self.own_ring,
            self.own_short,
            self.own_talk,
            self.own_unanswered,
            self.ring,
            self.talk,
        ) = row

    def learn(
        self,
        flagged: int,
        new_bits: int,
        keep: int,
        ring: float,
        talk: float,
        alpha: float,
        callee: int,
        ts: float,
    ) -> None:
        """Take one call: `flagged` its flags (bit i: flag i), `new_bits` the same as
        the lowest bit of each history, `keep` the bits of the histories that stay
        (each history's oldest goes), `ring` and `talk` its values, `alpha` the
        recent means' weight."""
        short = float(flagged & 1)
        unanswered = float(flagged >> 1 & 1)
        forwarded = float(flagged >> 2 & 1)
        changed = float(flagged >> 3 & 1)
        self.own_short += SLOW_ALPHA * (short - self.own_short)
        self.own_unanswered += SLOW_ALPHA * (unanswered - self.own_unanswered)
        self.own_forward += SLOW_ALPHA * (forwarded - self.own_forward)
        self.own_change += SLOW_ALPHA * (changed - self.own_change)
        self.histories = ((self.histories & keep) << 1) | new_bits
        self.ring += alpha * (ring - self.ring)
        self.talk += alpha * (talk - self.talk)
        self.own_ring += SLOW_ALPHA * (ring - self.own_ring)
        self.own_talk += SLOW_ALPHA * (talk - self.own_talk)
        self.last_callee = callee
        self.calls += 1
        self.last_ts = ts

    def hits(self, flag: int, width: int) -> int:
        """How many of the last `width` calls had flag `flag`."""
        return ((self.histories >> (flag * width)) & ((1 << width) - 1)).bit_count()

    def own_rate(self, flag: int) -> float:
        """Its own long-run rate of flag `flag` (in the order of the model's FLAGS)."""
        if flag == 0:
            return self.own_short
        if flag == 1:
            return self.own_unanswered
        if flag == 2:
            return self.own_forward
        return self.own_change

    def recent_mean(self, mean: int) -> float:
        """Its recent mean `mean` (in the order of the model's MEANS: ring, talk)."""
        return self.ring if mean == 0 else self.talk

    def own_mean(self, mean: int) -> float:
        """Its own long-run mean `mean` (ring, talk)."""
        return self.own_ring if mean == 0 else self.own_talk
