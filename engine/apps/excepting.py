"""From a false-positive verdict to an exception file (`callsentry alerts except`): the
alert read from the lake, the file written in the rules folder (engine.detect.
exceptionfiles), checked with the rules, and the verdict recorded in the review trail.

Exceptions expire: 90 days unless `--expires` says otherwise (a duration, a date, a
time, or `never`, which must be asked for), because an exception nobody looks at again
outlives the reason it was made for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from engine.core.yamlfile import YamlFileError

DEFAULT_EXPIRY = "90d"


class ExceptError(Exception):
    """The exception cannot be made; the message says why (nothing was written)."""


class ExceptOptionError(ExceptError):
    """An option's value cannot be taken (`--reason`, `--expires`), whatever the data;
    or the rules folder is invalid (as `replay` and `backtest` refuse it, exit code 2)."""


def parse_expiry(text: str, now: datetime) -> date | datetime | str:
    """--expires: a duration from now (30d, 12h), a date (through that day, UTC), a time
    (UTC unless it has an offset) or `never`; refused when it is not in the future."""
    from engine.core.durations import parse_duration
    from engine.detect.exceptionfiles import NEVER, expiry_time, parse_expires

    value = text.strip()
    if value.lower() == NEVER:
        return NEVER
    expires: date | datetime | str
    try:
        seconds: float | None = parse_duration(value)
    except ValueError as error:
        if "is not a duration" not in str(error):
            # A duration, but not one to take (longer than ten years): said as such.
            raise ExceptOptionError(f"--expires {text!r}: {error}") from None
        seconds = None
    try:
        if seconds is not None:  # at most 3650 days (parse_duration): within the years
            expires = parse_expires(now.replace(microsecond=0) + timedelta(seconds=seconds))
        else:
            expires = parse_expires(value)
    except ValueError as error:
        if seconds is not None or "out of range" in str(error):
            raise ExceptOptionError(f"--expires {text!r}: {error}") from None
        raise ExceptOptionError(
            f"--expires {text!r}: not a duration (30d, 12h), a date (2027-03-05), a time "
            "(2027-03-05T12:00:00Z) or never"
        ) from None
    if isinstance(expires, datetime):
        expires = expires.replace(microsecond=0)
    if expiry_time(expires) <= now.timestamp():
        raise ExceptOptionError(f"--expires {text!r}: that is not in the future")
    return expires


@dataclass(frozen=True)
class Excepted:
    path: Path
    alert_id: str
    source: str
    entity_type: str
    entity: str
    expires: str
    review_id: str | None
    # Why no review was recorded (None: recorded, or not needed).
    review_problem: str | None = None


def except_alert(
    data_dir: Path,
    rules_dir: Path,
    alert_id: str,
    reason: str,
    expires_text: str,
    reviewer: str,
    now: datetime | None = None,
) -> Excepted:
    """Write the exception for the alert's rule (or model) and entity into
    `rules_dir`/exceptions, and record a false_positive review for the alert unless its
    latest verdict already is one. Raises ExceptError."""
    from pydantic import ValidationError

    from engine.apps.detectors import check_detectors
    from engine.core.text import shown
    from engine.detect.exceptionfiles import (
        ExceptionSpec,
        covering,
        exceptions_dir,
        expiry_text,
        write_exception,
    )
    from engine.lake.reviews import MAX_NOTE_CHARS, ReviewError, add_review, alert_subject

    now = now or datetime.now(tz=UTC)
    if not reason.strip():
        raise ExceptOptionError("--reason: say why this entity is no incident for this rule")
    # The reason becomes the review's note too, after the exception's expiry and file:
    # one too long for that is refused before anything is written, not after the file.
    most = MAX_NOTE_CHARS - 1_000
    if len(reason.strip()) > most:
        raise ExceptOptionError(
            f"--reason has {len(reason.strip()):,} characters; at most {most:,}"
        )
    expires = parse_expiry(expires_text, now)
    if not rules_dir.is_dir():
        raise ExceptError(f"{rules_dir}: no such rules folder (--rules names it)")
    try:
        alert = alert_subject(data_dir, alert_id)
    except ReviewError as error:
        raise ExceptError(str(error)) from None
    full_id, source = str(alert["alert_id"]), str(alert["rule_id"])
    detector, entity = str(alert["detector"]), str(alert["entity"])
    if detector not in ("rule", "model"):
        raise ExceptError(
            f"alert {full_id} is a {detector} alert ({source}); only a rule's or a model's "
            "alerts can be excepted"
        )
    if alert["status"] == "confirmed":
        raise ExceptError(
            f"alert {full_id} is reviewed as confirmed; if that was wrong, review it as "
            "false_positive first (alerts review --status fp)"
        )
    try:
        loaded = check_detectors(rules_dir)
    except YamlFileError as error:
        raise ExceptOptionError(
            f"the rules in {rules_dir} are invalid ({len(error.problems)} problem(s) above); "
            "fix them first\n" + "\n".join(error.problems)
        ) from None
    known = (
        loaded.rules.by_id()
        if detector == "rule"
        else (loaded.catalogue.kinds if loaded.catalogue else {})
    )
    if source not in known:
        raise ExceptError(f"{rules_dir} has no {detector} {source!r} (the alert's)")
    held = covering(loaded.rules.exceptions, source, entity, now.timestamp())
    if held is not None:
        raise ExceptError(
            f"{detector} {source} already has an exception for this entity until "
            f"{expiry_text(held.until)}: {held.where}"
        )
    try:
        spec = ExceptionSpec.model_validate(
            {
                detector: source,
                "entity_type": str(alert["entity_type"]),
                "entity": entity,
                "reason": reason.strip(),
                "expires": expires,
                "created_by": reviewer,
                "created_at": now.replace(microsecond=0),
                "alert_id": full_id,
                "verdict": "false_positive",
            }
        )
    except ValidationError as error:
        # What the command was given (the reviewer's name) or what the alert holds
        # (an empty or overlong entity) cannot make an exception file.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'exception'}: {e['msg']}" for e in error.errors()
        )
        raise ExceptError(f"{shown(problems)} (alert {full_id} cannot be excepted)") from None
    folder = exceptions_dir(rules_dir)
    try:
        path = write_exception(folder, spec)
    except OSError as error:
        raise ExceptError(f"cannot write in {folder}: {error.strerror or error}") from None
    try:
        check_detectors(rules_dir)
    except YamlFileError as error:
        # Not expected (the file was made from a valid alert): never leave a folder that
        # a running engine would refuse to reload.
        with contextlib.suppress(OSError):
            path.unlink()
        raise ExceptError(
            "the exception would make the rules invalid (the problems above), so it was "
            "not kept\n" + "\n".join(error.problems)
        ) from None
    review_id = problem = None
    if alert["status"] != "false_positive":
        note = f"exception until {expiry_text(spec.until)} ({path.name}): {reason.strip()}"
        try:
            review_id = add_review(data_dir, full_id, "false_positive", note, reviewer)
        except ReviewError as error:
            problem = str(error)
    return Excepted(
        path,
        full_id,
        source,
        spec.entity_type,
        entity,
        expiry_text(spec.until),
        review_id,
        problem,
    )
