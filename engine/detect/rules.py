"""YAML rules: loading them (every error with file:line, all at once), rule sets, and
the sentences alerts are told in. The schema is in engine.detect.schema, evaluation in
engine.detect.evaluate; their names used elsewhere are exported from here too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, tzinfo
from pathlib import Path

from engine.core.yamlfile import YamlDocument, YamlFileError, parse_file, parse_files_with_ids
from engine.detect.aggregates import UnusualShare
from engine.detect.calls import Call
from engine.detect.conduct import (
    BOUNDS,
    CONDUCT_KEPT,
    MEASURES,
    BehaviourGate,
    BehaviourTest,
    ConductLedger,
)
from engine.detect.detectors import ModelCatalogue, Models, NoModels
from engine.detect.evaluate import CompiledRule, Finding, RuleGroup
from engine.detect.exceptionfiles import (
    EntityException,
    check_exceptions,
    covering,
    exceptions_dir,
    read_exception_files,
)
from engine.detect.fields import SiteClock
from engine.detect.schema import Behaviour, ListSpec, ModelGate, RuleSpec


def _list_references(spec: RuleSpec) -> list[str]:
    names = []
    selections = [spec.selection, spec.aggregate.numerator or {}]
    for selection in selections:
        for matcher in selection.values():
            for ref in (
                matcher.in_list,
                matcher.not_in_list,
                matcher.prefix_list,
                matcher.not_prefix_list,
            ):
                if ref:
                    names.append(ref)
    names.extend(e.list_ for e in spec.exceptions if e.list_)
    return names


@dataclass
class RuleSet:
    rules: list[CompiledRule] = field(default_factory=list)
    lists: dict[str, frozenset[str]] = field(default_factory=dict)
    models: Models = field(default_factory=NoModels)
    # The exception files' exceptions (engine.detect.exceptionfiles): a rule's are
    # handed to the rule, a model's are asked by the pipeline (`model_excepted`).
    exceptions: tuple[EntityException, ...] = ()
    # Callers' conduct, kept when some rule has `behaviour:` (engine.detect.conduct).
    conduct: ConductLedger | None = None

    def __post_init__(self) -> None:
        by_id = self.by_id()
        self._model_until: dict[tuple[str, str], float] = {}
        behaving = [
            rule
            for rule in self.rules
            if rule.spec.behaviour is not None
            or rule.spec.aggregate.numerator_behaviour is not None
        ]
        if behaving and self.conduct is None:
            self.conduct = ConductLedger(max(rule.state.max_keys for rule in behaving))
        for rule in self.rules:
            gates: list[Callable[[Call], bool]] = []
            model = rule.spec.model
            if model is not None:
                gates.append(self.models.gate(model.model, model.above_quantile))
            rule.pregate = None
            if rule.spec.behaviour is not None and self.conduct is not None:
                behaviour = behaviour_gate(rule.spec.behaviour, self.conduct)
                if rule.spec.aggregate.type in ("distinct", "concurrent"):
                    rule.pregate = behaviour
                else:
                    gates.append(behaviour)
            rule.gate = gates[0] if len(gates) == 1 else _all_of(gates) if gates else None
            # `numerator_behaviour:` narrows an `unusual_share`'s hits to the calls of
            # callers it passes (the ledger is made above for such a rule).
            narrowing = rule.spec.aggregate.numerator_behaviour
            if (
                narrowing is not None
                and self.conduct is not None
                and isinstance(rule.aggregate, UnusualShare)
            ):
                rule.aggregate.hit_gate = behaviour_gate(narrowing, self.conduct)
        for exception in self.exceptions:
            if exception.detector == "rule":
                excepted = by_id.get(exception.source)
                if excepted is not None:
                    excepted.except_entity(exception.entity, exception.until)
            else:
                key = (exception.source, exception.entity)
                self._model_until[key] = max(exception.until, self._model_until.get(key, -math.inf))

    def model_excepted(self, model_id: str, entity: str, ts: float) -> bool:
        """Whether an exception file holds `entity` out of `model_id`'s alerts at `ts`."""
        until = self._model_until.get((model_id, entity))
        return until is not None and ts < until

    def exception_for(self, source: str, entity: str, ts: float) -> EntityException | None:
        """The exception file's exception that holds `entity` out of `source` at `ts`."""
        return covering(self.exceptions, source, entity, ts)

    def by_id(self) -> dict[str, CompiledRule]:
        return {rule.id: rule for rule in self.rules}

    def adopt_state_from(self, previous: RuleSet) -> list[str]:
        """Keep window state for rules whose logic did not change; returns their ids,
        the models' that kept theirs, and CONDUCT_KEPT if the callers' conduct was."""
        old = previous.by_id()
        kept = self.models.restore(previous.models.state())
        if self.conduct is not None and previous.conduct is not None:
            self.conduct.take_over(previous.conduct)
            kept.append(CONDUCT_KEPT)
        for rule in self.rules:
            before = old.get(rule.id)
            if before is not None and before.logic == rule.logic:
                rule.adopt_state(before)
                kept.append(rule.id)
        return kept


def behaviour_gate(behaviour: Behaviour, ledger: ConductLedger) -> BehaviourGate:
    """The gate a rule's `behaviour:` makes over the callers' conduct in `ledger`."""
    tests = [
        BehaviourTest(MEASURES.index(name), kind, float(constant))
        for name, bound in behaviour.bounds()
        for kind, key in enumerate(BOUNDS)
        if (constant := getattr(bound, key)) is not None
    ]
    return BehaviourGate(ledger, behaviour.min_calls, tests)


def _all_of(gates: list[Callable[[Call], bool]]) -> Callable[[Call], bool]:
    def gate(call: Call) -> bool:
        return all(each(call) for each in gates)

    return gate


@dataclass
class LoadedRules:
    rules: RuleSet
    specs: list[tuple[RuleSpec, YamlDocument]]
    # The model files the rules' gates were checked against (None: not checked).
    catalogue: ModelCatalogue | None = None

    def with_models(self, models: Models) -> LoadedRules:
        """These rules with `models` running beside them, their gates asking them."""
        rules = self.rules
        return replace(
            self,
            rules=RuleSet(rules.rules, rules.lists, models, rules.exceptions, rules.conduct),
        )


def rule_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.yaml") if p.is_file()) + sorted(
        p for p in path.glob("*.yml") if p.is_file()
    )


def _lists_dir(path: Path) -> Path:
    return (path.parent if path.is_file() else path) / "lists"


def load_lists(folder: Path, problems: list[str]) -> dict[str, frozenset[str]]:
    lists: dict[str, frozenset[str]] = {}
    if not folder.is_dir():
        return lists
    for path in sorted(folder.glob("*.yaml")):
        parsed = parse_file(
            path, ListSpec, problems, "a list (name, description, values or entries)"
        )
        if parsed is None:
            continue
        spec, document = parsed
        if spec.name in lists:
            problems.append(f"{document.where(('name',))}: list {spec.name!r} is defined twice")
        if spec.kind == "country":
            problems.extend(_country_problems(spec, document))
        lists[spec.name] = frozenset(str(v) for v in spec.all_values())
    return lists


def _country_problems(spec: ListSpec, document: YamlDocument) -> list[str]:
    """Each value of a country list that is no region of a numbering plan, at its line."""
    from engine.detect.numbers import REGIONS

    places: list[tuple[str, tuple[str | int, ...]]] = [
        *((value, ("values", index)) for index, value in enumerate(spec.values)),
        *((entry.value, ("entries", index, "value")) for index, entry in enumerate(spec.entries)),
    ]
    return [
        f"{document.where(where)}: {value!r} is no region of a numbering plan (an ISO 3166 "
        f'code in capitals such as CU, or "001" for the non-geographic plans)'
        for value, where in places
        if value not in REGIONS
    ]


def load_rules(
    path: Path,
    *,
    max_keys: int = 200_000,
    models: ModelCatalogue | None = None,
    zone: tzinfo = UTC,
) -> LoadedRules:
    """Load every rule under `path` (a folder or one file), or raise YamlFileError listing
    every problem at once, each as `file:line: key: reason`.

    `models`: the model files (their problems are reported with the rules'); a rule's
    `model:` gate must name one of its enabled models and a quantile it tracks. Without
    it the gates are not checked (rules alone, as in a test of one rule), and the rule
    set has no models, so such a rule never fires: whoever loads the model files
    (engine.apps) puts the models built from them beside the rules (`with_models`).
    `zone`: the site's time zone, in which `hour` and `weekday` are read."""
    problems: list[str] = []
    if not path.exists():
        # The default, `rules`, is relative: run from elsewhere, say where it looked.
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
        raise YamlFileError([f"{path}: no such rule file or folder{where}"])
    lists = load_lists(_lists_dir(path), problems)
    specs = parse_files_with_ids(rule_files(path), RuleSpec, problems, "rule")
    exceptions, exception_problems = check_exceptions(
        read_exception_files(exceptions_dir(path), problems),
        {spec.id: spec.aggregate.entity_type for spec, _ in specs},
        dict(models.kinds) if models is not None else None,
        partial=path.is_file(),
    )
    problems.extend(exception_problems)
    for spec, document in specs:
        for name in _list_references(spec):
            if name not in lists:
                known = ", ".join(sorted(lists)) or "none"
                problems.append(
                    f"{document.path}:{_line_of_value(document, name)}: list {name!r} is not "
                    f"in {_lists_dir(path)} (known: {known})"
                )
    if models is not None:
        problems.extend(models.problems)
        for spec, document in specs:
            if spec.model is not None:
                problems.extend(_gate_problems(spec.model, document, models))
            if spec.id in models.kinds:
                # Alerts, suppression and exceptions name rules and models alike by id.
                problems.append(
                    f"{document.where(('id',))}: id: {spec.id!r} is also the id of a model "
                    "file: give the rule another"
                )
    if problems:
        raise YamlFileError(problems)
    compiled = []
    clock = SiteClock(zone)  # one for the set: its rules read the hour once per call
    for spec, document in specs:
        version = hashlib.sha256(document.path.read_bytes()).hexdigest()[:12]
        compiled.append(
            CompiledRule(
                spec,
                lists,
                source=str(document.path),
                version=version,
                max_keys=max_keys,
                clock=clock,
            )
        )
    return LoadedRules(RuleSet(compiled, lists, exceptions=tuple(exceptions)), specs, models)


def _gate_problems(gate: ModelGate, document: YamlDocument, models: ModelCatalogue) -> list[str]:
    quantiles = models.tracked.get(gate.model)
    if quantiles is None:
        state = "disabled" if gate.model in models.disabled else "unknown"
        return [
            f"{document.where(('model', 'model'))}: model.model: {state} model "
            f"{gate.model!r} (enabled: {', '.join(sorted(models.tracked)) or 'none'})"
        ]
    if gate.above_quantile not in quantiles:
        return [
            f"{document.where(('model', 'above_quantile'))}: model.above_quantile: model "
            f"{gate.model!r} tracks the quantiles {list(quantiles)}; add "
            f"{gate.above_quantile} to its threshold.also_track"
        ]
    return []


def _line_of_value(document: YamlDocument, value: str) -> int:
    for number, line in enumerate(document.path.read_text(encoding="utf-8").splitlines(), 1):
        if value in line:
            return number
    return 1


def describe_window(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def summary_of(finding: Finding) -> str:
    rule = finding.rule
    spec = rule.spec
    value = finding.value
    if spec.aggregate.type == "ratio":
        shown = f"{value:.0%}"
    elif spec.aggregate.type == "baseline_spike":
        shown = f"{value:.1f}"
    else:
        shown = f"{value:.2f}" if not float(value).is_integer() else f"{int(value)}"
    condition = spec.condition
    crossed = condition.threshold if finding.critical else condition.entry
    values = {
        "entity": finding.entity,
        "entity_type": spec.aggregate.entity_type,
        "value": shown,
        "threshold": f"{crossed:g}",
        "window": describe_window(rule.window_s),
        "title": spec.title,
        "level": finding.level,
    }
    if spec.summary:
        try:
            return spec.summary.format(**values)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            # Refused at validation (schema.SUMMARY_FIELDS); a rule object made
            # without validation still gets a sentence rather than a crash.
            pass
    levels = ""
    if condition.warning is not None:
        levels = (
            " (critical)"
            if finding.critical
            else f" (warning; critical at {condition.op} {condition.threshold:g})"
        )
    return (
        f"{values['entity_type']} {finding.entity}: {spec.title.lower()}: {shown} "
        f"({spec.aggregate.type}) within {values['window']}, threshold {spec.condition.op} "
        f"{values['threshold']}{levels}"
    )


__all__ = [
    "CompiledRule",
    "Finding",
    "LoadedRules",
    "RuleGroup",
    "RuleSet",
    "RuleSpec",
    "load_rules",
    "summary_of",
]
