from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.yamlfile import YamlFileError, load_yaml


def test_values_and_the_line_of_every_key(tmp_path: Path) -> None:
    path = tmp_path / "rule.yaml"
    path.write_text(
        "id: short-calls\n"
        "on: yes\n"
        "enabled: true\n"
        "tags:\n"
        "  - fraud\n"
        "  - wangiri\n"
        "aggregate:\n"
        "  window: 3m\n"
        "  threshold: 0x10\n",
        encoding="utf-8",
    )
    document = load_yaml(path)
    # YAML 1.2 booleans: `on` stays a key and `yes` a word; only true/false are booleans.
    assert document.data == {
        "id": "short-calls",
        "on": "yes",
        "enabled": True,
        "tags": ["fraud", "wangiri"],
        "aggregate": {"window": "3m", "threshold": 16},
    }
    assert document.line_of(("tags", 1)) == 6
    assert document.line_of(("aggregate", "threshold")) == 9
    assert document.where(("aggregate", "window", "unknown")) == f"{path}:8"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("id: x\ntitle: [a\n", 3, "expected ','"),
        ("a: 1\n\tb: 2\n", 2, "tab"),
        ("a: b: c\n", 1, "mapping values are not allowed"),
    ],
)
def test_bad_yaml_names_the_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(YamlFileError) as raised:
        load_yaml(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}:{line}: invalid YAML: ")
    assert reason in problem


def test_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(YamlFileError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    path = tmp_path / "gbk.yaml"
    path.write_bytes("title: 账单".encode("gbk"))
    with pytest.raises(YamlFileError, match="not UTF-8"):
        load_yaml(path)
