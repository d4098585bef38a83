"""Exception files: a reviewer's verdict that an entity is no incident for one rule or
model, kept as a YAML file in the rules folder (`rules/exceptions/*.yaml`, one exception
per file), never as state in the data dir: replay and backtest read the same files as
live detection, so they stay deterministic, and each exception is a change a reviewer
sees and commits.

    # Made by `callsentry alerts except` from a false-positive verdict.
    rule: fanout-callee-caller        # or `model: model.caller-behaviour`
    entity_type: caller               # what the rule counts per (its alerts' entity_type)
    entity: "8613800000001"           # quoted: an unquoted 0012 would be read as 10
    reason: "the Acme PBX; ops confirmed its call pattern"
    expires: 2027-03-05T16:00:00Z     # a time (UTC unless it has an offset), a date
                                      # (through that day, UTC) or `never`; required
    created_by: ana
    created_at: 2026-12-05T16:00:00Z  # optional, as the rest below
    alert_id: "0f2c..."
    verdict: false_positive

While it holds, the entity raises nothing for that rule or model, as an inline
`exceptions:` entry of the rule would: by EVENT time (an exception that expired on
the 5th lets a replay of the 6th alert again, whenever the replay runs).

Written files quote every text (`yaml_text`), so an entity from the network (a caller
number holding a newline, `../`, a NUL) stays one value and cannot add keys; their
names (`file_name`) keep only letters, digits, `+`, `_` and `-` of the entity, with a
digest of the whole, so no entity text can lead out of the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from engine.core.yamlfile import YamlDocument, parse_file

FOLDER = "exceptions"
NEVER = "never"
# An entity is a field of a report (at most a datagram long): far below this.
MAX_ENTITY_CHARS = 4096
_ID = r"^[a-z0-9][a-z0-9_.-]*$"


def exceptions_dir(rules_path: Path) -> Path:
    """Where the exception files of the rules under `rules_path` (a folder or a file) are."""
    return (rules_path.parent if rules_path.is_file() else rules_path) / FOLDER


def exception_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def parse_expires(value: Any) -> date | datetime | str:
    """A date, an aware time (UTC unless it said otherwise) or `never`."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == NEVER:
            return NEVER
        with contextlib.suppress(ValueError):
            if len(text) == 10:
                return date.fromisoformat(text)
            return parse_expires(datetime.fromisoformat(text))
    raise ValueError(
        f"{str(value)[:40]!r} is not a date (2027-03-05: through that day, UTC), a time "
        "(2027-03-05T12:00:00Z; UTC unless it has an offset) or never"
    )


class ExceptionSpec(BaseModel):
    """One exception file, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str | None = Field(default=None, pattern=_ID)
    model: str | None = Field(default=None, pattern=_ID)
    entity_type: str = Field(min_length=1)
    entity: StrictStr = Field(min_length=1, max_length=MAX_ENTITY_CHARS)
    reason: str = Field(min_length=1)
    expires: date | datetime | Literal["never"]
    created_by: str = Field(min_length=1)
    created_at: datetime | None = None
    alert_id: str | None = None
    verdict: str | None = None

    @field_validator("expires", mode="before")
    @classmethod
    def _check_expires(cls, value: Any) -> Any:
        return parse_expires(value)

    @field_validator("entity", mode="before")
    @classmethod
    def _check_entity(cls, value: Any) -> Any:
        if isinstance(value, bool | int | float):
            raise ValueError(
                "write the entity in quotes: unquoted, YAML reads it as a number "
                "(0012 becomes 10, +861 loses its +)"
            )
        return value

    @field_validator("reason", "created_by")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ExceptionSpec:
        if (self.rule is None) == (self.model is None):
            raise ValueError("name either the rule (rule: ID) or the model (model: ID), not both")
        return self

    @property
    def source(self) -> str:
        return self.rule if self.rule is not None else str(self.model)

    @property
    def until(self) -> float:
        """Event time from which the exception no longer holds (inf: never)."""
        return expiry_time(self.expires)


def expiry_time(expires: date | datetime | str) -> float:
    """`expires` as the event time it stops holding at: a date holds through its day."""
    if isinstance(expires, datetime):
        return expires.timestamp()
    if isinstance(expires, date):
        return datetime.combine(expires + timedelta(days=1), time(), tzinfo=UTC).timestamp()
    return math.inf


def expiry_text(until: float) -> str:
    if math.isinf(until):
        return NEVER
    return datetime.fromtimestamp(until, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class EntityException:
    """An exception as detection applies it: `entity` of `source` (a rule's or a model's
    id) raises nothing at event times before `until`."""

    source: str
    detector: Literal["rule", "model"]
    entity_type: str
    entity: str
    until: float
    reason: str
    created_by: str
    alert_id: str | None
    where: str

    def holds_at(self, ts: float) -> bool:
        return ts < self.until

    @property
    def expires_text(self) -> str:
        return expiry_text(self.until)

    @classmethod
    def of(cls, spec: ExceptionSpec, document: YamlDocument) -> EntityException:
        return cls(
            spec.source,
            "rule" if spec.rule is not None else "model",
            spec.entity_type,
            spec.entity,
            spec.until,
            spec.reason,
            spec.created_by,
            spec.alert_id,
            document.where(("entity",)),
        )


def read_exception_files(
    folder: Path, problems: list[str]
) -> list[tuple[ExceptionSpec, YamlDocument]]:
    """Every exception file in `folder`, each within the YAML limits; their problems
    (file:line: key: reason) added to `problems`, duplicates among them too."""
    found: list[tuple[ExceptionSpec, YamlDocument]] = []
    seen: dict[tuple[str, str, str, float], str] = {}
    for path in exception_files(folder):
        parsed = parse_file(
            path,
            ExceptionSpec,
            problems,
            "an exception (rule or model, entity_type, entity, reason, expires, created_by)",
        )
        if parsed is None:
            continue
        spec, document = parsed
        key = (spec.source, spec.entity_type, spec.entity, spec.until)
        if key in seen:
            problems.append(
                f"{document.where(('entity',))}: the same exception (same {_kind(spec)}, "
                f"entity and expiry) as {seen[key]}"
            )
            continue
        seen[key] = document.where(("entity",))
        found.append((spec, document))
    return found


def _kind(spec: ExceptionSpec) -> str:
    return "rule" if spec.rule is not None else "model"


def check_exceptions(
    found: Sequence[tuple[ExceptionSpec, YamlDocument]],
    rule_types: Mapping[str, str],
    model_types: Mapping[str, str] | None,
    *,
    partial: bool = False,
) -> tuple[list[EntityException], list[str]]:
    """The exceptions that name a rule of `rule_types` (id -> entity type) or a model
    of `model_types` with its entity type, and a problem for each that does not.
    `model_types` None: the models are not known here (their exceptions are taken
    unchecked). `partial`: the rules are some of a folder's (one file loaded alone):
    an exception for another rule is left out, not a problem."""
    taken: list[EntityException] = []
    problems: list[str] = []
    for spec, document in found:
        if spec.rule is not None:
            known: Mapping[str, str] | None = rule_types
            what = "rule"
        else:
            known, what = model_types, "model"
        if known is None:
            taken.append(EntityException.of(spec, document))
            continue
        expected = known.get(spec.source)
        if expected is None:
            if not partial:
                listed = ", ".join(sorted(known)) or "none"
                problems.append(
                    f"{document.where((what,))}: {what}: no {what} {spec.source!r} "
                    f"(known: {listed})"
                )
            continue
        if spec.entity_type != expected:
            problems.append(
                f"{document.where(('entity_type',))}: entity_type: {what} {spec.source!r} "
                f"alerts per {expected}, not {spec.entity_type}"
            )
            continue
        parts = expected.count("/") + 1
        if spec.entity.count("/") < parts - 1:
            problems.append(
                f"{document.where(('entity',))}: entity: a {expected} entity names {parts} "
                f"values joined with '/'"
            )
            continue
        taken.append(EntityException.of(spec, document))
    return taken, problems


def covering(
    exceptions: Sequence[EntityException], source: str, entity: str, ts: float
) -> EntityException | None:
    """The exception of `source` for `entity` that holds longest past `ts`, if one holds."""
    holding = [e for e in exceptions if e.source == source and e.entity == entity]
    best = max(holding, key=lambda e: e.until, default=None)
    return best if best is not None and best.holds_at(ts) else None


# -- writing ------------------------------------------------------------------------------


def yaml_text(text: str) -> str:
    """`text` as one double-quoted YAML scalar, every character outside printable ASCII
    escaped: whatever it holds, it reads back as the same single value."""
    dumped = yaml.dump(
        text, default_style='"', width=math.inf, allow_unicode=False, explicit_end=False
    )
    return str(dumped).strip()


def _slug(text: str, size: int) -> str:
    return re.sub(r"[^A-Za-z0-9+_-]", "_", text)[:size] or "_"


def file_name(source: str, entity: str, attempt: int = 0) -> str:
    """A file name for an exception of `source` for `entity` (a digest of both keeps
    entities that read the same once cleaned apart); `attempt` numbers a renewal."""
    digest = hashlib.sha256(f"{source}\0{entity}".encode("utf-8", "surrogatepass")).hexdigest()
    suffix = f"-{attempt + 1}" if attempt else ""
    return f"{_slug(source, 60)}--{_slug(entity, 40)}-{digest[:10]}{suffix}.yaml"


def _moment_text(moment: date | datetime | str) -> str:
    if isinstance(moment, datetime):
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(moment, date):
        return moment.isoformat()
    return NEVER


def render(spec: ExceptionSpec) -> str:
    """The file's text for `spec` (it reads back as `spec`)."""
    lines = [
        "# An exception: this entity raises nothing for this "
        + ("rule" if spec.rule is not None else "model")
        + " until it expires (event time).",
        "# Made by `callsentry alerts except`; review it and commit it with the rules.",
        f"{_kind(spec)}: {yaml_text(spec.source)}",
        f"entity_type: {yaml_text(spec.entity_type)}",
        f"entity: {yaml_text(spec.entity)}",
        f"reason: {yaml_text(spec.reason)}",
        f"expires: {_moment_text(spec.expires)}",
        f"created_by: {yaml_text(spec.created_by)}",
    ]
    if spec.created_at is not None:
        lines.append(f"created_at: {_moment_text(spec.created_at)}")
    if spec.alert_id is not None:
        lines.append(f"alert_id: {yaml_text(spec.alert_id)}")
    if spec.verdict is not None:
        lines.append(f"verdict: {yaml_text(spec.verdict)}")
    return "\n".join(lines) + "\n"


def write_exception(folder: Path, spec: ExceptionSpec) -> Path:
    """Write `spec` as a new file in `folder`, whole or not at all (a temporary file
    linked into place), never over another file; returns its path. Raises OSError."""
    folder.mkdir(parents=True, exist_ok=True)
    data = render(spec).encode("ascii")
    temporary = folder / f".{secrets.token_hex(8)}.partial"
    with temporary.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        for attempt in range(1000):
            target = folder / file_name(spec.source, spec.entity, attempt)
            try:
                # A link fails where the name is taken: nothing is overwritten.
                os.link(temporary, target)
            except FileExistsError:
                continue
            _sync_folder(folder)
            return target
        raise FileExistsError(f"{folder}: 1000 exceptions for one rule and entity")
    finally:
        temporary.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def exception_in_force(
    rules_dir: Path | None, source: str, entity: str, ts: float
) -> EntityException | None:
    """The valid exception file under `rules_dir` that holds `entity` out of `source` at
    `ts` (for a page: files with problems are left out, `rules validate` names them)."""
    if rules_dir is None:
        return None
    found = read_exception_files(exceptions_dir(rules_dir), [])
    return covering([EntityException.of(s, d) for s, d in found], source, entity, ts)
