"""What callers' calls look like, not how many there are: each caller's recent conduct,
its own usual, and the population's (its peers), for rules' `behaviour:` conditions.

A busy trunk or PBX reaches many numbers and has some calls ring unanswered, as a
Wangiri run does; what tells them apart is what the calls are like: the trunk's are
answered at the usual rate with the usual talk times. So a rule can require, beside its
count, that the caller's calls also look wrong (`behaviour:` in the rule files,
engine.detect.schema.Behaviour), measured here:

- per caller (`Conduct`, a few numbers, compiled by mypyc so each is a field and not
  an object of its own): exponentially weighted over about its last ten finished calls
  (`RECENT_ALPHA`) the share answered, the share of answered calls shorter than
  `SHORT_S`, the mean ring and talk time and the calling rate; and the same over
  about its last fifty (`OWN_ALPHA`): its own usual, trusted once it made
  `OWN_AFTER` calls (a steady trunk is normal for itself); when judged, the share
  answered counts the caller's answered calls still in progress too (the call
  tracker's), which end minutes after its unanswered ones;
- over all callers (`Peers`): the share of calls answered and of answered calls that
  were short (decaying counts), and River's streaming quantiles (`stats.Quantile`,
  the P-squared estimator) of ring time, talk time and callers' rates, fed from every
  `PEER_SAMPLE`-th call. So a caller seen for the first time is judged against
  callers at large from the first minute, not after a warm-up of its own.

A measure's *usual* is the caller's own once it has `OWN_AFTER` calls, and its peers'
before. Everything moves with the calls it is fed (finished calls, in event time):
replay and live give the same answers, and the ledger is part of detection snapshots
(state types in engine.detect.state).

This module is on the detection's hot path (every finished call passes `observe` when a
rule has `behaviour:`), compiled by mypyc where built, so it keeps no doctests.
"""

from __future__ import annotations

from typing import Any, Final

from engine.detect.calls import Call, CallTracker
from engine.detect.windows import KeyedState, Snapshotted

# The measures a rule's `behaviour:` may name, by index (schema.MeasureName spells them).
MEASURES: Final = ("answered_share", "short_share", "ring_s", "talk_s", "rate", "calls", "seen_s")
ANSWERED: Final = 0
SHORT: Final = 1
RING: Final = 2
TALK: Final = 3
RATE: Final = 4
# How many of its calls have finished (remembered while it is not quiet for `KEEP_S`):
# compared with plain bounds only (a caller first seen has none).
CALLS: Final = 5
# Seconds from its first call's start (while remembered) to the judged call's start:
# plain bounds only.
SEEN: Final = 6

# An answered call shorter than this is short (the shipped short-call rules' 5 s).
SHORT_S: Final = 5.0
# Recent conduct: about the last ten calls; the caller's own usual: about the last fifty.
RECENT_ALPHA: Final = 0.2
OWN_ALPHA: Final = 0.04
# Calls after which a caller's own usual is trusted over its peers'.
OWN_AFTER: Final = 50
# The population's shares move by this much per call (about the last thousand calls,
# with the start weighted as it should be: decaying counts, not a mean seeded at 0).
PEER_DECAY: Final = 0.999
# Every this many finished calls one feeds the peers' quantiles: a P-squared update is a
# few microseconds of Python, and a median moves by nothing over a few calls.
PEER_SAMPLE: Final = 16
# Finished calls before the peers' shares are trusted, and samples before their quantiles.
PEERS_WARM_CALLS: Final = 30
PEERS_WARM_SAMPLES: Final = 4
# A caller quiet this long is forgotten (its usual with it).
KEEP_S: Final = 6 * 3600.0
# How far a caller's place in the least-recently-seen order may lag its last call.
TOUCH_S: Final = 60.0
# At most this many of a caller's calls in progress are looked at for answered ones.
OPEN_LOOKED_AT: Final = 50


class Conduct(Snapshotted):
    """One caller's calls: how many have finished (`calls`; `answers` of them
    answered), when it was last seen (`last_ts`); recent means of its finished calls
    (`answered`, `short`, `ring`, `talk`) and its own usual of each (`own_*`);
    `short` and `talk` move with answered calls only. Its rate is learned as calls
    start (`starts`, `last_start`, `gap`: seconds between starts, and `own_gap`),
    so a caller opening many calls at once shows it before any of them ends."""

    __slots__ = (
        "answered",
        "answers",
        "calls",
        "first_start",
        "gap",
        "last_start",
        "last_ts",
        "own_answered",
        "own_gap",
        "own_ring",
        "own_short",
        "own_talk",
        "ring",
        "short",
        "starts",
        "talk",
    )

    def state_fields(self) -> tuple[str, ...]:
        return (
            "answered",
            "answers",
            "calls",
            "first_start",
            "gap",
            "last_start",
            "last_ts",
            "own_answered",
            "own_gap",
            "own_ring",
            "own_short",
            "own_talk",
            "ring",
            "short",
            "starts",
            "talk",
        )

    def __init__(self) -> None:
        self.calls = 0
        self.answers = 0
        self.starts = 0
        self.first_start = 0.0
        self.last_start = 0.0
        self.last_ts = 0.0
        self.answered = 0.0
        self.short = 0.0
        self.ring = 0.0
        self.talk = 0.0
        self.gap = 0.0
        self.own_answered = 0.0
        self.own_short = 0.0
        self.own_ring = 0.0
        self.own_talk = 0.0
        self.own_gap = 0.0

    def state_row(self) -> tuple[Any, ...]:
        # Field by field, in `state_fields`' order: a snapshot writes every caller's.
        return (
            self.answered,
            self.answers,
            self.calls,
            self.first_start,
            self.gap,
            self.last_start,
            self.last_ts,
            self.own_answered,
            self.own_gap,
            self.own_ring,
            self.own_short,
            self.own_talk,
            self.ring,
            self.short,
            self.starts,
            self.talk,
        )

    def set_row(self, row: tuple[Any, ...]) -> None:
        (
            self.answered,
            self.answers,
            self.calls,
            self.first_start,
            self.gap,
            self.last_start,
            self.last_ts,
            self.own_answered,
            self.own_gap,
            self.own_ring,
            self.own_short,
            self.own_talk,
            self.ring,
            self.short,
            self.starts,
            self.talk,
        ) = row

    def learn(self, answered: bool, ring: float, talk: float, ts: float) -> None:
        """Take one finished call (its deadline `ts`; `talk` negative: answered, but how
        long it lasted is not known, so it moves neither the short share nor the talk
        time). The first call sets the means (a new caller is what its first calls are,
        not a mix with zero)."""
        answer = 1.0 if answered else 0.0
        if self.calls == 0:
            self.answered = self.own_answered = answer
            self.ring = self.own_ring = ring
        else:
            self.answered += RECENT_ALPHA * (answer - self.answered)
            self.own_answered += OWN_ALPHA * (answer - self.own_answered)
            self.ring += RECENT_ALPHA * (ring - self.ring)
            self.own_ring += OWN_ALPHA * (ring - self.own_ring)
        if answered and talk >= 0.0:
            short = 1.0 if talk < SHORT_S else 0.0
            if self.answers == 0:
                self.short = self.own_short = short
                self.talk = self.own_talk = talk
            else:
                self.short += RECENT_ALPHA * (short - self.short)
                self.own_short += OWN_ALPHA * (short - self.own_short)
                self.talk += RECENT_ALPHA * (talk - self.talk)
                self.own_talk += OWN_ALPHA * (talk - self.own_talk)
            self.answers += 1
        self.calls += 1
        if ts > self.last_ts:
            self.last_ts = ts

    def start(self, ts: float) -> None:
        """One of its calls starts at `ts`."""
        if self.starts > 0:
            gap = max(ts - self.last_start, 0.0)
            if self.starts == 1:
                self.gap = self.own_gap = gap
            else:
                self.gap += RECENT_ALPHA * (gap - self.gap)
                self.own_gap += OWN_ALPHA * (gap - self.own_gap)
        else:
            self.first_start = ts
        self.starts += 1
        self.last_start = ts
        if ts > self.last_ts:
            self.last_ts = ts

    def has(self, measure: int) -> bool:
        """Whether the measure has a value yet (short and talk need an answered call,
        the rate two calls)."""
        if measure in (SHORT, TALK):
            return self.answers > 0
        if measure == RATE:
            return self.starts > 1
        if measure == CALLS:
            return True
        if measure == SEEN:
            return self.starts > 0
        return self.calls > 0

    def recent(self, measure: int) -> float:
        if measure == ANSWERED:
            return self.answered
        if measure == SHORT:
            return self.short
        if measure == RING:
            return self.ring
        if measure == TALK:
            return self.talk
        if measure == CALLS:
            return float(self.calls)
        return _per_minute(self.gap)

    def own(self, measure: int) -> float:
        if measure == ANSWERED:
            return self.own_answered
        if measure == SHORT:
            return self.own_short
        if measure == RING:
            return self.own_ring
        if measure == TALK:
            return self.own_talk
        if measure == CALLS:
            return float(self.calls)
        return _per_minute(self.own_gap)


def _per_minute(gap: float) -> float:
    # Calls a minute from the mean gap; calls in the same second count as 60 a minute.
    return 60.0 / max(gap, 1.0)


class Peers(Snapshotted):
    """The population of callers: decaying counts of calls, answered calls and short
    answered calls, and River's streaming medians of ring time, talk time (answered
    calls) and callers' rates (calls a minute, callers with two calls or more)."""

    __slots__ = ("answers", "medians", "sampled", "seen", "shorts", "weight")

    def state_fields(self) -> tuple[str, ...]:
        return ("answers", "medians", "sampled", "seen", "shorts", "weight")

    def __init__(self) -> None:
        self.seen = 0  # finished calls seen (not decayed)
        self.sampled = 0  # of which fed the quantiles
        self.weight = 0.0  # decayed number of calls
        self.answers = 0.0  # decayed answered calls of known length
        self.shorts = 0.0  # decayed short answered calls
        # River's quantiles, made at the first sample: the receiver process loads the
        # rules (and so makes a ledger) without loading River (tests/test_layout.py).
        self.medians: list[Any] = []

    def learn(self, answered: bool, ring: float, talk: float, conduct: Conduct) -> None:
        self.seen += 1
        self.weight = self.weight * PEER_DECAY + 1.0
        self.answers *= PEER_DECAY
        self.shorts *= PEER_DECAY
        if answered and talk >= 0.0:
            self.answers += 1.0
            if talk < SHORT_S:
                self.shorts += 1.0
        if self.seen % PEER_SAMPLE != 0:
            return
        self.sampled += 1
        if not self.medians:
            from river import stats

            self.medians = [stats.Quantile(0.5) for _ in range(3)]
        self.medians[0].update(ring)
        if answered and talk >= 0.0:
            self.medians[1].update(talk)
        if conduct.starts > 1:
            self.medians[2].update(conduct.recent(RATE))

    def typical(self, measure: int) -> float | None:
        """Callers at large: the share (answered, short) or the median (ring, talk,
        rate); None while too little has been seen to say."""
        if self.seen < PEERS_WARM_CALLS:
            return None
        if measure == ANSWERED:
            return self.answers / self.weight
        if measure == SHORT:
            return self.shorts / self.answers if self.answers > 0.0 else None
        if measure >= CALLS or self.sampled < PEERS_WARM_SAMPLES:
            return None
        value = self.medians[measure - RING].get()
        return None if value is None else float(value)


# What a rule reload or a restore says for the callers' conduct in its list of what
# kept its state beside rule and model ids: no rule's id (ids are lower-case letters,
# digits and `_.-`), so a rule called `conduct` is not taken for it.
CONDUCT_KEPT: Final = "callers' conduct"


class ConductLedger(Snapshotted):
    """Every caller's conduct (at most `max_keys`, least recently seen let go first)
    and the peers'."""

    __slots__ = ("callers", "peers", "tracker")

    def state_fields(self) -> tuple[str, ...]:
        return ("callers", "peers")

    def __init__(self, max_keys: int = 200_000) -> None:
        self.callers: KeyedState[Conduct] = KeyedState(max_keys)
        self.peers = Peers()
        # The calls in progress (set by the pipeline that feeds this ledger; not state).
        self.tracker: CallTracker | None = None

    def _conduct(self, caller: str, ts: float) -> Conduct:
        states = self.callers.states
        conduct = states.get(caller)
        if conduct is None:
            conduct = Conduct()
            self.callers.put(caller, conduct)
        elif ts - conduct.last_ts > TOUCH_S:
            # Least recently seen first, to within TOUCH_S (a busy caller is moved
            # once in a while, not at every call): idle callers are found from the
            # front, and `drop_idle` keeps KEEP_S, far more than the lag.
            del states[caller]
            states[caller] = conduct
        return conduct

    def started(self, call: Call) -> None:
        """A call starts (its first report): its caller's rate learns it."""
        if call.caller:
            self._conduct(call.caller, call.started_at).start(call.started_at)

    def observe(self, call: Call) -> None:
        """A finished call: its caller's conduct and the peers' learn it."""
        caller = call.caller
        if not caller:
            return
        conduct = self._conduct(caller, call.deadline)
        answered = call.answered_at is not None
        ring = call.ring_s
        talk = call.talk_s
        ring_s = ring if ring is not None else 0.0
        talk_s = talk if talk is not None else -1.0
        conduct.learn(answered, ring_s, talk_s, call.deadline)
        self.peers.learn(answered, ring_s, talk_s, conduct)

    def of(self, caller: str) -> Conduct | None:
        return self.callers.states.get(caller)

    def answered_share(self, conduct: Conduct, caller: str) -> float:
        """The caller's recent answered share with its answered calls still in
        progress counted in, as if each had just finished: its unanswered calls end
        within seconds and its answered ones minutes later, so over finished calls
        alone a caller's first calls (a busy one's first minutes when the engine
        starts) look unanswered when they are not."""
        value = conduct.answered
        tracker = self.tracker
        if tracker is None:
            return value
        for call in tracker.open_calls(caller, limit=OPEN_LOOKED_AT):
            if call.answered_at is not None:
                value += RECENT_ALPHA * (1.0 - value)
        return value

    def usual(self, conduct: Conduct, measure: int) -> float | None:
        """The caller's own usual once it has made `OWN_AFTER` calls, its peers' before."""
        if conduct.calls >= OWN_AFTER:
            return conduct.own(measure)
        return self.peers.typical(measure)

    def take_over(self, other: ConductLedger) -> None:
        """Carry on from `other`'s state (a restored snapshot, or the rule set this
        one replaces); this ledger's own size limit applies."""
        max_keys = self.callers.max_keys
        self.callers = other.callers
        self.callers.max_keys = max_keys
        self.peers = other.peers

    def drop_idle(self, now: float) -> int:
        """Forget callers quiet for `KEEP_S` (from the least recently seen)."""
        cutoff = now - KEEP_S
        states = self.callers.states
        idle: list[str] = []
        for caller, conduct in states.items():
            if conduct.last_ts >= cutoff:
                break
            idle.append(str(caller))
        for caller in idle:
            del states[caller]
        return len(idle)

    def __len__(self) -> int:
        return len(self.callers)


# What a behaviour test compares (schema.BehaviourBound's keys), by number.
LT: Final = 0
GT: Final = 1
BELOW_PEERS: Final = 2
ABOVE_PEERS: Final = 3
BELOW_USUAL: Final = 4
ABOVE_USUAL: Final = 5
BOUNDS: Final = ("lt", "gt", "below_peers", "above_peers", "below_usual", "above_usual")


class BehaviourTest:
    """One bound on one measure: `kind` (LT ... ABOVE_USUAL) and its constant."""

    def __init__(self, measure: int, kind: int, constant: float) -> None:
        self.measure = measure
        self.kind = kind
        self.constant = constant


# What a caller never seen is judged as (never changed: no call is learned into it).
_NEVER_SEEN: Final = Conduct()


class BehaviourGate:
    """A rule's `behaviour:`: whether the call's caller has finished `min_calls` calls
    and each test holds for its recent conduct. A measure with no value yet, or
    compared with peers or a usual not known yet, does not hold (nothing is known to
    be wrong). With `min_calls` 0 a caller never seen is judged as one with no calls."""

    def __init__(self, ledger: ConductLedger, min_calls: int, tests: list[BehaviourTest]) -> None:
        self.ledger = ledger
        self.min_calls = min_calls
        self.tests = tests

    def __call__(self, call: Call) -> bool:
        ledger = self.ledger
        conduct = ledger.of(call.caller)
        if conduct is None:
            if self.min_calls > 0:
                return False
            conduct = _NEVER_SEEN
        if conduct.calls < self.min_calls:
            return False
        for test in self.tests:
            measure = test.measure
            if not conduct.has(measure):
                return False
            if measure == SEEN:
                value = call.started_at - conduct.first_start
            elif measure == ANSWERED:
                value = ledger.answered_share(conduct, call.caller)
            else:
                value = conduct.recent(measure)
            kind = test.kind
            if kind == LT:
                if not value < test.constant:
                    return False
                continue
            if kind == GT:
                if not value > test.constant:
                    return False
                continue
            if kind <= ABOVE_PEERS:
                reference = ledger.peers.typical(measure)
            else:
                reference = ledger.usual(conduct, measure)
            if reference is None:
                return False
            if kind in (BELOW_PEERS, BELOW_USUAL):
                if not value < test.constant * reference:
                    return False
            elif not value > test.constant * reference:
                return False
        return True
