"""The one vocabulary of review statuses, for the CLI, the console and its API alike.

>>> status_named("fp")
'false_positive'
>>> status_named("Investigating")
'investigating'
>>> status_named("done")
Traceback (most recent call last):
...
ValueError: unknown status 'done' (open, investigating, confirmed, false_positive or fp, closed)

Reviews are written with these names only. Reviews already in the lake are read
through `status_sql`, so a review written under an alias or an older spelling
(`fp`, `False-Positive`, `false positive`) reads as its status here.
"""

from __future__ import annotations

STATUSES = ("open", "investigating", "confirmed", "false_positive", "closed")
# Accepted wherever a status is typed, and read so from the lake.
ALIASES = {"fp": "false_positive"}


def _folded(text: str) -> str:
    return "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())


def status_named(text: str) -> str:
    """The status `text` names (a status, an alias, any case, `-` or space for `_`);
    ValueError saying which ones there are."""
    folded = _folded(text)
    folded = ALIASES.get(folded, folded)
    if folded not in STATUSES:
        known = ", ".join(
            " or ".join([s, *(a for a, t in ALIASES.items() if t == s)]) for s in STATUSES
        )
        raise ValueError(f"unknown status {text!r} ({known})")
    return folded


def status_sql(column: str) -> str:
    """SQL reading a stored status `column` as its name in STATUSES (folded as by
    `status_named`, aliases resolved; anything else kept as stored)."""
    folded = (
        f"array_to_string(list_filter(string_split(replace(replace(lower(trim({column})), "
        "'-', ' '), '_', ' '), ' '), lambda w: w <> ''), '_')"
    )
    cases = " ".join(f"WHEN '{alias}' THEN '{name}'" for alias, name in ALIASES.items())
    known = ", ".join(f"'{name}'" for name in STATUSES)
    return (
        f"CASE WHEN {column} IS NULL THEN NULL "
        f"ELSE CASE {folded} {cases} ELSE CASE WHEN {folded} IN ({known}) THEN {folded} "
        f"ELSE {column} END END END"
    )
