"""Durations as rule tuners and scenario writers write them: 90s, 30m, 1h30m, 2d."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

# The longest duration any setting, rule or scenario may name: ten years.
MAX_DURATION_S = 3650 * 86400.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """'90s', '30m', '1h30m', '2d' or a number of seconds -> seconds.

    >>> parse_duration("1h30m"), parse_duration("2.5s"), parse_duration(42)
    (5400.0, 2.5, 42.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        position = 0
        seconds = 0.0
        for match in _DURATION.finditer(text):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
            position = match.end()
        if not text or position != len(text):
            raise ValueError(f"{value!r} is not a duration (write e.g. 90s, 30m, 1h30m)")
    else:
        raise ValueError(f"{value!r} is not a duration")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{value!r} is longer than {MAX_DURATION_S / 86400:g} days")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
