"""The model files as rules see them, read without building a model (no River): where
they are, what each learns from (`model_logic`), and the catalogue rules are checked
against (engine.detect.detectors.ModelCatalogue). models.registry builds the models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from engine.core.yamlfile import YamlDocument, parse_files_with_ids
from engine.detect.detectors import ModelCatalogue
from models.spec import ModelSpec

MODELS_FOLDER = "models"


def models_dir(rules_path: Path) -> Path:
    return (rules_path.parent if rules_path.is_file() else rules_path) / MODELS_FOLDER


def model_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def model_logic(spec: ModelSpec) -> str:
    # What the model learns from and how: a changed title or threshold keeps its state.
    logic = spec.model_dump(
        include={
            "kind",
            "features",
            "trees",
            "recent_calls",
            "short_s",
            "step",
            "window",
            "min_calls",
            "min_calls_in_window",
        }
    )
    return hashlib.sha256(json.dumps(logic, sort_keys=True).encode()).hexdigest()[:16]


def load_model_specs(folder: Path, problems: list[str]) -> list[tuple[ModelSpec, YamlDocument]]:
    return parse_files_with_ids(model_files(folder), ModelSpec, problems, "model")


def catalogue(
    documents: list[tuple[ModelSpec, YamlDocument]], problems: Iterable[str] = ()
) -> ModelCatalogue:
    """What rules may refer to (engine.detect.rules.load_rules checks their gates
    against it); `problems`: those found reading the model files."""
    return ModelCatalogue(
        tracked={s.id: tuple(s.threshold.quantiles()) for s, _ in documents if s.enabled},
        disabled=frozenset(s.id for s, _ in documents if not s.enabled),
        problems=tuple(problems),
        kinds={s.id: s.kind for s, _ in documents},
    )
