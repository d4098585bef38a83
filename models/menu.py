"""Per-menu traffic: one River anomaly model per IVR menu, fed on an event-time step.

Every `step` of event time, each menu's calls finished within the last `window`
become one feature vector: volume against what is usual for that hour of the
day (a seasonal baseline, so the daily rhythm is not an anomaly), answer share,
short-call share, mean ring time, talk time, how concentrated the callers are,
and the forwarded share. A scaled HalfSpaceTrees learns the menu's usual
vectors; an EW baseline per feature says which features moved and how far.
A menu's calls within the window are kept by models/menu_traffic.py (compiled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.detect.calls import Call
from models.base import ModelFinding, Quiet, RecentCalls, finding, never_quiet
from models.menu_traffic import CALLER_BUCKETS, MenuTraffic
from models.scoring import AdaptiveThreshold, AnomalyModel, Baseline, explain, strongest
from models.spec import FEATURE_NAMES, ModelSpec


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
        state.traffic.take(call, self.spec.short_s)
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
        return finding(
            spec,
            self.version,
            "menu",
            menu_id,
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
