"""How the models' state is written in detection snapshots: a stable state type per
class (see engine.detect.state). A model's spec is not written: it comes from its
YAML file when the snapshot is restored (a model whose logic changed starts cold)."""

from __future__ import annotations

from typing import Any

from engine.detect.state import register_state_type
from models.caller import CallerModel, surprise
from models.caller_state import CallerPath, CallerState
from models.forward import ForwardModel, ForwardNumber, Rates, detector_state, revive_detector
from models.menu import MenuModel, MenuState, SeasonalVolume
from models.menu_traffic import CallWindow, MenuTraffic
from models.scoring import AdaptiveThreshold, AnomalyModel, Baseline

# What `_derive` makes from the spec's features, and the compiled per-call path, are
# made again, not written (the path's counts are written as the model's); the spec
# comes from the model's file.
_CALLER_DERIVED = ("alone_mask", "lane_bits", "path")


def _caller_model_state(model: CallerModel) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in vars(model).items():
        if name not in _CALLER_DERIVED and name != "spec":
            fields[name] = value
        if name == "thresholds":
            # Where the counts stood among the fields before the path kept them: the
            # same state is written as the same bytes.
            fields["judged"], fields["learned"] = model.judged, model.learned
    fields.setdefault("judged", model.judged)
    fields.setdefault("learned", model.learned)
    return fields


def _revive_caller_model(fields: dict[str, Any]) -> CallerModel:
    model = object.__new__(CallerModel)
    # New state since the snapshots of 2026-12-05 (v2-v4): their menus' shares of
    # forwarded calls are learned afresh.
    model.menu_forwards = {}
    fields = {name: value for name, value in fields.items() if name not in _CALLER_DERIVED}
    judged, learned = int(fields.pop("judged")), int(fields.pop("learned"))
    model.__dict__.update(fields)
    model.path = CallerPath(
        model.state, model.rates, model.menu_forwards, surprise, judged, learned
    )
    model._derive()
    if "spec" in fields:
        model._configure()
    # Otherwise the spec comes from the model's file (models.registry.carry_over), and
    # the path takes its settings then.
    return model


register_state_type(
    "model.caller",
    CallerModel,
    state_of=_caller_model_state,
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


def _forward_number_state(number: ForwardNumber) -> dict[str, Any]:
    fields = dict(vars(number))
    fields["detector"] = detector_state(number.detector)
    return fields


def _revive_forward_number(fields: dict[str, Any]) -> ForwardNumber:
    number = object.__new__(ForwardNumber)
    number.__dict__.update(fields)
    number.detector = revive_detector(fields["detector"])
    return number


register_state_type("model.forward", ForwardModel, drop=("spec",))
register_state_type("model.forward-rates", Rates)
register_state_type(
    "model.forward-number",
    ForwardNumber,
    state_of=_forward_number_state,
    revive=_revive_forward_number,
)
