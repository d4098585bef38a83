"""What the caller model keeps per caller (models/caller.py): a few numbers, by name;
and what it does with every call up to judging it (`CallerPath`).

With a million callers tracked, this is most of what the model costs in memory, and
every finished call passes through `CallerPath.take`, so it is compiled by mypyc with
the detection (engine/detect/__init__.py): compiled, each number is a field of the
object, where as Python each would be a float object of its own, and a call's flags
are worked out in C. It keeps no doctests for that reason.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, Final

from engine.detect.calls import Call
from engine.detect.windows import KeyedState, Snapshotted

# The own-history means move by this much per call (about the last 50 calls).
SLOW_ALPHA = 0.02
# The population's flag rates move by this much per call.
RATE_ALPHA: Final = 0.001
# A menu's share of forwarded calls moves by this much per call of the menu (about its
# last hundred calls). A menu that forwards at least `MENU_FORWARDS` of its calls
# (customer service to the call centre) forwards whoever chooses it: such a forward
# is the menu's doing, not a fact about the caller, and is not counted as forwarded.
# Menus are few; past `MAX_MENUS` (menu ids are network text) further ones are not
# learned and their forwards count, as any forward did before menus were told apart.
MENU_ALPHA: Final = 0.01
MENU_FORWARDS: Final = 0.5
MAX_MENUS: Final = 4096
# What `CallerPath.take` returns for a call it has finished with.
DONE: Final = -1


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


# A flag's surprise: (hits, calls, rate) -> standard deviations (models.caller.surprise).
Surprise = Callable[[int, int, float], float]


class CallerPath:
    """What the caller model does with every finished call, up to judging it: the
    caller's state learns the call, the menus' forward shares and the population's
    flag rates learn it, and a judged call's strongest surprise among the flags that
    may alert alone is measured. Most calls end here (`take` returns DONE); the rest
    (sampled for the River model, or unusual) go on in models/caller.py.

    The model's state it works on (`states`, `rates`, `menu_forwards`) is the model's
    own, shared; the counts `judged` and `learned` are kept here. The rest is the
    model's settings, as `CallerModel._derive` works them out."""

    def __init__(
        self,
        states: KeyedState[CallerState],
        rates: list[float | None],
        menu_forwards: dict[str, float],
        surprise: Surprise,
        judged: int,
        learned: int,
    ) -> None:
        self.states = states
        self.rates = rates
        self.menu_forwards = menu_forwards
        self.surprise = surprise
        self.judged = judged
        self.learned = learned
        # Of the latest call `take` did not finish with: the caller's state, its
        # strongest surprise so far, and whether the River model samples it.
        self.state = CallerState()
        self.z = 0.0
        self.sampled = False
        # Settings come from the model's spec (`configure`); until then `take` refuses
        # calls rather than judge them by these stand-ins.
        self.configured = False
        self.configure((5.0, 8, 12, 0.1, 0, 0, 5.0, 16, 400, 50, False), [], [], [])
        self.configured = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Copied or pickled with its model (copy.deepcopy, pickle; snapshots write the
        # model's fields instead): made again from the model's objects it shares (a
        # copy's memo keeps them shared), then configured as it was (if it was).
        made_with = (self.states, self.rates, self.menu_forwards, self.surprise)
        given = self.given if self.configured else None
        return (CallerPath, (*made_with, self.judged, self.learned), given)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        settings, lane_bits, alone_flags, floors = state
        self.configure(settings, lane_bits, alone_flags, floors)

    def configure(
        self,
        settings: tuple[float, int, int, float, int, int, float, int, int, int, bool],
        lane_bits: list[int],
        alone_flags: list[int],
        floors: list[float],
    ) -> None:
        """The model's settings (models.caller.CallerModel._configure)."""
        self.given: tuple[Any, ...] = (settings, lane_bits, alone_flags, floors)
        (
            self.short_s,
            self.min_calls,
            self.window,
            self.alpha,
            self.keep,
            self.alone_mask,
            self.min_deviation,
            self.learn_every,
            self.sample_until,
            self.own_history_calls,
            self.means_alone,
        ) = settings
        self.lane = (1 << self.window) - 1
        self.lane_bits = lane_bits
        self.alone_flags = alone_flags
        self.floors = floors
        self.configured = True

    def take(self, call: Call) -> int:
        """The call's flags (bit i: flag i of models.caller.FLAGS) when it goes on to be
        judged in Python (`state`, `z` and `sampled` then say the rest), else DONE."""
        if not self.configured:
            raise RuntimeError("the caller model's path has no settings yet (configure)")
        caller = call.caller
        if not caller:
            return DONE
        states = self.states
        found = states.get(caller)
        answered = call.answered_at is not None
        talk = call.talk_s
        ring = call.ring_s
        # A stable checksum, not hash(): str hashes change from process to process, and
        # a restored snapshot must compare equal to what this process computes.
        callee_hash = zlib.crc32(call.callee.encode())
        ring_value = 0.0 if ring is None else (60.0 if ring > 60.0 else ring)
        short = False
        talk_value = 0.0
        if answered and talk is not None:
            talk_value = math.log10(1.0 + talk)
            short = talk < self.short_s
        if found is None:
            state = CallerState(
                call.deadline,
                ring_value,
                talk_value,
                self.rate(0),
                self.rate(1),
                self.rate(2),
                self.rate(3),
            )
            states.put(caller, state)
        else:
            state = found
        changed = state.calls > 0 and state.last_callee != callee_hash
        forwarded = self.forwarded_by_choice(call)
        flagged = int(short) | int(not answered) << 1 | int(forwarded) << 2 | int(changed) << 3
        state.learn(
            flagged,
            self.lane_bits[flagged],
            self.keep,
            ring_value,
            talk_value,
            self.alpha,
            callee_hash,
            call.deadline,
        )
        if state.calls < self.min_calls:
            self.learn_rates(flagged)
            return DONE
        self.judged += 1
        own_history = state.calls >= self.own_history_calls
        # A flag's surprise rises only with a call that has the flag: a call with none
        # of the alerting flags (most calls) cannot make the caller newly unusual.
        z = 0.0
        if self.means_alone or flagged & self.alone_mask:
            z = self.strongest_flag(state, own_history)
        # Once it has learned two windows' worth, the global model learns from a sample
        # of the judged vectors (one in `learn_every`, by count, so replay and restarts
        # sample the same ones).
        sampled = self.learned < self.sample_until or self.judged % self.learn_every == 0
        if not (sampled or self.means_alone or z >= self.min_deviation):
            self.learn_rates(flagged)
            return DONE
        self.state = state
        self.z = z
        self.sampled = sampled
        return flagged

    def rate(self, flag: int) -> float:
        value = self.rates[flag]
        return 0.0 if value is None else value

    def tested_rate(self, state: CallerState, flag: int, own_history: bool) -> float:
        """The rate a flag's surprise is tested against: the caller's own once it has a
        history, else the population's; at least a quarter of the flag's floor (a rate
        of almost nothing would make any hit a surprise) and at most 0.95."""
        usual = state.own_rate(flag) if own_history else self.rate(flag)
        return min(max(usual, self.floors[flag] / 4), 0.95)

    def forwarded_by_choice(self, call: Call) -> bool:
        """Whether the call was forwarded where its menu seldom forwards (a forward in
        a menu that forwards most of its calls tells nothing of the caller); the
        menu's share learns the call."""
        forwarded = call.forward != ""
        menu = call.menu_id
        forward_shares = self.menu_forwards
        share = forward_shares.get(menu)
        if share is None:
            if len(forward_shares) < MAX_MENUS:
                forward_shares[menu] = float(forwarded)
            return forwarded
        forward_shares[menu] = share + MENU_ALPHA * (float(forwarded) - share)
        return forwarded and share < MENU_FORWARDS

    def learn_rates(self, flagged: int) -> None:
        """The population's rates learn a call's flags (bit i: flag i)."""
        rates = self.rates
        for i in range(4):
            flag = float(flagged >> i & 1)
            rate = rates[i]
            rates[i] = flag if rate is None else rate + RATE_ALPHA * (flag - rate)

    def strongest_flag(self, state: CallerState, own_history: bool) -> float:
        """The largest surprise among the flags that may alert alone."""
        n = min(state.calls, self.window)
        bits, width, lane = state.histories, self.window, self.lane
        best = 0.0
        for i in self.alone_flags:
            hits = ((bits >> (i * width)) & lane).bit_count()
            if hits < 2:
                continue
            z = self.surprise(hits, n, self.tested_rate(state, i, own_history))
            if z > best:
                best = z
        return best
