"""Per-caller behaviour: light state per caller, one River model over all of them.

A River HalfSpaceTrees costs about 1.3 MiB, so one per caller is out of the
question with 100k callers. Each caller keeps a few numbers (`CallerState`, in
models/caller_state.py, about 150 bytes): for the yes/no facts of its calls (short,
unanswered, forwarded, to another callee than the last) the last `recent_calls`
answers as bits, for ring and talk time an exponentially weighted mean, and a slow
mean of each (its own history). A call counts as forwarded only where its menu
seldom forwards: customer service forwarding everyone to the call centre makes
being forwarded no fact about a caller. One global River model (scaled HalfSpaceTrees) learns
what callers' recent mixes look like.

How far a caller is from normal is measured as a surprise, not a raw share:
"7 short calls out of the last 8 when 3 % of calls are short" has a binomial
tail probability, shown as the equivalent number of standard deviations. Three
unanswered calls in a row from a busy caller happen every day; eight in eight
from a new caller do not. A caller is compared with the population while it is
new and with its own history once it has `own_history_calls` calls (a caller
that was always odd, a test robot, is normal for itself). An alert needs a
feature at least `min_deviation` spreads out; for a caller judged against the
population also a global model score above its running quantile (two views
agreeing before anyone is paged).
"""

from __future__ import annotations

import functools
import math
import zlib
from statistics import NormalDist

from engine.detect.calls import Call
from engine.detect.windows import KeyedState
from models.base import ModelFinding, Quiet, RecentCalls, finding, never_quiet
from models.caller_state import CallerState
from models.running_stats import stats
from models.scoring import AdaptiveThreshold, AnomalyModel
from models.spec import FEATURE_NAMES, ModelSpec

# Yes/no facts of a call, kept as bit histories; then means kept as EW.
FLAGS = ("short_share", "unanswered_share", "forward_share", "callee_change_share")
MEANS = ("ring_mean", "talk_log")
# How a flag reads in a summary: "unanswered calls 10 of its last 12 against a usual 13%".
FLAG_WORDS = {
    "short_share": "short calls",
    "unanswered_share": "unanswered calls",
    "forward_share": "forwarded calls",
    "callee_change_share": "calls to another callee than the last",
}
FEATURES = FLAGS + MEANS
# The population's flag rates move by this much per call.
_RATE_ALPHA = 0.001
# A menu's share of forwarded calls moves by this much per call of the menu (about its
# last hundred calls). A menu that forwards at least `_MENU_FORWARDS` of its calls
# (customer service to the call centre) forwards whoever chooses it: such a forward
# is the menu's doing, not a fact about the caller, and is not counted as forwarded.
# Menus are few; past `_MAX_MENUS` (menu ids are network text) further ones are not
# learned and their forwards count, as any forward did before menus were told apart.
_MENU_ALPHA = 0.01
_MENU_FORWARDS = 0.5
_MAX_MENUS = 4096
_NORMAL = NormalDist()


@functools.lru_cache(maxsize=8192)
def _tail_z(hits: int, n: int, rate: float) -> float:
    tail = sum(math.comb(n, k) * rate**k * (1 - rate) ** (n - k) for k in range(hits, n + 1))
    return -_NORMAL.inv_cdf(max(tail, 1e-300)) if tail < 0.5 else 0.0


def surprise(hits: int, n: int, rate: float) -> float:
    """`hits` or more out of `n` when each happens with probability `rate`, as the
    number of standard deviations of a normal tail that is just as unlikely.

    Eight in eight at 5 % is far out; three in twelve at 10 % happens all the time:

    >>> round(surprise(8, 8, 0.05), 1), round(surprise(3, 12, 0.1), 1)
    (6.5, 1.2)
    """
    if n == 0 or hits < 2 or hits <= n * rate:
        return 0.0  # one hit, or no more than expected: nothing to say (and most calls)
    # Rates to three decimals: the answer moves by far less than that, and the
    # same few (hits, n, rate) come up again and again.
    return _tail_z(hits, n, round(rate, 3))


class CallerModel:
    def __init__(self, spec: ModelSpec, version: str, max_keys: int) -> None:
        self.spec = spec
        self.version = version
        self.flags = [i for i, name in enumerate(FLAGS) if name in spec.features]
        self.means = [i for i, name in enumerate(MEANS) if name in spec.features]
        # The features that may raise an alert alone: the quick look at every call.
        self.alone_flags = [i for i in self.flags if spec.features[FLAGS[i]].alone]
        self.alone_means = [i for i in self.means if spec.features[MEANS[i]].alone]
        # Four histories of `window` bits share one number (CallerState.histories): lane
        # i holds flag i; shifting all lanes at once, the top bit of each is dropped.
        self.window = min(spec.recent_calls, 13)
        self.lane = (1 << self.window) - 1
        self.keep = sum((self.lane >> 1) << (i * self.window) for i in range(len(FLAGS)))
        self.alpha = 2.0 / (spec.recent_calls + 1)
        self._derive()
        self.state: KeyedState[CallerState] = KeyedState(max_keys)
        self.population = AnomalyModel(spec.trees)
        # How often each flag is set over all calls (plain floats: updated at every
        # call, where a River statistic per flag would cost more than the rest), and
        # callers' usual mean values (River, learned from the sampled vectors); both
        # move slowly: over about a thousand calls.
        self.rates: list[float | None] = [None] * len(FLAGS)
        self.floors = [spec.floor(name) if name in spec.features else 1.0 for name in FEATURES]
        self.usual_means = {name: stats.EWMean(0.001) for name in MEANS}
        self.usual_spread = {name: stats.EWVar(0.001) for name in MEANS}
        self.thresholds = AdaptiveThreshold(spec.threshold.quantiles())
        self.judged = 0
        self.learned = 0
        # Each menu's share of forwarded calls (see `_MENU_FORWARDS`).
        self.menu_forwards: dict[str, float] = {}

    def _derive(self) -> None:
        """What the per-call path looks up rather than works out (see `observe`)."""
        # The alerting flags as a mask of a call's flags (bit i: flag i).
        self.alone_mask = sum(1 << i for i in self.alone_flags)
        # A call's flags (bit i: flag i) as new bits of the histories (lane i).
        self.lane_bits = [
            sum(1 << (i * self.window) for i in range(len(FLAGS)) if flagged >> i & 1)
            for flagged in range(1 << len(FLAGS))
        ]

    def observe(
        self, call: Call, recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> ModelFinding | None:
        caller = call.caller
        if not caller:
            return None
        state = self.state.get(caller)
        talk = call.talk_s
        ring = call.ring_s
        answered = call.answered_at is not None
        # A stable checksum, not hash(): str hashes change from process to process, and
        # a restored snapshot must compare equal to what this process computes.
        callee_hash = zlib.crc32(call.callee.encode())
        ring_value = 0.0 if ring is None else (60.0 if ring > 60.0 else ring)
        if answered and talk is not None:
            talk_value = math.log10(1.0 + talk)
            short = talk < self.spec.short_s
        else:
            talk_value, short = 0.0, False
        if state is None:
            state = CallerState(
                call.deadline,
                ring_value,
                talk_value,
                self.rate(0),
                self.rate(1),
                self.rate(2),
                self.rate(3),
            )
            self.state.put(caller, state)
        changed = state.calls > 0 and state.last_callee != callee_hash
        forwarded = self._forwarded_by_choice(call)
        # Bit i: flag i (FLAGS) of this call.
        flagged = short | (not answered) << 1 | forwarded << 2 | changed << 3
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
        n = state.calls
        if n < self.spec.min_calls:
            self._learn_rates(flagged)
            return None
        return self._judge(call, state, flagged, recent_calls, quiet)

    def _forwarded_by_choice(self, call: Call) -> bool:
        """Whether the call was forwarded where its menu seldom forwards (a forward in
        a menu that forwards most of its calls tells nothing of the caller); the
        menu's share learns the call."""
        forwarded = call.forward != ""
        menu = call.menu_id
        share = self.menu_forwards.get(menu)
        if share is None:
            if len(self.menu_forwards) < _MAX_MENUS:
                self.menu_forwards[menu] = float(forwarded)
            return forwarded
        self.menu_forwards[menu] = share + _MENU_ALPHA * (forwarded - share)
        return forwarded and share < _MENU_FORWARDS

    def _hits(self, state: CallerState, flag: int) -> int:
        """How many of the caller's last calls had this flag."""
        return state.hits(flag, self.window)

    def rate(self, flag: int) -> float:
        value = self.rates[flag]
        return 0.0 if value is None else value

    def _learn_rates(self, flagged: int) -> None:
        """The population's rates learn a call's flags (bit i: flag i)."""
        rates = self.rates
        r0, r1, r2, r3 = rates
        if r0 is None or r1 is None or r2 is None or r3 is None:
            for i, rate in enumerate(rates):
                flag = flagged >> i & 1
                rates[i] = float(flag) if rate is None else rate + _RATE_ALPHA * (flag - rate)
            return
        rates[0] = r0 + _RATE_ALPHA * ((flagged & 1) - r0)
        rates[1] = r1 + _RATE_ALPHA * ((flagged >> 1 & 1) - r1)
        rates[2] = r2 + _RATE_ALPHA * ((flagged >> 2 & 1) - r2)
        rates[3] = r3 + _RATE_ALPHA * ((flagged >> 3) - r3)

    def _recent(self, state: CallerState) -> dict[str, float]:
        n = min(state.calls, self.window)
        vector = {FLAGS[i]: self._hits(state, i) / n for i in self.flags}
        for i in self.means:
            vector[MEANS[i]] = state.recent_mean(i)
        return vector

    def _strongest(self, state: CallerState, own_history: bool) -> float:
        """The largest deviation among the features that may alert alone (what
        `_deviations` would give, without building it for every call)."""
        n = min(state.calls, self.window)
        bits, width, lane = state.histories, self.window, self.lane
        best = 0.0
        for i in self.alone_flags:
            hits = ((bits >> (i * width)) & lane).bit_count()
            if hits < 2:
                continue
            rate = self.rates[i] if not own_history else state.own_rate(i)
            usual = rate if rate is not None else 0.0
            z = surprise(hits, n, min(max(usual, self.floors[i] / 4), 0.95))
            if z > best:
                best = z
        if self.alone_means:
            deviations = self._deviations(state, own_history)
            for i in self.alone_means:
                best = max(best, abs(deviations[MEANS[i]]))
        return best

    def _deviations(self, state: CallerState, own_history: bool) -> dict[str, float]:
        spec = self.spec
        n = min(state.calls, self.window)
        deviations = {}
        for i in self.flags:
            name = FLAGS[i]
            usual = state.own_rate(i) if own_history else self.rate(i)
            rate = min(max(usual, self.floors[i] / 4), 0.95)
            deviations[name] = surprise(self._hits(state, i), n, rate)
        for i in self.means:
            name = MEANS[i]
            if own_history:
                usual, spread = state.own_mean(i), spec.floor(name)
            else:
                usual = float(self.usual_means[name].get() or 0.0)
                variance = max(float(self.usual_spread[name].get() or 0.0), 0.0)
                spread = max(variance**0.5, spec.floor(name))
            deviations[name] = (state.recent_mean(i) - usual) / spread
        return deviations

    def _judge(
        self,
        call: Call,
        state: CallerState,
        flagged: int,
        recent_calls: RecentCalls,
        quiet: Quiet,
    ) -> ModelFinding | None:
        spec = self.spec
        own_history = state.calls >= spec.own_history_calls
        self.judged += 1
        # A flag's surprise rises only with a call that has the flag: a call with none
        # of the alerting flags (most calls) cannot make the caller newly unusual.
        raised = self.alone_means or flagged & self.alone_mask
        z = self._strongest(state, own_history) if raised else 0.0
        unusual = z >= spec.threshold.min_deviation
        # Once it has learned two windows' worth, the global model learns from a sample
        # of the judged vectors (one in `learn_every`, by count, so replay and restarts
        # sample the same ones): it learns a distribution, and scoring every call
        # would cost more than all the rules.
        sampled = self.learned < 2 * spec.trees.window_size or self.judged % spec.learn_every == 0
        if not (unusual or sampled):
            self._learn_rates(flagged)
            return None
        recent = self._recent(state)
        score = self.population.score_one(recent)
        threshold = self.thresholds.get(spec.threshold.quantile)
        # Against the population, the global model must agree that this mix is rare.
        # Against its own history it need not: a change to a mix other callers have
        # (a busy trunk's) is still a change for this caller, and the surprise is a
        # test against the caller's own rates already.
        alerting = (
            unusual
            and self.judged >= spec.warmup
            and threshold is not None
            and (own_history or score >= threshold)
        )
        if sampled and self.learned >= spec.trees.window_size:
            # HalfSpaceTrees scores 0 until its first window is full: not a score to learn.
            self.thresholds.learn(score)
        if alerting:
            if quiet(spec.id, call.caller, call.deadline):
                # Alerted on already and suppressed: no evidence, no sentence. As when
                # the alert is dropped after it is made, the model learns nothing from it.
                return None
            deviations = self._deviations(state, own_history)
        else:
            # What is usual is learned from what is not alarming, so an incident does
            # not teach the model that it is normal while it goes on.
            self._learn_rates(flagged)
            if sampled:
                self.population.learn_one(recent)
                for name in MEANS:
                    if name in recent:
                        self.usual_means[name].update(recent[name])
                        self.usual_spread[name].update(recent[name])
                self.learned += 1
            return None
        assert threshold is not None
        evidence = recent_calls("caller", call.caller)
        if call.call_id not in evidence:
            evidence.append(call.call_id)
        return finding(
            spec,
            self.version,
            "caller",
            call.caller,
            raised_at=call.deadline,
            window_start=state.first_ts,
            window_end=call.deadline,
            value=round(z, 3),
            threshold=spec.threshold.min_deviation,
            summary=self._summary(call.caller, state, deviations, own_history, score, threshold),
            evidence=evidence,
        )

    def _summary(
        self,
        caller: str,
        state: CallerState,
        deviations: dict[str, float],
        own_history: bool,
        score: float,
        threshold: float,
    ) -> str:
        n = min(state.calls, self.window)
        parts: list[str] = []
        for name in sorted(deviations, key=lambda f: -abs(deviations[f])):
            if abs(deviations[name]) < 2 or len(parts) == 3:
                continue
            if name in FLAGS:
                i = FLAGS.index(name)
                usual = state.own_rate(i) if own_history else self.rate(i)
                hits = self._hits(state, i)
                parts.append(
                    f"{FLAG_WORDS[name]} {hits} of its last {n} against a usual {usual:.0%} "
                    f"({deviations[name]:.1f} sd)"
                )
            else:
                i = MEANS.index(name)
                usual = (
                    state.own_mean(i) if own_history else float(self.usual_means[name].get() or 0)
                )
                parts.append(
                    f"{FEATURE_NAMES[name]} {state.recent_mean(i):.1f} vs usual {usual:.1f} "
                    f"({deviations[name]:+.1f} sd)"
                )
        if own_history:
            return f"caller {caller} behaves unlike its own history: {'; '.join(parts)}"
        return (
            f"caller {caller} behaves unlike callers at large: {'; '.join(parts)} "
            f"(model score {score:.2f} above its threshold {threshold:.2f})"
        )

    def advance(self, now: float) -> list[ModelFinding]:
        return []

    def wakes_at(self) -> float:
        return math.inf  # judged call by call, never on a step

    def score(self, entity: str) -> float | None:
        """The global model's score of the caller's recent mix, now (scored on demand:
        only rules that ask for it pay for it)."""
        state = self.state.states.get(entity)
        if state is None or state.calls < self.spec.min_calls:
            return None
        return self.population.score_one(self._recent(state))

    def quantile(self, q: float) -> float | None:
        return self.thresholds.get(q)

    def drop_idle(self, now: float) -> int:
        # A caller quiet for a day starts over; its history is what the rules' windows
        # and the lake remember.
        return self.state.drop_idle(lambda s: s.last_ts < now - 86400.0)
