"""Loading the model files and running the enabled models side by side.

`rules/models/*.yaml`, one model per file, validated like rules (every problem
at once, each with file:line). A reload keeps the learned state of models whose
file did not change in substance, like rules keep their windows. `ModelSet` is
the set of models detection drives (engine.detect.detectors.Models), `catalogue`
what the rules may refer to.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.core.yamlfile import YamlDocument
from engine.detect.calls import Call
from engine.detect.detectors import Gate
from models.base import Model, ModelFinding, Quiet, RecentCalls, never_quiet
from models.caller import CallerModel
from models.catalogue import model_logic
from models.forward import ForwardModel
from models.menu import MenuModel
from models.spec import ModelSpec


def build(spec: ModelSpec, version: str, max_keys: int) -> Model:
    if spec.kind == "caller":
        return CallerModel(spec, version, max_keys)
    if spec.kind == "forward":
        return ForwardModel(spec, version)
    return MenuModel(spec, version)


def carry_over(learned: Model, loaded: Model) -> Model:
    """Same learning, new wording or thresholds: keep what the old one learned."""
    learned.spec, learned.version = loaded.spec, loaded.version
    learned.thresholds.track(loaded.spec.threshold.quantiles())
    if isinstance(learned, CallerModel) and isinstance(loaded, CallerModel):
        learned.state.max_keys = loaded.state.max_keys  # the current setting applies
        learned._configure()  # min_deviation, learn_every... are not its logic
    return learned


@dataclass
class ModelSet:
    """The enabled models, run side by side (engine.detect.detectors.Models)."""

    models: list[Model] = field(default_factory=list)
    # No model has work to do in `advance` before this event time: detection asks
    # only from then on (it moves time at nearly every report). -inf after `models`
    # changes.
    due: float = -math.inf

    def __len__(self) -> int:
        return len(self.models)

    def by_id(self) -> dict[str, Model]:
        return {model.spec.id: model for model in self.models}

    def gate(self, model_id: str, q: float) -> Gate:
        """A rule condition: the model's latest score for the call's caller (caller
        models), menu (menu models) or forward number (forward models) is above the
        model's running `q` quantile."""

        def above(call: Call) -> bool:
            model = self.by_id().get(model_id)
            if model is None:
                return False
            kind = model.spec.kind
            entity = (
                call.caller
                if kind == "caller"
                else call.forward
                if kind == "forward"
                else call.menu_id
            )
            score = model.score(entity)
            bound = model.quantile(q)
            return score is not None and bound is not None and score >= bound

        return above

    def observe(
        self, calls: Iterable[Call], recent_calls: RecentCalls, quiet: Quiet = never_quiet
    ) -> list[ModelFinding]:
        findings = []
        for call in calls:
            for model in self.models:
                finding = model.observe(call, recent_calls, quiet)
                if finding is not None:
                    findings.append(finding)
        return findings

    def advance(self, now: float) -> list[ModelFinding]:
        findings: list[ModelFinding] = []
        if now < self.due:
            return findings
        for model in self.models:
            findings.extend(model.advance(now))
        self.due = min((model.wakes_at() for model in self.models), default=math.inf)
        return findings

    def drop_idle(self, now: float) -> int:
        return sum(model.drop_idle(now) for model in self.models)

    def state(self) -> dict[str, Any]:
        # The format snapshots have held since models were added: id -> (logic, model).
        return {model.spec.id: (model_logic(model.spec), model) for model in self.models}

    def restore(self, saved: dict[str, Any]) -> list[str]:
        kept = []
        for index, model in enumerate(self.models):
            before = saved.get(model.spec.id)
            if before is not None and before[0] == model_logic(model.spec):
                self.models[index] = carry_over(before[1], model)
                kept.append(model.spec.id)
        self.due = -math.inf  # the models taken up say when they are due
        return kept

    def adopt_state_from(self, previous: ModelSet) -> list[str]:
        return self.restore(previous.state())

    def unlearned(self, model_id: str, max_keys: int) -> ModelSet:
        return ModelSet(
            [build(m.spec, m.version, max_keys) for m in self.models if m.spec.id == model_id]
        )


def build_models(documents: list[tuple[ModelSpec, YamlDocument]], max_keys: int) -> ModelSet:
    models: list[Model] = []
    for spec, document in documents:
        if not spec.enabled:
            continue
        version = hashlib.sha256(document.path.read_bytes()).hexdigest()[:12]
        models.append(build(spec, version, max_keys))
    return ModelSet(models)
