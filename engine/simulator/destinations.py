"""Numbers of a given country and type that its numbering plan has, drawn at random.

Incidents that lead abroad (IRSF forward numbers, ramps, Wangiri callers) name a
country (ISO 3166, as engine.detect.numbers gives it) and a number type; the number
is made from libphonenumber's example number of that type, its subscriber digits
drawn at random until the plan accepts the result as a number of that type. So the
numbers are valid E.164 numbers of the country (what detection parses), not only the
prefixes a shipped list names.
"""

from __future__ import annotations

import random

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from engine.detect.numbers import KINDS

# Types incidents may ask for, by the names rules use; "any": the first of the
# usual types the country's plan has an example of.
TYPES: dict[str, int] = {name: code for code, name in KINDS.items()}
USUAL = ("premium_rate", "mobile", "fixed_line", "fixed_line_or_mobile", "voip")
# Digits kept from the example: its leading ones say which range of the plan it is.
KEPT_DIGITS = 3
ATTEMPTS = 200


# Plans that cannot tell fixed from mobile numbers call both "fixed_line_or_mobile".
_ACCEPTED = {
    "fixed_line": (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE),
    "mobile": (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE),
}


def check_country(region: str) -> str:
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{region!r} is not a country the numbering plans know (e.g. LV, CU)")
    return region


def check_kind(kind: str) -> str:
    if kind != "any" and kind not in TYPES:
        raise ValueError(f"{kind!r} is no number type (any, {', '.join(USUAL)}, ...)")
    return kind


def random_number(rng: random.Random, region: str, kind: str = "any") -> str:
    """A number of `region`'s plan of type `kind`, in E.164 (`+...`); for "any", of
    the first usual type the plan gives such numbers of. When no draw is valid, the
    plan's example number (a valid number, only not a random one)."""
    fallback = phonenumbers.example_number(region)
    for name in USUAL if kind == "any" else (kind,):
        example = phonenumbers.example_number_for_type(region, TYPES[name])
        if example is None:
            continue
        fallback = fallback or example
        national = str(example.national_number)
        kept = min(KEPT_DIGITS, max(1, len(national) - 4))
        for _ in range(ATTEMPTS):
            digits = national[:kept] + "".join(
                rng.choice("0123456789") for _ in range(len(national) - kept)
            )
            candidate = phonenumbers.PhoneNumber(
                country_code=example.country_code,
                national_number=int(digits),
                italian_leading_zero=example.italian_leading_zero,
                number_of_leading_zeros=example.number_of_leading_zeros,
            )
            # The region the number's plan gives it, as detection reads it: a +1 900
            # number valid in the Dominican Republic's plan reads as a US one.
            if (
                phonenumbers.is_valid_number_for_region(candidate, region)
                and phonenumbers.region_code_for_number(candidate) == region
                and phonenumbers.number_type(candidate) in _ACCEPTED.get(name, (TYPES[name],))
            ):
                return phonenumbers.format_number(candidate, PhoneNumberFormat.E164)
    if fallback is None:
        raise ValueError(f"the numbering plan of {region} has no example number")
    return phonenumbers.format_number(fallback, PhoneNumberFormat.E164)
