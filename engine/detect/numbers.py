"""Where a number leads: its country, its type and whether its numbering plan has it.

The switch reports numbers as they were dialled: `0044 20 7946 0000` (the international
prefix), `17951 0044...` (a carrier prefix first), `+88213000001`, or a national form
(`13800000001`, `4008001000`) that means something only in a region. A `NumberPlan`
says how to read them: the carrier and trunk prefixes to strip (`dial_prefixes`, the
longest that matches, once), the prefixes that introduce a country code
(`international_prefixes`, read as "+"), and the region national forms belong to
(`default_region`, an ISO 3166 code as phonenumbers knows it; "" reads no national
form: such numbers are not judged). Parsing is Google's libphonenumber metadata
(the `phonenumbers` package), pinned in pyproject.toml.

A `Destination` is what detection's fields read (engine.detect.fields):

- `country`: the ISO region of the number's plan ("001": the non-geographic plans,
  satellite and international networks, +881/+882/+883/+870/+979), "" when unknown;
- `kind`: `fixed_line`, `mobile`, `fixed_line_or_mobile`, `toll_free`, `premium_rate`,
  `shared_cost`, `voip`, `personal`, `pager`, `uan`, `voicemail`, or `unknown`
  ("" for no number at all);
- `valid`: whether the plan has the number (phonenumbers' `is_valid_number`): False is
  what rules call unallocated; None when it cannot be judged (no number, no digits,
  or a national form with no default region).

Parsing a number costs far more than looking it up (figures in bench/README.md):
`Destinations` keeps what it found per number text, up to `cache_size` numbers (the
oldest forgotten first), so the callees and forward numbers an IVR sees over and
over cost one dictionary lookup, and a flood of distinct numbers costs bounded memory.

>>> plan = NumberPlan(dial_prefixes=("17951",), default_region="CN")
>>> book = Destinations(plan)
>>> book.of("1795100442079460000").country, book.of("0044 20 7946 0000").kind
('GB', 'fixed_line')
>>> book.of("13800000001").country, book.of("+882130000001").valid
('CN', False)
>>> Destinations(NumberPlan()).of("13800000001").valid is None  # no region: not judged
True
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

# What phonenumbers calls the number types, as rules name them.
KINDS: dict[int, str] = {
    PhoneNumberType.FIXED_LINE: "fixed_line",
    PhoneNumberType.MOBILE: "mobile",
    PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_line_or_mobile",
    PhoneNumberType.TOLL_FREE: "toll_free",
    PhoneNumberType.PREMIUM_RATE: "premium_rate",
    PhoneNumberType.SHARED_COST: "shared_cost",
    PhoneNumberType.VOIP: "voip",
    PhoneNumberType.PERSONAL_NUMBER: "personal",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.UAN: "uan",
    PhoneNumberType.VOICEMAIL: "voicemail",
    PhoneNumberType.UNKNOWN: "unknown",
}
KIND_NAMES = (*KINDS.values(),)
# The region phonenumbers gives the non-geographic plans (+800, +881, +882, ...).
NON_GEOGRAPHIC = "001"
# Every region a number's `country` can be: what a country list may name.
REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS) | {NON_GEOGRAPHIC}
# A number text longer than this is no number of any plan (E.164 allows 15 digits;
# prefixes and separators come on top): not parsed, and not kept in the cache.
MAX_NUMBER_CHARS = 64
DEFAULT_CACHE_SIZE = 100_000


def check_region(region: str) -> str:
    """`region` if it is "" or a region phonenumbers has metadata for; else ValueError."""
    if region and region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"{region!r} is not a region the numbering plans know "
            "(an ISO 3166 code in capitals, such as CN or GB)"
        )
    return region


def check_prefix(prefix: str) -> str:
    """A dial prefix: digits (and * or #), 1 to 12 characters; else ValueError."""
    if not 1 <= len(prefix) <= 12 or any(c not in "0123456789*#" for c in prefix):
        raise ValueError(f"{prefix!r} is no dial prefix (1 to 12 digits, * or #)")
    return prefix


@dataclass(frozen=True)
class NumberPlan:
    """How the switch's numbers are read (see the module's docstring)."""

    dial_prefixes: tuple[str, ...] = ()
    international_prefixes: tuple[str, ...] = ("00",)
    default_region: str = ""

    def __post_init__(self) -> None:
        check_region(self.default_region)
        for prefix in (*self.dial_prefixes, *self.international_prefixes):
            check_prefix(prefix)


@dataclass(frozen=True, slots=True)
class Destination:
    country: str
    kind: str
    valid: bool | None


NO_NUMBER = Destination("", "", None)
NOT_JUDGED = Destination("", "unknown", None)
NOT_IN_ANY_PLAN = Destination("", "unknown", False)


def _longest(prefixes: tuple[str, ...], text: str) -> str:
    found = ""
    for prefix in prefixes:
        if len(prefix) > len(found) and len(text) > len(prefix) and text.startswith(prefix):
            found = prefix
    return found


class Destinations:
    """Numbers read by one `NumberPlan`, each parsed once while it is in the cache."""

    def __init__(
        self, plan: NumberPlan | None = None, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.plan = plan or NumberPlan()
        self.cache_size = max(1, cache_size)
        self.cache: dict[str, Destination] = {}
        # One object per (country, kind, valid): the cache holds references, not copies.
        self.interned: dict[tuple[str, str, bool | None], Destination] = {}

    def use(self, plan: NumberPlan, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """Read numbers by `plan` from now on (what was found by another is forgotten).
        The cache is emptied in place: detection's fields hold it (engine.detect.fields)."""
        self.plan = plan
        self.cache_size = max(1, cache_size)
        self.cache.clear()

    def of(self, number: str) -> Destination:
        found = self.cache.get(number)
        if found is not None:
            return found
        found = self.parse(number)
        if len(number) <= MAX_NUMBER_CHARS:
            cache = self.cache
            if len(cache) >= self.cache_size:
                # The oldest entry (a dict keeps insertion order): no bookkeeping per
                # lookup, and a flood of distinct numbers cannot grow it.
                del cache[next(iter(cache))]
            cache[number] = found
        return found

    def parse(self, number: str) -> Destination:
        """The destination of `number`, parsed afresh."""
        text = "".join(number.split())
        if not text:
            return NO_NUMBER
        if len(text) > MAX_NUMBER_CHARS or not any(c.isdigit() for c in text):
            return NOT_JUDGED if len(text) <= MAX_NUMBER_CHARS else NOT_IN_ANY_PLAN
        plan = self.plan
        text = text[len(_longest(plan.dial_prefixes, text)) :]
        if not text.startswith("+"):
            international = _longest(plan.international_prefixes, text)
            if international:
                text = "+" + text[len(international) :]
        region = plan.default_region or None
        if region is None and not text.startswith("+"):
            return NOT_JUDGED
        try:
            parsed = phonenumbers.parse(text, region)
        except NumberParseException:
            return NOT_IN_ANY_PLAN
        country = phonenumbers.region_code_for_number(parsed) or (
            phonenumbers.region_code_for_country_code(parsed.country_code or 0)
        )
        if country not in REGIONS:
            country = ""  # "ZZ": a country code no plan has
        kind = KINDS.get(phonenumbers.number_type(parsed), "unknown")
        valid = phonenumbers.is_valid_number(parsed)
        key = (country, kind, valid)
        shared = self.interned.get(key)
        if shared is None:
            shared = self.interned[key] = Destination(country, kind, valid)
        return shared


# The destinations detection's fields read (engine.detect.fields). One per process: the
# process's composition root (engine.apps) sets its plan from the settings with `use`
# before detection starts; until then no national form is judged.
DESTINATIONS = Destinations()
