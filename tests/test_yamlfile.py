from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.yamlfile import YamlFileError, YamlLimits, load_yaml


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
        ("id: x\nstart: 2026-11-02T94:00:00+00:00\n", 2, "hour must be in 0..23"),
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


@pytest.mark.parametrize(
    ("text", "line", "escape"),
    [
        # An ESC pasted from a terminal into an exception's entity or a list's value.
        ('rule: "r"\nentity: "861\x1b[2J"\nreason: "r"\n', 2, "\\x1b"),
        ("a: 1\n\nb: x\x00\n", 3, "\\x00"),
        ("a: x\ufffe\n", 1, "\\ufffe"),
        # After lines of Chinese menu names: libyaml counts the place in UTF-8 bytes.
        ('# 主菜单 账单查询\n# 主菜单 账单查询\n# 主菜单\nmenu: 1\nname: "a\x1bb"\n', 5, "\\x1b"),
    ],
)
def test_a_control_character_as_it_is_is_one_problem_at_its_line(
    tmp_path: Path, text: str, line: int, escape: str
) -> None:
    path = tmp_path / "pasted.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(YamlFileError) as raised:
        load_yaml(path)
    (problem,) = raised.value.problems
    assert problem == (
        f"{path}:{line}: invalid YAML: character {escape} is not allowed as it is; "
        f'write it as the escape {escape} in a double-quoted string ("...")'
    )
    # The escape it names is one YAML reads.
    written = text.replace("\x1b", "\\x1b").replace("\x00", "\\x00").replace("\ufffe", "")
    path.write_text(written, encoding="utf-8")
    load_yaml(path)


def test_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(YamlFileError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    path = tmp_path / "gbk.yaml"
    path.write_bytes("title: 账单".encode("gbk"))
    with pytest.raises(YamlFileError, match="not UTF-8"):
        load_yaml(path)


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """`levels` anchors, each a list of `width` aliases of the one before: a few hundred
    bytes that expand to width ** levels values when built (9 ** 9: 387 million)."""
    lines = ["a0: &a0 [x]"]
    for level in range(1, levels + 1):
        aliases = ", ".join(f"*a{level - 1}" for _ in range(width))
        lines.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_its_first_alias(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(), encoding="utf-8")
    assert path.stat().st_size < 500
    with pytest.raises(YamlFileError) as raised:
        load_yaml(path)
    assert raised.value.problems == [
        f"{path}:2: aliases (*a0) are not accepted; write the value out"
    ]


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    # Not even YAML: the size alone decides.
    path.write_bytes(b"values: [" + b"'1'," * 300 + b"\x00")
    with pytest.raises(YamlFileError, match=r"larger than 1,000 bytes"):
        load_yaml(path, YamlLimits(max_bytes=1000))


@pytest.mark.parametrize(
    ("text", "limits", "message"),
    [
        ("values: [" + "1, " * 50 + "1]\n", YamlLimits(max_nodes=40), "more than 40 values"),
        ("a: " + "[" * 70 + "]" * 70 + "\n", YamlLimits(), "nested deeper than 64 levels"),
        ("a: " + "{b: " * 30 + "1" + "}" * 30 + "\n", YamlLimits(max_depth=10), "deeper than 10"),
    ],
)
def test_values_and_nesting_are_bounded(
    tmp_path: Path, text: str, limits: YamlLimits, message: str
) -> None:
    path = tmp_path / "shape.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(YamlFileError) as raised:
        load_yaml(path, limits)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}:1: ")
    assert message in problem


def test_a_list_of_a_hundred_thousand_prefixes_is_within_the_default_limits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prefixes.yaml"
    values = "".join(f"  - '{882_000_000 + n}'\n" for n in range(100_000))
    path.write_text(f"name: irsf\nvalues:\n{values}", encoding="utf-8")
    document = load_yaml(path)
    assert len(document.data["values"]) == 100_000
    assert document.line_of(("values", 99_999)) == 100_002


def test_a_value_that_fits_no_member_of_a_union_is_one_problem_in_plain_words(
    tmp_path: Path,
) -> None:
    # `group_by: calller` gave two lines naming pydantic's types
    # (`aggregate.group_by.literal['caller',...]` and `...list[literal[...]]: Input
    # should be a valid list`).
    from engine.detect.rules import load_rules

    text = (Path(__file__).parent.parent / "rules" / "short-calls-caller.yaml").read_text()
    path = tmp_path / "rule.yaml"
    path.write_text(text.replace("group_by: caller", "group_by: calller"))
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError) as raised:
        load_rules(path)
    line = text.splitlines().index(
        next(row for row in text.splitlines() if "group_by: caller" in row)
    )
    assert raised.value.problems == [
        f"{path}:{line + 1}: aggregate.group_by: Input should be 'caller', 'menu', 'forward', "
        "'callee', 'switch', 'caller_country', 'callee_country' or 'forward_country'"
    ]


def test_every_member_of_a_union_that_names_its_values_is_heard(tmp_path: Path) -> None:
    # Keeping the first member's error alone dropped `sum`'s own fields from the message.
    from engine.detect.rules import load_rules

    path = tmp_path / "rule.yaml"
    path.write_text(
        "id: r\ntitle: t\nseverity: low\n"
        "aggregate: {type: sum, group_by: caller, window: 5m, field: talks}\n"
        "condition: {threshold: 1}\n"
    )
    (tmp_path / "lists").mkdir()
    with pytest.raises(YamlFileError) as raised:
        load_rules(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}:4: aggregate.field: Input should be 'caller', ")
    assert problem.endswith("; Input should be 'ring_s' or 'talk_s'")
