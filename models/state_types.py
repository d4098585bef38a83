"""How the models' state is written in detection snapshots: a stable state type per
class (see engine.detect.state). A model's spec is not written: it comes from its
YAML file when the snapshot is restored (a model whose logic changed starts cold)."""

from __future__ import annotations

from typing import Any

from engine.detect.state import register_state_type
from models.caller import CallerModel
from models.caller_state import CallerState
from models.menu import CallWindow, MenuModel, MenuState, MenuTraffic, SeasonalVolume
from models.scoring import AdaptiveThreshold, AnomalyModel, Baseline


def _revive_caller_model(fields: dict[str, Any]) -> CallerModel:
    model = object.__new__(CallerModel)
    model.__dict__.update(fields)
    model._derive()
    return model


# What `_derive` makes from the spec's features is made again, not written.
register_state_type(
    "model.caller",
    CallerModel,
    drop=("spec", "alone_mask", "lane_bits"),
    revive=_revive_caller_model,
)
register_state_type("model.caller-state", CallerState)
register_state_type("model.menu", MenuModel, drop=("spec",))
register_state_type("model.menu-state", MenuState)
register_state_type("model.menu-traffic", MenuTraffic)
register_state_type("model.call-window", CallWindow)
register_state_type("model.seasonal-volume", SeasonalVolume)
register_state_type("model.baseline", Baseline)
register_state_type("model.adaptive-threshold", AdaptiveThreshold)
register_state_type("model.anomaly", AnomalyModel)
