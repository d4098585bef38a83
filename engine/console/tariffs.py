"""The tariff list: what a minute to a destination costs, for the queue's estimated
exposure (issue 27: answered minutes to the destination times its rate).

A YAML file the operator edits (rules/tariffs/tariffs.yaml ships an example):

    currency: EUR            # named once: every rate is in it
    rates:
      - prefix: "44"         # E.164 digits, no "+" needed; the longest prefix wins
        rate: 0.02           # per answered minute, >= 0
        name: United Kingdom # optional, shown in the alert page's breakdown

Keys are prefixes of E.164 numbers only, not countries: a billing tariff prices ranges
(a country's mobile and premium ranges cost many times its fixed lines), and one
country code can span regions (+1). A call to a destination no prefix covers, or whose
number cannot be read as E.164, counts at rate 0 and its minutes are shown apart as
"unpriced": the estimate never invents a rate.

Read within engine.core.yamlfile's limits (size, values, nesting; no aliases); every
problem is `file:line: reason`, all of them at once. A prefix must be a quoted string:
YAML reads an unquoted `0044` as a number and would drop its zeros.

The number a call is priced by is the one the switch dialled out: the forward number
when the call was forwarded (the IVR's own number, the callee, is what the caller dialled
in; the forwarded leg is the one the operator pays for, and IRSF rides on it), else the
callee. It is read as `engine.detect.numbers` reads it: the configured carrier prefix
stripped (the longest, once), an international prefix or "+" before the country code,
and a national form read in the default region; `e164_query` says it in SQL, so DuckDB
prices every call of the lake without Python in the loop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.yamlfile import DEFAULT_LIMITS, YamlDocument, YamlFileError, YamlLimits, load_yaml
from engine.detect.numbers import NumberPlan

CURRENCY = re.compile(r"[A-Z]{3}")
PREFIX = re.compile(r"\+?[0-9]{1,15}")
MAX_NAME_CHARS = 200
# What a dialled number may carry between its digits, removed before it is read.
WHITESPACE = " \t\n\r\x0b\x0c"
TOP_KEYS = ("currency", "rates", "description")
RATE_KEYS = ("prefix", "rate", "name")


@dataclass(frozen=True)
class Tariff:
    prefix: str  # E.164 digits, without "+"
    rate: float  # per answered minute, in the list's currency
    name: str = ""


@dataclass(frozen=True)
class TariffList:
    path: Path
    currency: str
    tariffs: tuple[Tariff, ...]

    def rate_of(self, number: str) -> Tariff | None:
        """The tariff of an E.164 number (digits): the longest prefix that matches."""
        found: Tariff | None = None
        for tariff in self.tariffs:
            if number.startswith(tariff.prefix) and (
                found is None or len(tariff.prefix) > len(found.prefix)
            ):
                found = tariff
        return found


def load_tariffs(path: Path, limits: YamlLimits = DEFAULT_LIMITS) -> TariffList:
    """The tariff list in `path`, or YamlFileError with every problem as file:line."""
    document = load_yaml(path, limits)
    data = document.data
    if not isinstance(data, dict):
        raise YamlFileError(
            [f"{path}:1: expected a tariff list: currency, and rates (a list of prefix, rate)"]
        )
    problems: list[str] = []

    def problem(where: tuple[str | int, ...], message: str) -> None:
        problems.append(f"{document.where(where)}: {message}")

    for key in data:
        if key not in TOP_KEYS:
            problem((str(key),), f"unknown key {str(key)[:40]!r} (known: {', '.join(TOP_KEYS)})")
    currency = data.get("currency")
    if "currency" not in data:
        problems.append(f"{path}:1: currency: missing (the ISO 4217 code of every rate: EUR)")
    elif not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
        problem(("currency",), f"currency: {str(currency)[:40]!r} is no ISO 4217 code (EUR, USD)")
    rates = data.get("rates")
    tariffs: list[Tariff] = []
    if not isinstance(rates, list) or not rates:
        where: tuple[str | int, ...] = ("rates",) if "rates" in data else ()
        problem(where, "rates: a list of destinations is needed (each a prefix and a rate)")
    else:
        seen: dict[str, int] = {}
        for index, entry in enumerate(rates):
            tariff = _tariff(document, index, entry, problems)
            if tariff is None:
                continue
            if tariff.prefix in seen:
                first = document.line_of(("rates", seen[tariff.prefix], "prefix"))
                problem(
                    ("rates", index, "prefix"),
                    f"prefix {tariff.prefix!r} is also on line {first}: one rate per prefix",
                )
                continue
            seen[tariff.prefix] = index
            tariffs.append(tariff)
    if problems:
        raise YamlFileError(problems)
    assert isinstance(currency, str)
    return TariffList(path, currency, tuple(tariffs))


def _tariff(document: YamlDocument, index: int, entry: Any, problems: list[str]) -> Tariff | None:
    here: tuple[str | int, ...] = ("rates", index)
    before = len(problems)

    def problem(where: tuple[str | int, ...], message: str) -> None:
        problems.append(f"{document.where(where)}: rates.{index}.{message}")

    if not isinstance(entry, dict):
        problems.append(f"{document.where(here)}: rates.{index}: expected prefix and rate")
        return None
    for key in entry:
        if key not in RATE_KEYS:
            problem((*here, str(key)), f"{str(key)[:40]}: unknown key (known: prefix, rate, name)")
    prefix = entry.get("prefix")
    if "prefix" not in entry:
        problem(here, "prefix: missing")
    elif not isinstance(prefix, str):
        problem(
            (*here, "prefix"),
            f'prefix: write it in quotes ("{prefix}"): YAML reads {prefix!r} as a '
            f"{type(prefix).__name__}, which loses leading zeros",
        )
    elif not PREFIX.fullmatch(prefix):
        problem(
            (*here, "prefix"),
            f"prefix: {prefix[:40]!r} is no E.164 prefix (1 to 15 digits, a + before them allowed)",
        )
    rate = entry.get("rate")
    if "rate" not in entry:
        problem(here, "rate: missing")
    elif isinstance(rate, bool) or not isinstance(rate, int | float):
        problem((*here, "rate"), f"rate: {str(rate)[:40]!r} is no number")
    elif not _finite(rate) or rate < 0:
        problem((*here, "rate"), f"rate: {str(rate)[:40]} is not a finite number >= 0")
    name = entry.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        problem((*here, "name"), f"name: a text of at most {MAX_NAME_CHARS} characters")
    if len(problems) > before:
        return None
    assert isinstance(prefix, str) and isinstance(rate, int | float) and isinstance(name, str)
    return Tariff(prefix.removeprefix("+"), float(rate), name)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past a float's range
        return False


# -- reading the dialled number as E.164 digits, in DuckDB's SQL ---------------------------


def _literal(text: str) -> str:
    # Prefixes are checked (digits, * and # only: engine.detect.numbers.check_prefix),
    # so a quote never reaches here; doubled anyway, as SQL wants.
    return "'" + text.replace("'", "''") + "'"


def _strip_longest(expression: str, prefixes: tuple[str, ...], replacement: str = "") -> str:
    """`expression` without the longest of `prefixes` it starts with (and is longer than)."""
    cases = " ".join(
        f"WHEN starts_with({expression}, {_literal(p)}) AND length({expression}) > {len(p)} "
        f"THEN {replacement}substr({expression}, {len(p) + 1})"
        for p in sorted(set(prefixes), key=len, reverse=True)
    )
    return f"(CASE {cases} ELSE {expression} END)" if cases else expression


def national_form(region: str) -> tuple[str, str] | None:
    """(country code, national trunk prefix) of `region`, for national forms."""
    if not region:
        return None
    import phonenumbers

    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata is None or metadata.country_code is None:
        return None
    return str(metadata.country_code), metadata.national_prefix or ""


def e164_query(source: str, plan: NumberPlan) -> str:
    """SQL giving (number, digits) for each `number` of the query `source`: the E.164
    digits it leads to (no "+"), or NULL when it cannot be read as one. These are
    engine.detect.numbers.Destinations.parse's first steps, one stage per subquery so
    each is computed once per number (one nested expression repeats the earlier
    stages inside the later ones: bench/README.md, "Console")."""
    # Whitespace removed by translate (no regular expression: most numbers have none).
    text = f"translate(coalesce(number, ''), {_literal(WHITESPACE)}, '')"
    dialled = _strip_longest("t", plan.dial_prefixes)
    cases = ["WHEN d = '' THEN NULL", "WHEN starts_with(d, '+') THEN substr(d, 2)"]
    cases += [
        f"WHEN starts_with(d, {_literal(p)}) AND length(d) > {len(p)} THEN substr(d, {len(p) + 1})"
        for p in sorted(set(plan.international_prefixes), key=len, reverse=True)
    ]
    national = national_form(plan.default_region)
    if national is None:
        otherwise = "NULL"
    else:
        code, trunk = national
        otherwise = f"{_literal(code)} || {_strip_longest('d', (trunk,)) if trunk else 'd'}"
    return f"""
        SELECT number, CASE WHEN length(r) BETWEEN 1 AND 15
            AND translate(r, '0123456789', '') = '' THEN r END AS digits
        FROM (SELECT number, CASE {" ".join(cases)} ELSE {otherwise} END AS r
            FROM (SELECT number, {dialled} AS d
                FROM (SELECT number, {text} AS t FROM ({source}))))"""
