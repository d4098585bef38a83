"""Scenario parameters drawn at random within a range, from the scenario's seed.

Any value in a scenario file (benign traffic, an incident's parameter, an incident's
`at`) may be written as a range instead of a value:

    calls: {between: [15, 80]}          # an integer from 15 to 80, both included
    spacing: {between: [5s, 45s]}       # a duration (or a number), uniform
    menu_id: {one_of: ["1", "3", "5"]}  # one of the values, equally likely

and an incident may be repeated, each copy drawing its own values (ids `trunk-1`,
`trunk-2`, ...):

    - {id: trunk, family: busy_trunk, repeat: {between: [1, 5]}, every: {between: [5s, 60s]}}

`between` gives an integer when both ends are integers, else a number (durations are
read as seconds); its ends may be equal, never reversed. Each value is drawn from
`Random(f"{seed}:{where it is}")`: the same seed gives the same scenario, and a range
added to one incident does not change what the others draw.

A file with ranges is checked when it is loaded, so a mistake is found before any
seed is drawn: the ranges' shape, then the scenario with every range at its low end,
at its high end, and between (an integer field given fractional ends fails there),
and with each `one_of` at each of its values.
Every problem names the file and line (`engine.core.yamlfile`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from engine.core.durations import parse_duration
from engine.core.yamlfile import YamlDocument

RANGE_KEYS = ("between", "one_of")
REPEAT_KEY = "repeat"
# More copies of one incident than any scenario needs (and than a fuzzed file may ask).
MAX_REPEAT = 1000

Loc = tuple[str | int, ...]
# What a range becomes in one pass: the range's parsed form and where it is.
Choose = Callable[["Range", Loc], Any]


class Range:
    """`{between: [low, high]}` or `{one_of: [...]}`, parsed."""

    def __init__(self, kind: str, low: Any = None, high: Any = None, values: Any = None) -> None:
        self.kind = kind
        self.low = low
        self.high = high
        self.values: list[Any] = values if values is not None else []

    def low_end(self) -> Any:
        return self.low if self.kind == "between" else self.values[0]

    def high_end(self) -> Any:
        return self.high if self.kind == "between" else self.values[-1]

    def middle(self) -> Any:
        if self.kind != "between":
            return self.values[len(self.values) // 2]
        if isinstance(self.low, int) and isinstance(self.high, int):
            return (self.low + self.high) // 2
        return (self.low + self.high) / 2

    def value_number(self, n: int) -> Any:
        """A `one_of`'s value `n` (its last past the end); a `between`'s middle."""
        if self.kind != "between":
            return self.values[min(n, len(self.values) - 1)]
        return self.middle()

    def draw(self, rng: random.Random) -> Any:
        if self.kind != "between":
            return rng.choice(self.values)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return rng.randint(self.low, self.high)
        return rng.uniform(self.low, self.high)


def _number(value: Any) -> int | float:
    """A range's end: a number, or a duration in seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"{str(value)[:40]!r} is not a number or a duration")


def parse_range(node: dict[Any, Any]) -> Range:
    """A mapping that names `between` or `one_of`, as a Range (ValueError if malformed)."""
    keys = [key for key in node if key in RANGE_KEYS]
    if len(node) != 1 or len(keys) != 1:
        raise ValueError("a range is {between: [low, high]} or {one_of: [values]}, alone")
    kind = keys[0]
    items = node[kind]
    if kind == "one_of":
        if not isinstance(items, list) or not items:
            raise ValueError("one_of takes a list of at least one value")
        if any(isinstance(item, dict) and set(item) & set(RANGE_KEYS) for item in items):
            raise ValueError("a value of one_of may not itself be a range")
        return Range(kind, values=items)
    if not isinstance(items, list) or len(items) != 2:
        raise ValueError("between takes a list of two values: [low, high]")
    low, high = _number(items[0]), _number(items[1])
    if isinstance(items[0], str) or isinstance(items[1], str):
        low, high = float(low), float(high)
    if low > high:
        raise ValueError(f"between [{items[0]}, {items[1]}]: the low end is above the high end")
    return Range(kind, low=low, high=high)


def _is_range(node: Any) -> bool:
    return isinstance(node, dict) and any(key in node for key in RANGE_KEYS)


def has_ranges(node: Any, repeats: bool = True) -> bool:
    """Whether `node` holds a range anywhere (or, with `repeats`, a `repeat` key)."""
    if _is_range(node):
        return True
    if isinstance(node, dict):
        return (repeats and REPEAT_KEY in node) or any(
            has_ranges(value, repeats) for value in node.values()
        )
    if isinstance(node, list):
        return any(has_ranges(item, repeats) for item in node)
    return False


def longest_choice(node: Any) -> int:
    """The most values any `one_of` in `node` offers (0 without one)."""
    if _is_range(node):
        values = node.get("one_of")
        return len(values) if isinstance(values, list) else 0
    if isinstance(node, dict):
        return max((longest_choice(value) for value in node.values()), default=0)
    if isinstance(node, list):
        return max((longest_choice(item) for item in node), default=0)
    return 0


def resolve(node: Any, loc: Loc, choose: Choose, problems: list[tuple[Loc, str]]) -> Any:
    """`node` with every range replaced by `choose(range, loc)`; malformed ranges are
    added to `problems` (and replaced by None)."""
    if _is_range(node):
        try:
            parsed = parse_range(node)
        except ValueError as error:
            problems.append((loc, str(error)))
            return None
        return choose(parsed, loc)
    if isinstance(node, dict):
        return {key: resolve(value, (*loc, key), choose, problems) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, (*loc, n), choose, problems) for n, item in enumerate(node)]
    return node


def expand_repeats(
    incidents: list[Any],
    copies: Callable[[Any, Loc], int],
    problems: list[tuple[Loc, str]],
) -> tuple[list[Any], list[int]]:
    """Incidents with `repeat` given as that many copies (ids `id-1`, `id-2`, ...), and
    for each incident of the result the index of the one it came from in the file."""
    out: list[Any] = []
    origin: list[int] = []
    for index, incident in enumerate(incidents):
        if not isinstance(incident, dict) or REPEAT_KEY not in incident:
            out.append(incident)
            origin.append(index)
            continue
        loc: Loc = ("incidents", index, REPEAT_KEY)
        count = copies(incident[REPEAT_KEY], loc)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_REPEAT:
            problems.append((loc, f"repeat is a whole number from 0 to {MAX_REPEAT}"))
            continue
        body = {key: value for key, value in incident.items() if key != REPEAT_KEY}
        for n in range(1, count + 1):
            copy = dict(body)
            if isinstance(body.get("id"), str):
                copy["id"] = f"{body['id']}-{n}"
            out.append(copy)
            origin.append(index)
    return out, origin


def relocated(document: YamlDocument, data: Any, origin: list[int]) -> YamlDocument:
    """`document` for `data`, whose incidents are copies: a key of copy j is on the
    line of the same key of the incident it was copied from."""
    lines = {
        key: line
        for key, line in document.lines.items()
        if not (len(key) >= 2 and key[0] == "incidents" and isinstance(key[1], int))
    }
    for copy, source in enumerate(origin):
        for key, line in document.lines.items():
            if len(key) >= 2 and key[0] == "incidents" and key[1] == source:
                lines[("incidents", copy, *key[2:])] = line
    return YamlDocument(document.path, data, lines)
