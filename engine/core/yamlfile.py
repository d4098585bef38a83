"""YAML with line numbers: load a file and map a key path back to the line it is on.

Scenario and rule files are validated by pydantic models; their errors carry a
key path (`incidents.2.params.calls`), and this turns it into
`data/scenarios/day.yaml:31`. A tuner reads a place, not a traceback.

A file is read only within `YamlLimits`: its size, its number of nodes and how deep
they nest are bounded before anything is built from it, and aliases (`*name`) are
refused, so a small file cannot expand into gigabytes (an "alias bomb") and a huge
one is refused before it is parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


# libyaml's parser where PyYAML was built with it (the wheels are): faster than the
# pure-Python one, with the same nodes, marks and errors.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as
    booleans, which would turn a rule's `on:` key into `True`.

    A value that looks like a timestamp or a number but is none (`2026-11-02T94:00`)
    fails as the value's own error at its line, not as a ValueError from deep inside
    the constructor."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as error:
            value = repr(node.value)[:60] if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid value {value}: {error}", node.start_mark
            ) from None


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass(frozen=True)
class YamlLimits:
    """What a rule, list, model or scenario file may hold. The default size allows a
    list of a few hundred thousand destination prefixes."""

    max_bytes: int = 16 * 1024 * 1024
    max_nodes: int = 2_000_000
    max_depth: int = 64

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_nodes, self.max_depth) < 1:
            raise ValueError("YAML limits must be positive")


DEFAULT_LIMITS = YamlLimits()


class YamlFileError(Exception):
    """A YAML file is unreadable or invalid; each problem is `path:line: reason`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class YamlDocument:
    path: Path
    data: Any
    lines: dict[tuple[str | int, ...], int]

    def path_of(self, loc: Sequence[str | int]) -> tuple[str | int, ...]:
        """`loc` without the parts that are not in the file (pydantic inserts the
        tag of a tagged union, e.g. `incidents.0.callback_abuse.calls`)."""
        path: tuple[str | int, ...] = ()
        for part in loc:
            if (*path, part) in self.lines or not self._is_tag(path, part):
                path = (*path, part)
        return path

    def _is_tag(self, path: tuple[str | int, ...], part: str | int) -> bool:
        if isinstance(part, str) and _MEMBER_TAG.match(part):
            return True  # a member of a union that is not tagged: its type, in pydantic's words
        node: Any = self.data
        for step in path:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                return False
        return isinstance(node, dict) and part in node.values() and part not in node

    def line_of(self, loc: Sequence[str | int]) -> int:
        """The line of the deepest key along `loc` that is in the file (1-based)."""
        key = self.path_of(loc)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), 1)

    def where(self, loc: Sequence[str | int]) -> str:
        return f"{self.path}:{self.line_of(loc)}"


def _walk(
    node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]
) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _walk(item, (*path, index), lines)


def _read_text(path: Path, limits: YamlLimits) -> str:
    try:
        with path.open("rb") as handle:
            raw = handle.read(limits.max_bytes + 1)
    except OSError as error:
        raise YamlFileError([f"{path}: cannot read: {error.strerror or error}"]) from None
    if len(raw) > limits.max_bytes:
        raise YamlFileError(
            [f"{path}: larger than {limits.max_bytes:,} bytes, the most a file here may hold"]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise YamlFileError([f"{path}:{line}: not UTF-8 text"]) from None


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 1


def _check_shape(path: Path, text: str, limits: YamlLimits) -> None:
    """Refuse aliases, and more nodes or deeper nesting than `limits` allow, from the
    parser's events (flat: nothing is built, nothing recurses)."""
    nodes = depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            line = _line(event)
            raise YamlFileError(
                [f"{path}:{line}: aliases (*{event.anchor}) are not accepted; write the value out"]
            )
        if isinstance(event, yaml.ScalarEvent):
            nodes += 1
        elif isinstance(event, yaml.CollectionStartEvent):
            nodes += 1
            depth += 1
            if depth > limits.max_depth:
                line = _line(event)
                raise YamlFileError(
                    [f"{path}:{line}: nested deeper than {limits.max_depth} levels"]
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if nodes > limits.max_nodes:
            line = _line(event)
            raise YamlFileError([f"{path}:{line}: more than {limits.max_nodes:,} values"])


def _invalid(path: Path, error: yaml.YAMLError, text: str) -> YamlFileError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        line = mark.line + 1 if mark is not None else 1
        return YamlFileError([f"{path}:{line}: invalid YAML: {error.problem}"])
    if isinstance(error, yaml.reader.ReaderError):
        # A control character written as it is (an ESC pasted from a terminal, a NUL):
        # PyYAML says it at a character offset, over two lines; said here at its line,
        # with the escape that writes it.
        character = error.character
        code = character if isinstance(character, int) else ord(character)
        # Its first place in the text is where the reader stopped: libyaml's position
        # counts UTF-8 bytes, PyYAML's characters, so neither is used.
        line = text.count("\n", 0, max(text.find(chr(code)), 0)) + 1
        escape = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        return YamlFileError(
            [
                f"{path}:{line}: invalid YAML: character {escape} is not allowed as it is; "
                f'write it as the escape {escape} in a double-quoted string ("...")'
            ]
        )
    return YamlFileError([f"{path}: invalid YAML: {_one_line(str(error))}"])


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def load_yaml(path: Path, limits: YamlLimits = DEFAULT_LIMITS) -> YamlDocument:
    text = _read_text(path, limits)
    try:
        _check_shape(path, text, limits)
    except yaml.YAMLError as error:
        raise _invalid(path, error, text) from None
    loader = _Loader(text)
    try:
        # One parse: the node tree gives the lines, and the data is built from it.
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        raise _invalid(path, error, text) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str | int, ...], int] = {}
    if node is not None:
        _walk(node, (), lines)
    return YamlDocument(path, data, lines)


# How pydantic names the member of a union that an error is about, in its `loc`:
# `literal['caller','menu']`, `list[literal[...]]`, `function-after[...]`, `str`...
_MEMBER_TAG = re.compile(r"^(?:[a-z][a-z_-]*\[.*\]|str|int|float|bool|none)$", re.DOTALL)


def _mismatch(kind: str) -> bool:
    """A union member's error that says only that the value is not of its type."""
    return kind.endswith(("_type", "_parsing"))


def validation_problems(document: YamlDocument, error: ValidationError) -> list[str]:
    problems: list[str] = []
    # A value that fits no member of a union fails each member. Said once per place:
    # what the members that name their values want ("Input should be 'caller', 'menu'
    # ..."), each once, and only where every member fails on its type alone, those
    # types together ("Input should be a valid string; Input should be a valid number").
    unions: dict[tuple[str | int, ...], list[tuple[str, str]]] = {}
    slots: dict[tuple[str | int, ...], int] = {}  # where each union's problem goes
    for problem in error.errors():
        loc = document.path_of(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if any(isinstance(part, str) and _MEMBER_TAG.match(part) for part in problem["loc"]):
            if loc not in unions:
                unions[loc], slots[loc] = [], len(problems)
                problems.append("")  # filled in below, once every member has spoken
            unions[loc].append((problem["type"], message))
            continue
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "union_tag_invalid":
            ctx = problem.get("ctx", {})
            tag = str(ctx.get("discriminator", "")).strip("'")
            loc = (*loc, tag)
            message = f"unknown {tag} {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
        key = ".".join(str(part) for part in loc) or "(top level)"
        problems.append(f"{document.where(loc)}: {key}: {message}")
    for loc, members in unions.items():
        telling = [message for kind, message in members if not _mismatch(kind)]
        messages = list(dict.fromkeys(telling or [message for _, message in members]))
        key = ".".join(str(part) for part in loc) or "(top level)"
        problems[slots[loc]] = f"{document.where(loc)}: {key}: {'; '.join(messages)}"
    return problems


def parse_model(document: YamlDocument, model: type[M]) -> M:
    if not isinstance(document.data, dict):
        raise YamlFileError([f"{document.path}:1: expected a mapping of keys at the top level"])
    try:
        return model.model_validate(document.data)
    except ValidationError as error:
        raise YamlFileError(validation_problems(document, error)) from None


def parse_file(
    path: Path,
    model: type[M],
    problems: list[str],
    what: str = "a mapping of keys",
    limits: YamlLimits = DEFAULT_LIMITS,
) -> tuple[M, YamlDocument] | None:
    """Load and validate one file, adding every problem to `problems` (linting mode:
    keep going and report them all) instead of raising."""
    try:
        document = load_yaml(path, limits)
    except YamlFileError as error:
        problems.extend(error.problems)
        return None
    if not isinstance(document.data, dict):
        problems.append(f"{path}:1: expected {what}")
        return None
    try:
        return model.model_validate(document.data), document
    except ValidationError as error:
        problems.extend(validation_problems(document, error))
        return None


def parse_files_with_ids(
    paths: Sequence[Path],
    model: type[M],
    problems: list[str],
    kind: str,
    limits: YamlLimits = DEFAULT_LIMITS,
) -> list[tuple[M, YamlDocument]]:
    """Load and validate each file (a `kind` with an `id`); an id used twice is a problem."""
    found: list[tuple[M, YamlDocument]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        parsed = parse_file(path, model, problems, f"a {kind} (a mapping of keys)", limits)
        if parsed is None:
            continue
        spec, document = parsed
        spec_id = str(getattr(spec, "id", ""))
        if spec_id in seen:
            problems.append(
                f"{document.where(('id',))}: {kind} id {spec_id!r} is also in {seen[spec_id]}"
            )
        seen[spec_id] = path
        found.append((spec, document))
    return found
