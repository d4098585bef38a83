"""The fields of a call that rules read, by name: `FIELDS["talk_s"].read(call)`.

Each reader is a small class whose `read` is one attribute of the call. Compiled (see
engine/detect/__init__.py), that is a method call reading at a fixed offset (or a
compiled property), where `getattr(call, name)` looks the name up every time. The
names are the schema's `FieldName` (a rule's `selection:` and `field:`) and the
entities a rule groups by (`group_by:`, through `ENTITY_FIELDS`).
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from engine.detect.calls import Call
from engine.detect.numbers import DESTINATIONS, NO_NUMBER, Destination, Destinations
from engine.detect.schema import WEEKDAYS, FieldName


class CallField:
    """Reads one field of a call."""

    def read(self, call: Call) -> object:
        raise NotImplementedError


class TextField(CallField):
    """A field that is always a text (the numbers of a call, its menu, its outcome):
    what an entity is named by."""

    def text(self, call: Call) -> str:
        raise NotImplementedError

    def read(self, call: Call) -> object:
        return self.text(call)


class Caller(TextField):
    def text(self, call: Call) -> str:
        return call.caller


class Callee(TextField):
    def text(self, call: Call) -> str:
        return call.callee


class Forward(TextField):
    def text(self, call: Call) -> str:
        return call.forward


class MenuId(TextField):
    def text(self, call: Call) -> str:
        return call.menu_id


class MenuName(TextField):
    def text(self, call: Call) -> str:
        return call.menu_name


class Switch(TextField):
    def text(self, call: Call) -> str:
        return call.switch


class Outcome(TextField):
    def text(self, call: Call) -> str:
        return call.outcome


class RingSeconds(CallField):
    def read(self, call: Call) -> object:
        return call.ring_s


class TalkSeconds(CallField):
    def read(self, call: Call) -> object:
        return call.talk_s


class Answered(CallField):
    def read(self, call: Call) -> object:
        return call.answered


class RingCode(CallField):
    def read(self, call: Call) -> object:
        return call.ring_code


class NumberOf:
    """Which of a call's numbers a destination field reads."""

    def number(self, call: Call) -> str:
        raise NotImplementedError


class CallerNumber(NumberOf):
    def number(self, call: Call) -> str:
        return call.caller


class CalleeNumber(NumberOf):
    def number(self, call: Call) -> str:
        return call.callee


class ForwardNumber(NumberOf):
    def number(self, call: Call) -> str:
        return call.forward


def _destination(
    which: NumberOf, cache: dict[str, Destination], book: Destinations, call: Call
) -> Destination:
    """Where one of a call's numbers leads (engine.detect.numbers). A rule set reads
    each field it tests for every call, so the common cases cost little: no number
    (most calls are not forwarded) is answered here, and a number seen before is one
    lookup in the cache (the same dict for the process's life: `Destinations.use`
    empties it in place)."""
    number = which.number(call)
    if not number:
        return NO_NUMBER
    found = cache.get(number)
    if found is None:
        found = book.of(number)
    return found


class Country(TextField):
    """The ISO region of a number's plan ("" unknown)."""

    def __init__(self, which: NumberOf, book: Destinations = DESTINATIONS) -> None:
        self.which = which
        self.book = book
        self.cache: dict[str, Destination] = book.cache

    def text(self, call: Call) -> str:
        return _destination(self.which, self.cache, self.book, call).country


class NumberType(TextField):
    """A number's type in its plan (`premium_rate`, `voip`, ..., `unknown`)."""

    def __init__(self, which: NumberOf, book: Destinations = DESTINATIONS) -> None:
        self.which = which
        self.book = book
        self.cache: dict[str, Destination] = book.cache

    def text(self, call: Call) -> str:
        return _destination(self.which, self.cache, self.book, call).kind


class Valid(CallField):
    """Whether a number's plan has it: True, False (unallocated) or None (not judged)."""

    def __init__(self, which: NumberOf, book: Destinations = DESTINATIONS) -> None:
        self.which = which
        self.book = book
        self.cache: dict[str, Destination] = book.cache

    def read(self, call: Call) -> object:
        return _destination(self.which, self.cache, self.book, call).valid


class Abroad(CallField):
    """Whether a number leads out of the site's region: True when its plan's region is
    known and is not `default_region`, False when it is the site's region, None when
    either is unknown (no number, a country code no plan has, and every number while
    `detection.default_region` is unset: without it a site's own numbers written in
    international form would all read as abroad)."""

    def __init__(self, which: NumberOf, book: Destinations = DESTINATIONS) -> None:
        self.which = which
        self.book = book
        self.cache: dict[str, Destination] = book.cache

    def read(self, call: Call) -> object:
        home = self.book.plan.default_region
        if not home:
            return None
        country = _destination(self.which, self.cache, self.book, call).country
        if not country:
            return None
        return country != home


class SiteClock:
    """The hour of the day and the day of the week of event times in the site's time
    zone (`detection.timezone`, handed to the rules as a tzinfo where they are loaded).

    Every UTC offset in use today is a whole number of quarter hours, and changes (DST)
    on a quarter hour, so the local hour and weekday are the same for a whole quarter
    hour of UTC: worked out once per quarter (`at`) and kept; calls come in time order,
    so nearly every call finds its quarter's answer kept. A zone whose offset at a time
    is no whole quarter (local mean times before 1900) is worked out per call."""

    def __init__(self, zone: tzinfo = UTC) -> None:
        self.zone = zone
        self.quarter = -1
        self.hour = 0
        self.weekday = ""

    def at(self, ts: float) -> None:
        quarter = int(ts // 900.0)
        if quarter == self.quarter:
            return
        local = datetime.fromtimestamp(ts, self.zone)
        self.hour = local.hour
        self.weekday = WEEKDAYS[local.weekday()]
        offset = local.utcoffset()
        whole = offset is not None and int(offset.total_seconds()) % 900 == 0
        self.quarter = quarter if whole else -1


class Hour(CallField):
    """The hour (0-23) the call started in, in the site's time zone."""

    def __init__(self, clock: SiteClock) -> None:
        self.clock = clock

    def read(self, call: Call) -> object:
        clock = self.clock
        clock.at(call.started_at)
        return clock.hour


class Weekday(TextField):
    """The day of the week (`mon` ... `sun`) the call started on, in the site's zone."""

    def __init__(self, clock: SiteClock) -> None:
        self.clock = clock

    def text(self, call: Call) -> str:
        clock = self.clock
        clock.at(call.started_at)
        return clock.weekday


def clock_fields(clock: SiteClock) -> dict[str, CallField]:
    """The fields read in the site's time zone, reading `clock`."""
    return {"hour": Hour(clock), "weekday": Weekday(clock)}


def field_of(name: str, clock: SiteClock | None) -> CallField:
    """The reader of a field, in `clock`'s time zone for the local-time fields (UTC
    when None)."""
    if clock is not None and name in CLOCK_FIELDS:
        return clock_fields(clock)[name]
    return FIELDS[name]


_CALLER, _CALLEE, _FORWARD = CallerNumber(), CalleeNumber(), ForwardNumber()
CLOCK_FIELDS = ("hour", "weekday")
# How the fields read from a number's destination end (`callee_country`, ...).
DESTINATION_SUFFIXES = ("_country", "_type", "_valid", "_abroad")

TEXT_FIELDS: dict[str, TextField] = {
    "caller": Caller(),
    "callee": Callee(),
    "forward": Forward(),
    "menu_id": MenuId(),
    "menu_name": MenuName(),
    "outcome": Outcome(),
    "switch": Switch(),
    "caller_country": Country(_CALLER),
    "caller_type": NumberType(_CALLER),
    "callee_country": Country(_CALLEE),
    "callee_type": NumberType(_CALLEE),
    "forward_country": Country(_FORWARD),
    "forward_type": NumberType(_FORWARD),
}
FIELDS: dict[str, CallField] = {
    **TEXT_FIELDS,
    "ring_s": RingSeconds(),
    "talk_s": TalkSeconds(),
    "answered": Answered(),
    "ring_code": RingCode(),
    "caller_valid": Valid(_CALLER),
    "callee_valid": Valid(_CALLEE),
    "forward_valid": Valid(_FORWARD),
    "caller_abroad": Abroad(_CALLER),
    "callee_abroad": Abroad(_CALLEE),
    "forward_abroad": Abroad(_FORWARD),
    **clock_fields(SiteClock()),
}
if set(FIELDS) != set(FieldName.__args__):  # type: ignore[attr-defined]
    raise RuntimeError("fields.FIELDS and schema.FieldName name different fields")

# What a rule's `group_by:` names, as the call's field that names the entity.
ENTITY_FIELDS: dict[str, TextField] = {
    "caller": TEXT_FIELDS["caller"],
    "menu": TEXT_FIELDS["menu_id"],
    "forward": TEXT_FIELDS["forward"],
    "callee": TEXT_FIELDS["callee"],
    "switch": TEXT_FIELDS["switch"],
    "caller_country": TEXT_FIELDS["caller_country"],
    "callee_country": TEXT_FIELDS["callee_country"],
    "forward_country": TEXT_FIELDS["forward_country"],
}
# Between the parts of an entity grouped by several fields (`group_by: [switch,
# caller]` -> "east/8613800000001"). A switch's name has none (its setting refuses it).
ENTITY_JOINER = "/"


class JoinedFields(TextField):
    """An entity named by several fields of a call, joined by ENTITY_JOINER. A call
    with any of them empty names no entity (as one with an empty caller does not)."""

    def __init__(self, parts: list[TextField]) -> None:
        self.parts = parts

    def text(self, call: Call) -> str:
        texts: list[str] = []
        for part in self.parts:
            text = part.text(call)
            if not text:
                return ""
            texts.append(text)
        return ENTITY_JOINER.join(texts)


def entity_field(group_by: tuple[str, ...]) -> TextField:
    """The field naming a rule's entity: one of ENTITY_FIELDS, or those joined."""
    if len(group_by) == 1:
        return ENTITY_FIELDS[group_by[0]]
    return JoinedFields([ENTITY_FIELDS[name] for name in group_by])
