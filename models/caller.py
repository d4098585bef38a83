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
from statistics import NormalDist

from engine.detect.calls import Call
from engine.detect.windows import KeyedState
from models.base import ModelFinding, Quiet, RecentCalls, finding, never_quiet
from models.caller_state import DONE, CallerPath, CallerState
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
        # Each menu's share of forwarded calls (see models.caller_state.MENU_FORWARDS).
        self.menu_forwards: dict[str, float] = {}
        self.path = CallerPath(self.state, self.rates, self.menu_forwards, surprise, 0, 0)
        self._derive()
        self._configure()

    def _derive(self) -> None:
        """What the per-call path looks up rather than works out (see `observe`)."""
        # The alerting flags as a mask of a call's flags (bit i: flag i).
        self.alone_mask = sum(1 << i for i in self.alone_flags)
        # A call's flags (bit i: flag i) as new bits of the histories (lane i).
        self.lane_bits = [
            sum(1 << (i * self.window) for i in range(len(FLAGS)) if flagged >> i & 1)
            for flagged in range(1 << len(FLAGS))
        ]

    def _configure(self) -> None:
        """The compiled path takes the spec's settings (again, when a reloaded spec with
        the same logic brings new thresholds)."""
        spec = self.spec
        self.path.configure(
            (
                float(spec.short_s),
                spec.min_calls,
                self.window,
                self.alpha,
                self.keep,
                self.alone_mask,
                float(spec.threshold.min_deviation),
                spec.learn_every,
                2 * spec.trees.window_size,
                spec.own_history_calls,
                bool(self.alone_means),
            ),
            self.lane_bits,
            self.alone_flags,
            self.floors,
        )

    @property
    def judged(self) -> int:
        """Calls judged so far (of callers with `min_calls` calls)."""
        return self.path.judged

    @property
    def learned(self) -> int:
        """Vectors the River model learned so far."""
        return self.path.learned

    def observe(
        self, call: Call, recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> ModelFinding | None:
        # Most calls end in the compiled path (models.caller_state.CallerPath.take); a
        # call sampled for the River model, or unusual, is judged here.
        path = self.path
        flagged = path.take(call)
        if flagged == DONE:
            return None
        return self._judge(call, path.state, flagged, recent_calls, quiet)

    def _hits(self, state: CallerState, flag: int) -> int:
        """How many of the caller's last calls had this flag."""
        return state.hits(flag, self.window)

    def rate(self, flag: int) -> float:
        return self.path.rate(flag)

    def _recent(self, state: CallerState) -> dict[str, float]:
        n = min(state.calls, self.window)
        vector = {FLAGS[i]: self._hits(state, i) / n for i in self.flags}
        for i in self.means:
            vector[MEANS[i]] = state.recent_mean(i)
        return vector

    def _deviations(self, state: CallerState, own_history: bool) -> dict[str, float]:
        spec = self.spec
        n = min(state.calls, self.window)
        deviations = {}
        for i in self.flags:
            name = FLAGS[i]
            rate = self.path.tested_rate(state, i, own_history)
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
        spec, path = self.spec, self.path
        own_history = state.calls >= spec.own_history_calls
        z = path.z  # the flags' strongest surprise (CallerPath.take)
        if self.alone_means:
            deviations = self._deviations(state, own_history)
            for i in self.alone_means:
                z = max(z, abs(deviations[MEANS[i]]))
        unusual = z >= spec.threshold.min_deviation
        # Sampled: one in `learn_every` judged calls (by count, so replay and restarts
        # sample the same ones) once two windows' worth are learned. The global model
        # learns a distribution, and scoring every call would cost more than all the
        # rules.
        sampled = path.sampled
        if not (unusual or sampled):
            path.learn_rates(flagged)
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
            and path.judged >= spec.warmup
            and threshold is not None
            and (own_history or score >= threshold)
        )
        if sampled and path.learned >= spec.trees.window_size:
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
            path.learn_rates(flagged)
            if sampled:
                self.population.learn_one(recent)
                for name in MEANS:
                    if name in recent:
                        self.usual_means[name].update(recent[name])
                        self.usual_spread[name].update(recent[name])
                path.learned += 1
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
