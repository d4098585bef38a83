"""Action definitions: the YAML files in `rules/actions/`, validated like rules (every
problem as `file:line: key: reason`, all at once). The requests they make are rendered
by engine.alerts.actionrender.

An action says which alerts it applies to (`match`), what it does (`kind`: `http`,
`command` or `block`), whether it waits for a reviewer (`mode`), whether it only
says what it would do (`dry_run`), how it is undone (`undo`), and how many it may do
per hour on its own (`budget`).

Templates name the alert's fields in braces, as rule summaries do (`{entity}`), and
`check_template` refuses an unknown one at validation. Each value is encoded for
where it goes when the request is rendered: URL-encoded in a URL, refused if it
would put a line break in a header, JSON-escaped in a body (the body is built as
data and serialised), one argument of an argument list (no shell), refused there if
it would start an option. Secrets come from environment variables named under `env:`
and are read when the request is made: they are in neither the file nor the outbox.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.core.durations import Duration
from engine.core.text import check_template
from engine.core.yamlfile import (
    DEFAULT_LIMITS,
    YamlDocument,
    YamlFileError,
    load_yaml,
    parse_files_with_ids,
)

# The alert's fields a template may name (the `alerts` table's columns, as text), and
# the action's own id.
ALERT_FIELDS = (
    "alert_id",
    "rule_id",
    "detector",
    "severity",
    "entity_type",
    "entity",
    "window_start",
    "window_end",
    "raised_at",
    "value",
    "threshold",
    "summary",
    "rule_version",
    "level",
    "action_id",
)
ENTITY_TYPES = ("caller", "menu", "forward", "callee")
SEVERITIES = ("low", "medium", "high", "critical")
# Where a budget is not written: a runaway rule must never act on everyone.
DEFAULT_PER_HOUR = 20
_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers that carry credentials: their value must come from the environment.
_SECRET_HEADER = re.compile(r"authorization|cookie|token|secret|password|api[-_]?key", re.I)


class ActionSpecError(ValueError):
    """A request cannot be rendered from this alert (a value would inject a header or an
    option, an environment variable is not set); the message says which and why."""


class ActionSetupError(ActionSpecError):
    """A request cannot be rendered on this machine as it is set up (an environment
    variable the action names is not set): another attempt, once it is, may succeed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Match(_Strict):
    """Which alerts an action applies to: every list given must hold the alert's value
    (tags: any of the rule's tags); an empty list matches all."""

    rules: list[str] = Field(default_factory=list)
    severities: list[Literal["low", "medium", "high", "critical"]] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    entity_types: list[Literal["caller", "menu", "forward", "callee"]] = Field(default_factory=list)
    # The alert's level: with `[critical]`, an alert raised at warning is acted on when
    # it escalates (the escalation is the same alert: an action runs once per alert).
    levels: list[Literal["warning", "critical"]] = Field(default_factory=list)

    def matches(self, alert: Mapping[str, Any], tags: Sequence[str]) -> bool:
        return (
            (not self.rules or alert.get("rule_id") in self.rules)
            and (not self.severities or alert.get("severity") in self.severities)
            and (not self.levels or (alert.get("level") or "critical") in self.levels)
            and (not self.entity_types or alert.get("entity_type") in self.entity_types)
            and (not self.tags or any(tag in self.tags for tag in tags))
        )


def _no_line_break(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("a header value cannot hold a line break (it would inject a header)")
    return value


class HttpSpec(_Strict):
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    # A value written with a line break is a problem of the file (`_header_problems`,
    # beside the templates' and the credentials'), and refused when a request is made.
    headers: dict[str, str] = Field(default_factory=dict)
    # JSON made from the YAML value; each text in it is a template.
    body: Any = None
    # Placeholder -> environment variable: read when the request is made.
    env: dict[str, str] = Field(default_factory=dict)
    timeout: Duration = 10.0

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return headers

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= 300:
            raise ValueError("timeout must be more than 0 and at most 5m")
        return value


class CommandSpec(_Strict):
    argv: list[str] = Field(min_length=1)
    timeout: Duration = 30.0
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= 600:
            raise ValueError("timeout must be more than 0 and at most 10m")
        return value


class BlockSpec(_Strict):
    # What goes on the blocklist: by default the alert's entity, of its entity type.
    entity: str = "{entity}"
    expire_after: Duration = 86_400.0
    reason: str = "{rule_id}: {summary}"

    @field_validator("expire_after")
    @classmethod
    def _expiry(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expire_after must be more than 0")
        return value


class UndoSpec(_Strict):
    # How long after the action its undo is made.
    after: Duration
    http: HttpSpec | None = None
    command: CommandSpec | None = None


class Budget(_Strict):
    per_hour: int = Field(ge=1, le=100_000)


def _env_names(env: Mapping[str, str]) -> None:
    for name, variable in env.items():
        if not name.isidentifier():
            raise ValueError(f"env: {name!r} is not a placeholder name")
        if name in ALERT_FIELDS:
            raise ValueError(f"env: {name!r} is an alert field; name the secret otherwise")
        if not _ENV_NAME.match(variable):
            raise ValueError(f"env: {variable!r} is not an environment variable name")


class ActionSpec(_Strict):
    id: str = Field(pattern=_ID)
    title: str = ""
    description: str = ""
    enabled: bool = True
    match: Match
    kind: Literal["http", "command", "block"]
    mode: Literal["auto", "approve"] = "auto"
    dry_run: bool = False
    http: HttpSpec | None = None
    command: CommandSpec | None = None
    block: BlockSpec | None = None
    undo: UndoSpec | None = None
    budget: Budget = Budget(per_hour=DEFAULT_PER_HOUR)

    @model_validator(mode="after")
    def _shape(self) -> ActionSpec:
        given = [name for name in ("http", "command", "block") if getattr(self, name) is not None]
        if self.kind == "block" and self.block is None:
            object.__setattr__(self, "block", BlockSpec())
            given.append("block")
        if given != [self.kind]:
            others = [name for name in given if name != self.kind]
            if others:
                raise ValueError(f"kind {self.kind} takes `{self.kind}:`, not `{others[0]}:`")
            raise ValueError(f"kind {self.kind} needs `{self.kind}:`")
        for section in (self.http, self.command):
            if section is not None:
                _env_names(section.env)
        undo = self.undo
        if undo is not None:
            if self.kind == "block":
                raise ValueError("a block is lifted when it expires (block.expire_after); no undo:")
            steps = [name for name in ("http", "command") if getattr(undo, name) is not None]
            if steps != [self.kind]:
                raise ValueError(f"undo of a {self.kind} action takes `{self.kind}:` (one)")
            section = undo.http or undo.command
            assert section is not None
            _env_names(section.env)
        return self

    def undo_after(self) -> float | None:
        """How long after it is done this action is undone (None: never)."""
        if self.block is not None:
            return self.block.expire_after
        return self.undo.after if self.undo is not None else None

    def as_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- templates ------------------------------------------------------------------------


def _walk_texts(value: Any, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _walk_texts(v, (*path, str(k)))]
    if isinstance(value, list):
        return [t for i, v in enumerate(value) for t in _walk_texts(v, (*path, i))]
    return []


Section = HttpSpec | CommandSpec | BlockSpec
KeyPath = tuple[str | int, ...]


def sections_of(spec: ActionSpec) -> list[tuple[KeyPath, Section]]:
    """The sections of `spec` that make a request, a command or a block, by key path."""
    found: list[tuple[KeyPath, Section]] = []
    for name in ("http", "command", "block"):
        section = getattr(spec, name)
        if section is not None:
            found.append(((name,), section))
    if spec.undo is not None:
        for name in ("http", "command"):
            section = getattr(spec.undo, name)
            if section is not None:
                found.append((("undo", name), section))
    return found


def templates_of(spec: ActionSpec) -> list[tuple[tuple[str | int, ...], str, tuple[str, ...]]]:
    """Every template of `spec`: (key path, text, the names it may use)."""
    return [found for at, section in sections_of(spec) for found in _section_templates(at, section)]


def _section_templates(
    at: KeyPath, section: Section
) -> list[tuple[tuple[str | int, ...], str, tuple[str, ...]]]:
    found: list[tuple[tuple[str | int, ...], str, tuple[str, ...]]] = []

    if isinstance(section, HttpSpec):
        names = (*ALERT_FIELDS, *section.env)
        found.append(((*at, "url"), section.url, names))
        for name, value in section.headers.items():
            found.append(((*at, "headers", name), value, names))
        for path, text in _walk_texts(section.body, (*at, "body")):
            found.append((path, text, names))
    elif isinstance(section, CommandSpec):
        names = (*ALERT_FIELDS, *section.env)
        for index, text in enumerate(section.argv):
            found.append(((*at, "argv", index), text, names))
    else:
        found.append(((*at, "entity"), section.entity, ALERT_FIELDS))
        found.append(((*at, "reason"), section.reason, ALERT_FIELDS))
    return found


def _header_problems(at: KeyPath, section: Section) -> list[tuple[KeyPath, str]]:
    """A header value with a line break (it would inject a header), and a credential
    header written out in the file (it belongs in the environment)."""
    problems: list[tuple[KeyPath, str]] = []
    if not isinstance(section, HttpSpec):
        return problems
    for name, value in section.headers.items():
        try:
            header_value(value)  # what sending it would refuse, said at validation
        except ActionSpecError as error:
            problems.append(((*at, "headers", name), str(error)))
            continue
        used = {n for _, n, _, _ in string.Formatter().parse(value) if n}
        if _SECRET_HEADER.search(name) and not used & set(section.env):
            problems.append(
                (
                    (*at, "headers", name),
                    f"header {name} carries a credential: put it in an environment "
                    "variable and name it under env: (never in the file)",
                )
            )
    return problems


def header_value(value: str) -> str:
    try:
        value = _no_line_break(value)
    except ValueError as error:
        raise ActionSpecError(str(error)) from None
    try:
        # HTTP sends header values as Latin-1: anything else (a menu name in Chinese)
        # is this alert's request refused, not the endpoint taken for down.
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ActionSpecError(
            "a header value holds characters HTTP headers cannot carry (beyond Latin-1); "
            "put that field in the body or the URL"
        ) from None
    return value


# -- loading --------------------------------------------------------------------------


def actions_dir(rules_folder: Path) -> Path:
    """Where a rule folder's actions are: its `actions/` folder."""
    base = rules_folder.parent if rules_folder.is_file() else rules_folder
    return base / "actions"


@dataclass(frozen=True)
class ActionSet:
    """The action definitions in force (only the enabled ones act)."""

    actions: tuple[ActionSpec, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> list[ActionSpec]:
        return [action for action in self.actions if action.enabled]

    def matching(self, alert: Mapping[str, Any], tags: Sequence[str]) -> list[ActionSpec]:
        return [a for a in self.enabled if a.match.matches(alert, tags)]


def _section_problems(at: KeyPath, section: Section, document: YamlDocument) -> list[str]:
    """A section's templates that name what they cannot, and its headers' problems."""
    found: list[tuple[KeyPath, str]] = []
    for path, text, names in _section_templates(at, section):
        try:
            check_template(text, names)
        except ValueError as error:
            found.append((path, str(error)))
    found.extend(_header_problems(at, section))
    return [
        f"{document.where(path)}: {'.'.join(str(p) for p in path)}: {message}"
        for path, message in found
    ]


def _spec_problems(spec: ActionSpec, document: YamlDocument) -> list[str]:
    return [
        problem
        for at, section in sections_of(spec)
        for problem in _section_problems(at, section, document)
    ]


_SECTION_MODELS: dict[str, type[Section]] = {
    "http": HttpSpec,
    "command": CommandSpec,
    "block": BlockSpec,
}


def _problems_of_an_invalid_file(path: Path) -> list[str]:
    """The templates' and headers' problems of each section of a file that is no valid
    action as a whole (a typo in `kind:`, a bad timeout): its pydantic errors are listed
    already, and these would otherwise show only once those are mended."""
    try:
        document = load_yaml(path)
    except YamlFileError:
        return []  # unreadable: said already
    data = document.data
    if not isinstance(data, dict):
        return []
    places: list[tuple[KeyPath, Any]] = [((name,), data.get(name)) for name in _SECTION_MODELS]
    undo = data.get("undo")
    if isinstance(undo, dict):
        places += [(("undo", name), undo.get(name)) for name in ("http", "command")]
    problems: list[str] = []
    for at, raw in places:
        if not isinstance(raw, dict):
            continue
        try:
            section = _SECTION_MODELS[str(at[-1])].model_validate(raw)
        except ValidationError:
            continue  # its errors are the file's, listed already
        problems.extend(_section_problems(at, section, document))
    return problems


def load_actions(folder: Path) -> ActionSet:
    """Every action file in `folder` (`*.yaml`, `*.yml`; none, or no folder: no actions),
    or YamlFileError listing every problem at once as `file:line: key: reason`."""
    if not folder.is_dir():
        return ActionSet()
    paths = sorted(p for p in folder.glob("*.yaml") if p.is_file()) + sorted(
        p for p in folder.glob("*.yml") if p.is_file()
    )
    problems: list[str] = []
    specs = parse_files_with_ids(paths, ActionSpec, problems, "action", DEFAULT_LIMITS)
    valid = {document.path for _, document in specs}
    for path in paths:
        if path not in valid:
            problems.extend(_problems_of_an_invalid_file(path))
    for spec, document in specs:
        problems.extend(_spec_problems(spec, document))
    if problems:
        raise YamlFileError(problems)
    return ActionSet(
        tuple(spec for spec, _ in specs),
        {spec.id: str(document.path) for spec, document in specs},
    )
