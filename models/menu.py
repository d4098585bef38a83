"""Per-menu traffic: one River anomaly model per IVR menu, fed on an event-time step.

Every `step` of event time, each menu's calls finished within the last `window`
become one feature vector: volume against what is usual for that hour of the
day (a seasonal baseline, so the daily rhythm is not an anomaly), answer share,
short-call share, mean ring time, talk time, how concentrated the callers are,
and the forwarded share. A scaled HalfSpaceTrees learns the menu's usual
vectors; an EW baseline per feature says which features moved and how far.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from engine.detect.calls import Call
from models.base import ModelFinding, Quiet, RecentCalls, never_quiet
from models.scoring import AdaptiveThreshold, AnomalyModel, Baseline, explain, strongest
from models.spec import FEATURE_NAMES, ModelSpec

# Distinct callers in a menu's window are estimated from counts in this many
# buckets of caller numbers (linear counting): exact enough up to tens of
# thousands of callers, and a flood of invented callers costs the same 64 KiB per
# menu as a quiet day, where a set of callers would grow with the flood.
CALLER_BUCKETS = 16_384


def distinct_estimate(empty_buckets: int, total: int) -> float:
    """Linear counting: distinct callers from how many buckets are still empty.

    >>> round(distinct_estimate(CALLER_BUCKETS - 1000, 2000))  # 1,000 buckets in use
    1032
    >>> distinct_estimate(0, 1_000_000)   # saturated: as many as there were calls
    1000000.0
    """
    if empty_buckets == 0:
        return float(total)
    estimate = -CALLER_BUCKETS * math.log(empty_buckets / CALLER_BUCKETS)
    return float(min(estimate, total))


# A call's flags in a menu's window.
ANSWERED: Final = 1
SHORT: Final = 2
FORWARDED: Final = 4
RANG: Final = 8  # ring_s is known
TALKED: Final = 16  # talk_log is known
# Call ids a finding cites: the newest of the window.
EVIDENCE: Final = 200


class CallWindow:
    """Calls oldest first as columns: time, caller bucket, flags, ring seconds, log of
    talk seconds: 27 bytes a call, where a tuple of Python objects took about 200. A
    menu's window holds every call of its last `window` seconds, so at a flood's
    rate (tens of thousands of calls a second) this is what bounds the model's memory."""

    def __init__(self) -> None:
        self.ts = array("d")
        self.bucket = array("H")
        self.flags = array("B")
        self.ring = array("d")
        self.talk = array("d")
        self.head = 0  # the oldest call still in the window

    def __len__(self) -> int:
        return len(self.ts) - self.head

    def append(self, ts: float, bucket: int, flags: int, ring: float, talk: float) -> None:
        self.ts.append(ts)
        self.bucket.append(bucket)
        self.flags.append(flags)
        self.ring.append(ring)
        self.talk.append(talk)

    def first_ts(self) -> float:
        return self.ts[self.head]

    def calls(self) -> list[tuple[float, int, int, float, float]]:
        """(ts, bucket, flags, ring, talk) of each call in the window, oldest first."""
        head = self.head
        return list(
            zip(
                self.ts[head:],
                self.bucket[head:],
                self.flags[head:],
                self.ring[head:],
                self.talk[head:],
                strict=True,
            )
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallWindow) and self.calls() == other.calls()

    __hash__ = None  # type: ignore[assignment]

    def forget_taken(self) -> None:
        """Let go of the calls before `head` once they are most of the columns."""
        head = self.head
        if head > 4096 and 2 * head > len(self.ts):
            for column in (self.ts, self.bucket, self.flags, self.ring, self.talk):
                del column[:head]
            self.head = 0


class MenuTraffic:
    """A menu's calls within the last window, with their counts and sums kept up to
    date as calls come and go: a step reads them instead of walking the window."""

    def __init__(self) -> None:
        self.pending = CallWindow()  # finished after the last step
        self.pending_ids: deque[str] = deque()
        self.live = CallWindow()
        # The ids of the newest calls of `live`, as many as it holds up to EVIDENCE.
        self.newest_ids: deque[str] = deque(maxlen=EVIDENCE)
        self.total = self.answered = self.short = self.forwarded = 0
        self.rings = self.talks = 0
        self.ring_sum = self.talk_sum = 0.0
        self.callers = array("I", bytes(4 * CALLER_BUCKETS))
        self.empty_buckets = CALLER_BUCKETS

    def add(
        self,
        deadline: float,
        call_id: str,
        bucket: int,
        flags: int,
        ring_s: float | None,
        talk_log: float | None,
    ) -> None:
        """A call finished after the last step (deadlines in order, as calls finish)."""
        if ring_s is not None:
            flags |= RANG
        if talk_log is not None:
            flags |= TALKED
        self.pending.append(deadline, bucket, flags, ring_s or 0.0, talk_log or 0.0)
        self.pending_ids.append(call_id)

    def evidence(self) -> list[str]:
        """The newest call ids of the window (at most EVIDENCE), oldest first."""
        return list(self.newest_ids)

    def move_to(self, at: float, window: float) -> None:
        """The window is now (at - window, at]: calls come in from `pending` and leave
        `live`, each counted as it does (one loop each, the counts in locals: this runs
        twice for every call a menu takes)."""
        pending, live = self.pending, self.live
        cutoff = at - window
        if not (len(pending) and pending.first_ts() <= at) and not (
            len(live) and live.first_ts() <= cutoff
        ):
            return
        total, answered, short, forwarded = self.total, self.answered, self.short, self.forwarded
        rings, talks, ring_sum, talk_sum = self.rings, self.talks, self.ring_sum, self.talk_sum
        callers, empty = self.callers, self.empty_buckets
        ts, buckets, flag_column = pending.ts, pending.bucket, pending.flags
        rings_in, talks_in = pending.ring, pending.talk
        i, end = pending.head, len(ts)
        ids, newest = self.pending_ids, self.newest_ids
        while i < end and ts[i] <= at:
            flags = flag_column[i]
            total += 1
            if flags & ANSWERED:
                answered += 1
            if flags & TALKED:
                talks += 1
                talk_sum += talks_in[i]
            if flags & SHORT:
                short += 1
            if flags & FORWARDED:
                forwarded += 1
            if flags & RANG:
                rings += 1
                ring_sum += rings_in[i]
            bucket = buckets[i]
            before = callers[bucket]
            callers[bucket] = before + 1
            if before == 0:
                empty -= 1
            live.append(ts[i], bucket, flags, rings_in[i], talks_in[i])
            newest.append(ids.popleft())
            i += 1
        pending.head = i
        pending.forget_taken()
        ts, buckets, flag_column = live.ts, live.bucket, live.flags
        rings_out, talks_out = live.ring, live.talk
        i, end = live.head, len(ts)
        while i < end and ts[i] <= cutoff:
            flags = flag_column[i]
            total -= 1
            if flags & ANSWERED:
                answered -= 1
            if flags & TALKED:
                talks -= 1
                talk_sum -= talks_out[i]
            if flags & SHORT:
                short -= 1
            if flags & FORWARDED:
                forwarded -= 1
            if flags & RANG:
                rings -= 1
                ring_sum -= rings_out[i]
            left = callers[buckets[i]] - 1
            callers[buckets[i]] = left
            if left == 0:
                empty += 1
            i += 1
        live.head = i
        live.forget_taken()
        while len(newest) > len(live):  # ids of calls that left the window
            newest.popleft()
        if not len(live):
            # Sums of floats added and taken away drift; start an empty window clean.
            ring_sum = talk_sum = 0.0
        self.total, self.answered, self.short, self.forwarded = total, answered, short, forwarded
        self.rings, self.talks, self.ring_sum, self.talk_sum = rings, talks, ring_sum, talk_sum
        self.empty_buckets = empty


def _hour_of_day(ts: float) -> int:
    """The UTC hour of an epoch time (no leap seconds in epoch time: plain arithmetic).

    >>> from datetime import UTC, datetime
    >>> _hour_of_day(1_790_000_000.0) == datetime.fromtimestamp(1_790_000_000, tz=UTC).hour
    True
    """
    return int(ts // 3600) % 24


class SeasonalVolume:
    """Usual calls per window for each hour of the day (EW over days), falling back
    to the menu's overall usual volume for hours not seen yet."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.by_hour: list[float | None] = [None] * 24
        self.overall: float | None = None

    def expected(self, ts: float) -> float | None:
        hour = _hour_of_day(ts)
        value = self.by_hour[hour]
        return value if value is not None else self.overall

    def learn(self, ts: float, volume: float) -> None:
        hour = _hour_of_day(ts)
        # Within an hour the step feeds many windows; a small alpha keeps each hour
        # slot an average over the days rather than over the last few minutes.
        current = self.by_hour[hour]
        self.by_hour[hour] = volume if current is None else current + 0.02 * (volume - current)
        self.overall = (
            volume if self.overall is None else self.overall + 0.01 * (volume - self.overall)
        )


@dataclass
class MenuState:
    model: AnomalyModel
    usual: Baseline
    seasonal: SeasonalVolume = field(default_factory=SeasonalVolume)
    traffic: MenuTraffic = field(default_factory=MenuTraffic)
    learned: int = 0
    score: float | None = None
    name: str = ""


class MenuModel:
    def __init__(self, spec: ModelSpec, version: str) -> None:
        self.spec = spec
        self.version = version
        self.menus: dict[str, MenuState] = {}
        self.thresholds = AdaptiveThreshold(spec.threshold.quantiles())
        self.next_step: float | None = None

    def observe(
        self, call: Call, recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> ModelFinding | None:
        if not call.menu_id:
            return None
        state = self.menus.get(call.menu_id)
        if state is None:
            state = self.menus[call.menu_id] = MenuState(
                model=AnomalyModel(self.spec.trees),
                # A menu's usual values move over about a hundred steps (~an hour).
                usual=Baseline(self.spec, fading_factor=0.02),
            )
        state.name = call.menu_name
        talk = call.talk_s
        answered = call.answered_at is not None
        short = answered and talk is not None and talk < self.spec.short_s
        state.traffic.add(
            call.deadline,
            call.call_id,
            zlib.crc32(call.caller.encode()) % CALLER_BUCKETS,
            (ANSWERED if answered else 0)
            | (SHORT if short else 0)
            | (FORWARDED if call.forward else 0),
            call.ring_s,
            math.log10(1.0 + talk) if answered and talk is not None else None,
        )
        return None

    def advance(self, now: float) -> list[ModelFinding]:
        if self.next_step is not None and now < self.next_step:
            return []  # called at every report: the common case first
        step = self.spec.step
        if self.next_step is None:
            if not self.menus:
                return []
            self.next_step = math.floor(now / step) * step + step
        findings: list[ModelFinding] = []
        # A long quiet gap is not hundreds of empty steps to learn from: catch up at most
        # a window's worth.
        if now - self.next_step > self.spec.window:
            self.next_step = math.floor((now - self.spec.window) / step) * step + step
        while self.next_step <= now:
            at = self.next_step
            for menu_id in sorted(self.menus):
                finding = self._step(menu_id, self.menus[menu_id], at)
                if finding is not None:
                    findings.append(finding)
            self.next_step = at + step
        return findings

    def wakes_at(self) -> float:
        return -math.inf if self.next_step is None else self.next_step

    def _vector(self, state: MenuState, at: float) -> dict[str, float] | None:
        traffic = state.traffic
        traffic.move_to(at, self.spec.window)
        total = traffic.total
        expected = state.seasonal.expected(at)
        state.seasonal.learn(at, float(total))
        if total < self.spec.min_calls_in_window:
            return None
        everything = {
            "volume": total / max(expected or total, 1.0),
            "answer_share": traffic.answered / total,
            "short_share": traffic.short / total,
            "ring_mean": min(traffic.ring_sum / traffic.rings, 60.0) if traffic.rings else 0.0,
            "talk_log": traffic.talk_sum / traffic.talks if traffic.talks else 0.0,
            "caller_concentration": 1.0 - distinct_estimate(traffic.empty_buckets, total) / total,
            "forward_share": traffic.forwarded / total,
        }
        return {name: everything[name] for name in self.spec.features}

    def _step(self, menu_id: str, state: MenuState, at: float) -> ModelFinding | None:
        spec = self.spec
        vector = self._vector(state, at)
        if vector is None:
            return None
        score = state.model.score_one(vector)
        state.score = score
        deviations = state.usual.deviations(vector)
        feature, z = strongest(deviations, spec, alone_only=True)
        threshold = self.thresholds.get(spec.threshold.quantile)
        warm = state.learned >= spec.warmup and threshold is not None
        alerting = (
            warm
            and threshold is not None
            and abs(z) >= spec.threshold.min_deviation
            and score >= threshold
        )
        if state.learned >= spec.trees.window_size:
            # HalfSpaceTrees scores 0 until its first window is full: not a score to learn.
            self.thresholds.learn(score)
        if not alerting:
            state.model.learn_one(vector)
            state.usual.learn(vector)
            state.learned += 1
            return None
        live = state.traffic.live
        summary = (
            f"menu {menu_id} ({state.name}) looks unlike itself over the last "
            f"{len(live)} calls: {explain(vector, deviations, state.usual)} (model score "
            f"{score:.2f}, threshold {threshold:.2f}; strongest: {FEATURE_NAMES[feature]})"
        )
        return ModelFinding(
            model_id=spec.id,
            version=self.version,
            severity=spec.severity,
            mode=spec.mode,
            suppression=spec.suppression,
            entity_type="menu",
            entity=menu_id,
            raised_at=at,
            window_start=live.first_ts() if len(live) else at - spec.window,
            window_end=at,
            value=round(abs(z), 3),
            threshold=spec.threshold.min_deviation,
            summary=summary,
            evidence=state.traffic.evidence(),
        )

    def score(self, entity: str) -> float | None:
        state = self.menus.get(entity)
        return None if state is None else state.score

    def quantile(self, q: float) -> float | None:
        return self.thresholds.get(q)

    def drop_idle(self, now: float) -> int:
        return 0  # a handful of menus; each keeps its model
