"""The settings in effect as TOML (`callsentry config check`): what the file, the
environment and the defaults made of them, in a form that reads back as the same
settings, with every secret masked or left out.

A key whose value is a table (`relay.nats`), or a list of tables (`notify.channels`),
comes after its section's other keys as its own `[section.key]` or `[[section.key]]`;
an unset key (TOML has no null) is a comment that says what unset means.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from engine.apps.settings import Settings

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A key as TOML writes it: bare where it can be, quoted otherwise.

    >>> toml_key("rate_limit"), toml_key("a.b")
    ('rate_limit', '"a.b"')
    """
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's string escapes are TOML's basic-string escapes; TOML wants DEL escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """A setting's value as TOML: strings, numbers, booleans, and arrays and inline
    tables of them (a None inside a table is left out: TOML has no null).

    >>> toml_value(["127.0.0.0/8", 1, 2.5, True])
    '["127.0.0.0/8", 1, 2.5, true]'
    >>> toml_value({"urls": [], "stream": "CALLSENTRY", "limit": None})
    '{urls = [], stream = "CALLSENTRY"}'
    >>> toml_value(float("inf")), toml_value(1e-06), toml_value('say "hi"\\x7f')
    ('inf', '1e-06', '"say \\\\"hi\\\\"\\\\u007f"')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = (f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"no TOML for a {type(value).__name__}")


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def _table_lines(header: str, table: Mapping[str, Any]) -> Iterator[str]:
    yield header
    for key, value in table.items():
        if value is None:
            yield f"# {key} unset"
        else:
            yield f"{toml_key(key)} = {toml_value(value)}"


def settings_lines(settings: Settings, environ: Mapping[str, str]) -> Iterator[str]:
    """`config check`'s lines: each section's settings, secrets masked or left out
    (`environ` says only whether a credentials variable is set)."""
    for section, values in settings.model_dump(mode="json").items():
        yield f"[{section}]"
        tables: list[tuple[str, Any]] = []
        for key, value in values.items():
            if key.endswith("_token") and value:
                value = "(set, not shown)"  # secrets stay out of terminals and logs
            if (section, key) == ("notify", "channels"):
                # An Apprise URL carries tokens and passwords: shown masked.
                value = [channel.shown() for channel in settings.notify.channels]
            if (section, key) == ("relay", "nats") and value["credentials_env"]:
                name = value["credentials_env"]
                state = "set, not shown" if environ.get(name) else "not set"
                yield f"# relay.nats credentials: ${name} ({state})"
            if value is None:
                meaning = (
                    f": the shipped rules, {settings.detection.rules_folder}"
                    if (section, key) == ("detection", "rules_dir")
                    else ""
                )
                yield f"# {key} unset{meaning}"
            elif _is_table(value):
                tables.append((key, value))
            else:
                yield f"{toml_key(key)} = {toml_value(value)}"
        for key, value in tables:
            if isinstance(value, list):
                for table in value:
                    yield from _table_lines(f"[[{section}.{key}]]", table)
            else:
                yield from _table_lines(f"[{section}.{key}]", value)
