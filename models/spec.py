"""What a tuner writes in `rules/models/*.yaml`: one model per file, strict like rules.

A model file names the model (its `id` is the alerts' `rule_id`), which entity it
watches (`kind: caller`, `kind: menu` or `kind: forward`), the features it looks at, how far a
feature must move before it may explain an alert, the adaptive threshold (a
running quantile of the model's own scores), the warm-up, and suppression.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.core.durations import Duration

CallerFeature = Literal[
    "short_share",
    "unanswered_share",
    "ring_mean",
    "talk_log",
    "forward_share",
    "callee_change_share",
]
MenuFeature = Literal[
    "volume",
    "answer_share",
    "short_share",
    "ring_mean",
    "talk_log",
    "caller_concentration",
    "forward_share",
]

CALLER_FEATURES: tuple[str, ...] = get_args(CallerFeature)
MENU_FEATURES: tuple[str, ...] = get_args(MenuFeature)
# Forward models watch one thing per number: its answered calls per step of event time.
ForwardFeature = Literal["volume"]
FORWARD_FEATURES: tuple[str, ...] = get_args(ForwardFeature)

# What each feature is, for summaries and explanations.
FEATURE_NAMES: dict[str, str] = {
    "short_share": "short-call share",
    "unanswered_share": "unanswered share",
    "ring_mean": "mean ring time (s)",
    "talk_log": "talk time (log10 s)",
    "forward_share": "forwarded share",
    "callee_change_share": "share of calls to a different callee than the last",
    "volume": "volume against its usual for the hour",
    "answer_share": "answer share",
    "caller_concentration": "caller concentration",
}

# Smallest spread a feature's baseline is allowed, so a feature that never moved
# (a share that was always 0) does not turn the first small wobble into a huge z.
DEFAULT_FLOORS: dict[str, float] = {
    "short_share": 0.08,
    "unanswered_share": 0.08,
    "ring_mean": 1.5,
    "talk_log": 0.25,
    "forward_share": 0.08,
    "callee_change_share": 0.1,
    "volume": 0.5,
    "answer_share": 0.08,
    "caller_concentration": 0.08,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Strict):
    # A feature with `alone: false` may back up an alert but never make one by itself
    # (a menu's volume: a marketing campaign triples it, and that is no fraud).
    alone: bool = True
    floor: float | None = Field(default=None, gt=0)


class HalfSpaceTreesSpec(_Strict):
    n_trees: int = Field(default=15, ge=1, le=100)
    height: int = Field(default=4, ge=1, le=15)
    window_size: int = Field(default=60, ge=10, le=10_000)
    seed: int = 42


class ThresholdSpec(_Strict):
    # A score must be above this running quantile of the model's own scores...
    quantile: float = Field(default=0.99, gt=0.5, lt=1)
    # ...and some feature at least this many spreads from its usual value.
    min_deviation: float = Field(default=4.0, gt=0)
    # Further quantiles that rules may refer to (`model: {quantile: ...}`).
    also_track: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ThresholdSpec:
        for q in self.also_track:
            if not 0.5 < q < 1:
                raise ValueError(f"tracked quantile {q} must be between 0.5 and 1")
        return self

    def quantiles(self) -> list[float]:
        return sorted({self.quantile, *self.also_track})


# A forward number quiet for `forget_after` closes at most that many empty steps at
# its next call: bounded, so a tiny step cannot make one call cost millions of them.
MAX_FORWARD_STEPS = 10_000


class DriftSpec(_Strict):
    """A forward model's River PageHinkley per number (mode "up": increases only), fed
    the variance-stabilised count of each step (2 * sqrt(count + 3/8), about one unit
    of spread whatever the rate), so `delta` and `threshold` are in spreads."""

    # Steps a detector must have seen (since it started or last fired) before it fires.
    min_instances: int = Field(default=3, ge=1, le=10_000)
    # How far a step must sit above the number's running mean to count as a rise.
    delta: float = Field(default=0.3, ge=0, le=100)
    # The accumulated rise at which the detector fires.
    threshold: float = Field(default=5.0, gt=0, le=10_000)
    # For how long after it fired a number may be alerted on (the rate and growth
    # conditions may hold a few steps later than the detector fires).
    hold: Duration = Field(default=3600.0, ge=0)


class RampSpec(_Strict):
    """When a forward number's rise is a ramp worth an alert."""

    # The recent rate: an EW mean of the counts per step with this half-life...
    fast: Duration = Field(default=600.0, gt=0)
    # ...against the number's usual rate: the mean of its first `first_steps` steps
    # (from its first call), then an EW mean with this half-life.
    slow: Duration = Field(default=3600.0, gt=0)
    first_steps: int = Field(default=10, ge=1, le=10_000)
    first_calls: int = Field(default=5, ge=0, le=10_000)
    # A number's steps within this long of its first call are not learned: calls are
    # counted when they finish, a talk time after they were answered, so a number's
    # counts rise from nothing over its first minutes whatever its true rate.
    settle: Duration = Field(default=600.0, ge=0)
    # The recent rate must reach this many calls an hour...
    min_rate_per_hour: float = Field(default=20.0, gt=0)
    # ...and be this many times the usual one, times the largest of: the forward
    # numbers' usual growth (River's rolling `peer_quantile` over the latest
    # `peer_window` growths of numbers at steps they took calls), the growth of its
    # menu's calls that go to no forward number, and the middle growth of the other
    # forward numbers of its menu that took calls lately (a campaign that fills a menu,
    # or the morning's rise, lifts them all)...
    min_growth: float = Field(default=1.5, gt=1)
    peer_quantile: float = Field(default=0.5, gt=0, lt=1)
    peer_window: int = Field(default=200, ge=5, le=100_000)
    # ...and this many spreads above it (the spread the recent rate would have by
    # chance, were the calls Poisson at the usual rate)...
    min_z: float = Field(default=4.0, ge=0, le=1000)
    # ...for this many steps with calls in a row.
    confirm_steps: int = Field(default=3, ge=1, le=1000)
    # A rate never counts as less than this many calls an hour (a quiet number's usual
    # rate of nearly nothing does not make every call a huge growth).
    floor_per_hour: float = Field(default=1.0, gt=0)


class ModelSpec(_Strict):
    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    title: str = Field(min_length=1)
    description: str = ""
    kind: Literal["caller", "menu", "forward"]
    enabled: bool = True
    severity: Literal["low", "medium", "high", "critical"] = "medium"
    mode: Literal["alert", "shadow"] = "alert"
    features: dict[str, FeatureSpec] = Field(min_length=1)
    threshold: ThresholdSpec = Field(default_factory=ThresholdSpec)
    trees: HalfSpaceTreesSpec = Field(default_factory=HalfSpaceTreesSpec)
    # Caller models: a caller is judged once it made this many calls, on its last
    # `recent_calls` calls (at most 13: four flags' histories share the 52 exact
    # bits of one double).
    min_calls: int = Field(default=8, ge=2)
    recent_calls: int = Field(default=12, ge=2, le=13)
    # The global model over callers learns from one judged vector in this many.
    learn_every: int = Field(default=4, ge=1)
    # Past this many calls a caller is judged against its own history, not the
    # population's (a robot that always makes short calls is normal for itself).
    own_history_calls: int = Field(default=50, ge=10)
    # An answered call shorter than this is a short call.
    short_s: Duration = 5.0
    # Menu models: a feature vector every `step` over the last `window` of calls,
    # judged when that window holds at least `min_calls_in_window` calls.
    step: Duration = 30.0
    window: Duration = 300.0
    min_calls_in_window: int = Field(default=20, ge=1)
    # Before it has judged this many vectors (menu models: per menu), a model scores
    # but never alerts.
    warmup: int = Field(default=120, ge=10)
    suppression: Duration = 3600.0
    # Forward models: the number's River drift detector and the ramp's conditions
    # (`step` is then the length of one count), how many numbers are tracked at most
    # (the least recently called go first), and how long an idle one is kept.
    drift: DriftSpec = Field(default_factory=DriftSpec)
    ramp: RampSpec = Field(default_factory=RampSpec)
    max_numbers: int = Field(default=10_000, ge=1, le=10_000_000)
    forget_after: Duration = 21600.0

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        allowed = {
            "caller": CALLER_FEATURES,
            "menu": MENU_FEATURES,
            "forward": FORWARD_FEATURES,
        }[self.kind]
        for name in self.features:
            if name not in allowed:
                raise ValueError(
                    f"feature {name!r} is not a {self.kind} feature (known: {', '.join(allowed)})"
                )
        if not any(f.alone for f in self.features.values()):
            raise ValueError("at least one feature must be able to raise an alert alone")
        if self.kind == "menu" and self.window < self.step:
            raise ValueError("the window must be at least one step long")
        if self.step <= 0:
            raise ValueError("the step must be longer than nothing")
        if self.kind == "forward" and self.ramp.slow < self.ramp.fast:
            raise ValueError("ramp.slow must be at least as long as ramp.fast")
        if self.kind == "forward":
            if self.step < 10:
                raise ValueError("a forward model's step must be at least 10s")
            if not self.step <= self.forget_after <= MAX_FORWARD_STEPS * self.step:
                raise ValueError(
                    f"forget_after must be between one step and {MAX_FORWARD_STEPS} steps"
                )
        return self

    def floor(self, feature: str) -> float:
        spec = self.features[feature]
        return spec.floor if spec.floor is not None else DEFAULT_FLOORS[feature]
