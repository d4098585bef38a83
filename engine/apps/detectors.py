"""Detection wired from the settings: the rules and models under a rule folder, and the
pipeline that runs them. Every process that detects (the lake writer, replay,
backtest) builds it here, and the checks that run before one starts (`rules
validate`, serve's start) read the same files the same way.

The receiver's process imports this module (serve checks the rules with `check_rules`,
which builds no model), and must not load DuckDB, polars, pyarrow, River or SciPy: the
modules that detect are imported inside the functions that build a pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from engine.apps.settings import DetectionSettings, parse_hours, time_zone
from engine.core.yamlfile import YamlFileError

if TYPE_CHECKING:
    from engine.core.yamlfile import YamlDocument
    from engine.detect.feed import FeedSilence
    from engine.detect.pipeline import Pipeline
    from engine.detect.rules import LoadedRules
    from models.spec import ModelSpec

log = logging.getLogger(__name__)

# Entities a rule keeps when it is only checked, never run.
RULE_CHECK_MAX_KEYS = 100


def _read_detectors(
    path: Path, max_keys: int, zone: tzinfo = UTC
) -> tuple[LoadedRules, list[tuple[ModelSpec, YamlDocument]]]:
    from engine.detect.rules import load_rules
    from models.catalogue import catalogue, load_model_specs, models_dir

    problems: list[str] = []
    documents = load_model_specs(models_dir(path), problems)
    loaded = load_rules(path, max_keys=max_keys, models=catalogue(documents, problems), zone=zone)
    return loaded, documents


def check_detectors(path: Path) -> LoadedRules:
    """The rules under `path`, checked with the model files beside them, without building
    a model (nothing here loads River); raises YamlFileError listing every problem."""
    return _read_detectors(path, RULE_CHECK_MAX_KEYS)[0]


def load_detectors(path: Path, max_keys: int, *, models: bool, zone: tzinfo = UTC) -> LoadedRules:
    """Rules and models under `path` (the models in its `models/` folder); raises
    YamlFileError listing every problem of both. `models`: whether the models run
    (their files are checked either way). `zone`: the site's time zone the rules read
    the hour and weekday in (`detection.timezone`)."""
    # The models' state types, for snapshots, whether or not the models run now.
    from models import state_types  # noqa: F401
    from models.registry import build_models

    loaded, documents = _read_detectors(path, max_keys, zone)
    if not models:
        # Rules that ask for a model's score then never fire; say so.
        for rule in loaded.rules.rules:
            if rule.spec.model is not None:
                log.warning(
                    "rule %s needs model %s, and models are off", rule.id, rule.spec.model.model
                )
        return loaded
    return loaded.with_models(build_models(documents, max_keys))


def feed_silence(detection: DetectionSettings) -> FeedSilence | None:
    """The feed-silence check the settings ask for (None: off)."""
    from engine.detect.feed import FeedSilence

    if detection.feed_silence_s <= 0:
        return None
    return FeedSilence(
        detection.feed_silence_s,
        hours=tuple(parse_hours(text) for text in detection.feed_hours),
        zone=time_zone(detection.feed_timezone),
        zone_name=detection.feed_timezone,
        severity=detection.feed_severity,
    )


def use_number_plan(detection: DetectionSettings) -> None:
    """Read the numbers of this process's calls as the settings say (the destination
    fields, engine.detect.numbers)."""
    from engine.detect.numbers import DESTINATIONS

    plan = detection.number_plan()
    if plan != DESTINATIONS.plan or detection.number_cache_size != DESTINATIONS.cache_size:
        DESTINATIONS.use(plan, detection.number_cache_size)


def make_pipeline(detection: DetectionSettings, rules_dir: Path | None = None) -> Pipeline:
    """The detection pipeline with the rules under `rules_dir` (by default the settings'
    rule folder) and the feed-silence check, reading numbers by the settings' plan;
    raises YamlFileError."""
    from engine.detect.calls import CallTracker
    from engine.detect.pipeline import Pipeline

    use_number_plan(detection)

    loaded = load_detectors(
        rules_dir or detection.rules_folder,
        detection.max_keys_per_rule,
        models=detection.models_enabled,
        zone=time_zone(detection.timezone),
    )
    tracker = CallTracker(
        settle_s=detection.settle_s,
        ring_timeout_s=detection.ring_timeout_s,
        max_call_s=detection.max_call_s,
        abandon_s=detection.abandon_s,
        max_open_calls=detection.max_open_calls,
    )
    return Pipeline(loaded.rules, tracker, feed_silence(detection))


def rule_tags(pipeline: Pipeline | None) -> Callable[[str], Sequence[str]]:
    """The tags of the rule with that id in the rules `pipeline` runs now (they may be
    reloaded); none for a model or a system alert."""

    def tags_of(rule_id: str) -> Sequence[str]:
        rule = pipeline.rules.by_id().get(rule_id) if pipeline is not None else None
        return list(rule.spec.tags) if rule is not None else ()

    return tags_of


def check_rules(rules_dir: Path) -> None:
    """Raise YamlFileError listing every problem of the rule set under `rules_dir`, its
    model files and its action files (the receiver's check before it starts: no model
    is built)."""
    from engine.alerts.actionspec import actions_dir, load_actions

    problems: list[str] = []
    try:
        check_detectors(rules_dir)
    except YamlFileError as error:
        problems.extend(error.problems)
    try:
        load_actions(actions_dir(rules_dir))
    except YamlFileError as error:
        problems.extend(error.problems)
    if problems:
        raise YamlFileError(problems)
