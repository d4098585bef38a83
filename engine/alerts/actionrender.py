"""An action's request made from its spec and an alert: the templates filled in, each
value encoded for where it goes (URL-encoded in a URL, JSON in a body, refused in a
header where it would break the line, refused as an argument where it would start an
option), secrets taken from the environment and masked in what the trail keeps. The
spec, its checks and its files are engine.alerts.actionspec."""

from __future__ import annotations

import json
import os
import string
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.alerts.actionspec import (
    ALERT_FIELDS,
    ActionSetupError,
    ActionSpecError,
    CommandSpec,
    HttpSpec,
    header_value,
)


def render(template: str, values: Mapping[str, str], encode: Callable[[str], str]) -> str:
    """`template` with each placeholder replaced by its value passed through `encode`
    (the literal text between them is the file's, as written)."""
    parts: list[str] = []
    for literal, name, spec, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(encode(format(values[name], spec or "")))
    return "".join(parts)


def _url_part(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _as_is(value: str) -> str:
    return value


def alert_values(alert: Mapping[str, Any], action_id: str) -> dict[str, str]:
    """The text of each field a template may name (numbers as %g, times in ISO 8601)."""
    values: dict[str, str] = {}
    for name in ALERT_FIELDS:
        value = alert.get(name, "")
        if isinstance(value, float):
            value = f"{value:g}"
        values[name] = str(value)
    values["action_id"] = action_id
    return values


def _secrets(env: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for name, variable in env.items():
        if variable not in environ:
            raise ActionSetupError(f"environment variable {variable} (for {{{name}}}) is not set")
        found[name] = environ[variable]
    return found


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    timeout_s: float
    # What the audit trail keeps: the method and the URL, secrets masked.
    summary: str


def render_http(
    section: HttpSpec,
    values: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
) -> HttpRequest:
    secrets = _secrets(section.env, os.environ if environ is None else environ)
    full = {**values, **secrets}
    masked = {**values, **dict.fromkeys(secrets, "***")}
    url = render(section.url, full, _url_part)
    # The whole value checked once filled in: a line break or a character beyond
    # Latin-1 refuses the request, whether the file's text or an alert's value has it.
    headers = {
        name: header_value(render(text, full, _as_is)) for name, text in section.headers.items()
    }

    def body(value: Any) -> Any:
        if isinstance(value, str):
            return render(value, full, _as_is)
        if isinstance(value, dict):
            return {str(k): body(v) for k, v in value.items()}
        if isinstance(value, list):
            return [body(v) for v in value]
        return value

    data = None
    if section.body is not None:
        data = json.dumps(body(section.body), ensure_ascii=False).encode("utf-8")
        headers.setdefault("Content-Type", "application/json")
    summary = f"{section.method} {render(section.url, masked, _url_part)}"
    return HttpRequest(section.method, url, headers, data, section.timeout, summary)


@dataclass(frozen=True)
class CommandRun:
    argv: list[str]
    timeout_s: float
    summary: str


def _argument(template: str, rendered: str) -> str:
    if "\x00" in rendered:
        raise ActionSpecError("an argument cannot hold a NUL byte")
    if rendered.startswith("-") and not template.startswith("-"):
        # The value itself is not quoted: it may be a secret from the environment.
        raise ActionSpecError(
            f"argument {template[:40]!r} would start an option once filled in; "
            "write it as --name={field}"
        )
    return rendered


def render_command(
    section: CommandSpec,
    values: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
) -> CommandRun:
    secrets = _secrets(section.env, os.environ if environ is None else environ)
    full = {**values, **secrets}
    masked = {**values, **dict.fromkeys(secrets, "***")}
    argv = [_argument(text, render(text, full, _as_is)) for text in section.argv]
    summary = " ".join(render(text, masked, _as_is) for text in section.argv)
    return CommandRun(argv, section.timeout, summary)
