"""From feature vectors to scores, thresholds and explanations (shared by every model).

- `Baseline`: what is usual for each feature (River exponentially weighted mean and
  variance), and how many spreads a new vector sits from it; the spread has a floor
  per feature so a feature that never moved does not make a wobble look huge.
- `AdaptiveThreshold`: running quantiles of a model's own scores (River's P²
  estimator), so "unusual" means unusual for this model, not a fixed cut-off.
- `AnomalyModel`: River's HalfSpaceTrees over min-max scaled features, the models'
  view of how rare a whole vector is.
- `explain`: the features that moved, in words ("unanswered share 0.83 vs usual 0.22").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from models.river_modules import SCALER, TREES, TREES_NEEDS
from models.river_modules import module as river_module
from models.running_stats import stats
from models.spec import FEATURE_NAMES, HalfSpaceTreesSpec, ModelSpec


def _river_trees(n_trees: int, height: int, window_size: int, seed: int) -> Any:
    """HalfSpaceTrees wants features in [0, 1]: scale with the running min and max first."""
    # River's own classes, from their modules alone (models.river_modules: the anomaly,
    # tree and preprocessing packages' __init__s import SciPy's statistics), and only
    # once a model has filled its first window.
    for name in TREES_NEEDS:
        river_module(name)
    trees, scaler = river_module(TREES), river_module(SCALER)
    return scaler.MinMaxScaler() | trees.HalfSpaceTrees(
        n_trees=n_trees, height=height, window_size=window_size, seed=seed
    )


class AnomalyModel:
    """River's HalfSpaceTrees over min-max scaled features, made when it first needs to be.

    HalfSpaceTrees scores 0 until it has learned `window_size` vectors, and in a River
    pipeline the scaler learns in `learn_one` only (scoring changes nothing). So until
    the first window is full the vectors are only kept; then the River pipeline is made
    and taught them in order. Every score, and the state after, is exactly that of a
    pipeline made at once (tests/test_models.py compares them), while a short replay,
    a quiet menu or a small command never loads River's anomaly package."""

    def __init__(self, trees: HalfSpaceTreesSpec) -> None:
        self.trees = (trees.n_trees, trees.height, trees.window_size, trees.seed)
        self.river: Any = None
        self.pending: list[dict[str, float]] = []

    def learn_one(self, x: Mapping[str, float]) -> None:
        if self.river is not None:
            self.river.learn_one(x)
            return
        self.pending.append(dict(x))
        if len(self.pending) >= self.trees[2]:
            river = _river_trees(*self.trees)
            for vector in self.pending:
                river.learn_one(vector)
            self.river, self.pending = river, []

    def score_one(self, x: Mapping[str, float]) -> float:
        return 0.0 if self.river is None else float(self.river.score_one(x))


class Baseline:
    """The usual value and spread of each feature, learned online."""

    def __init__(self, spec: ModelSpec, fading_factor: float) -> None:
        self.floors = {name: spec.floor(name) for name in spec.features}
        self.means = {name: stats.EWMean(fading_factor) for name in spec.features}
        self.variances = {name: stats.EWVar(fading_factor) for name in spec.features}
        self.learned = 0

    def learn(self, vector: Mapping[str, float]) -> None:
        for name, value in vector.items():
            self.means[name].update(value)
            self.variances[name].update(value)
        self.learned += 1

    def usual(self, name: str) -> float:
        return float(self.means[name].get())

    def deviations(self, vector: Mapping[str, float]) -> dict[str, float]:
        """Signed distance of each feature from its usual value, in spreads."""
        out = {}
        for name, value in vector.items():
            # River's EW variance can come out a hair below zero by rounding.
            variance = max(float(self.variances[name].get()), 0.0)
            spread = max(variance**0.5, self.floors[name])
            out[name] = (value - float(self.means[name].get())) / spread
        return out


class AdaptiveThreshold:
    """Running quantiles of one model's scores."""

    def __init__(self, quantiles: Iterable[float]) -> None:
        self.quantiles = {q: stats.Quantile(q) for q in quantiles}
        self.seen = 0

    def track(self, quantiles: Iterable[float]) -> None:
        """Also track these quantiles from now on (a reloaded spec may ask for more)."""
        for q in quantiles:
            if q not in self.quantiles:
                self.quantiles[q] = stats.Quantile(q)

    def learn(self, score: float) -> None:
        for estimator in self.quantiles.values():
            estimator.update(score)
        self.seen += 1

    def get(self, q: float) -> float | None:
        estimator = self.quantiles.get(q)
        if estimator is None:
            return None
        value = estimator.get()
        return None if value is None else float(value)


def strongest(
    deviations: Mapping[str, float], spec: ModelSpec, *, alone_only: bool = False
) -> tuple[str, float]:
    """The feature furthest from usual (optionally among those that may alert alone)."""
    best, best_z = "", 0.0
    for name, z in deviations.items():
        if alone_only and not spec.features[name].alone:
            continue
        if abs(z) > abs(best_z):
            best, best_z = name, z
    return best, best_z


def _shown(name: str, value: float) -> str:
    if name.endswith("share") or name == "caller_concentration":
        return f"{value:.2f}"
    if name == "volume":
        return f"{value:.1f}x"
    return f"{value:.1f}"


def explain(
    vector: Mapping[str, float],
    deviations: Mapping[str, float],
    baseline: Baseline,
    *,
    min_z: float = 2.0,
    limit: int = 3,
) -> str:
    """The features that moved most, each as `name value vs usual u (z spreads)`."""
    moved = sorted(
        (name for name, z in deviations.items() if abs(z) >= min_z),
        key=lambda name: -abs(deviations[name]),
    )[:limit]
    parts = [
        f"{FEATURE_NAMES[name]} {_shown(name, vector[name])} vs usual "
        f"{_shown(name, baseline.usual(name))} ({deviations[name]:+.1f} sd)"
        for name in moved
    ]
    return "; ".join(parts) if parts else "no single feature moved far"
