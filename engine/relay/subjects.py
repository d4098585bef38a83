"""NATS subjects and message ids made from network text.

A subject is tokens joined by `.`; a token must not be empty nor hold `.`, `*`, `>`
or whitespace. A menu id comes from the switch (network text), so it is encoded:

- letters, digits, `-` and `_` stay as they are;
- every other character is written as `%XX` per byte of its UTF-8 (upper-case hex),
  `%` itself included, so the encoding is reversible (`decode_token`) and two
  different texts never give the same token;
- the empty text is `%` alone (no other text encodes to it: every other `%` is
  followed by two hex digits);
- a text whose encoding is longer than 96 characters is `%%` and the SHA-256 of its
  UTF-8 in hex (64 characters): still one token, and collision-free in practice, but
  not reversible; the message's body carries the text itself.

>>> encode_token("main"), encode_token("menu 1.2"), encode_token(""), encode_token("*")
('main', 'menu%201%2E2', '%', '%2A')
>>> decode_token("menu%201%2E2")
'menu 1.2'

A message id (`Nats-Msg-Id`) travels in a header, so it must not hold CR, LF or `:`
trouble either; it is built from tokens encoded the same way, prefixed by its kind
(`r` report, `c` call, `a` alert, `v` review) so kinds never collide in one stream.
"""

from __future__ import annotations

import hashlib

_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX = "0123456789ABCDEF"
# Past this many characters an encoded token is replaced by its hash.
MAX_TOKEN = 96


def encode_token(text: str) -> str:
    """One valid subject token for `text` (see the module's rule)."""
    if not text:
        return "%"
    if all(char in _PLAIN for char in text) and len(text) <= MAX_TOKEN:
        return text
    out: list[str] = []
    for char in text:
        if char in _PLAIN:
            out.append(char)
        else:
            for byte in char.encode("utf-8", "surrogatepass"):
                out.append(f"%{_HEX[byte >> 4]}{_HEX[byte & 15]}")
    token = "".join(out)
    if len(token) > MAX_TOKEN:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"%%{digest}"
    return token


def decode_token(token: str) -> str:
    """The text `encode_token` made `token` from; ValueError for a hashed token (not
    reversible) or for anything `encode_token` does not make."""
    if token == "%":
        return ""
    if token.startswith("%%"):
        raise ValueError("a hashed token cannot be decoded; the message body has the text")
    raw = bytearray()
    index = 0
    while index < len(token):
        char = token[index]
        if char == "%":
            pair = token[index + 1 : index + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError(f"bad escape at {index}")
            raw.append(int(pair, 16))
            index += 3
        elif char in _PLAIN:
            raw.extend(char.encode("ascii"))
            index += 1
        else:
            raise ValueError(f"{char!r} is not in an encoded token")
    return raw.decode("utf-8", "surrogatepass")


def is_token(token: str) -> bool:
    """A valid NATS subject token: not empty, no `.`, `*`, `>` or whitespace."""
    return bool(token) and not any(c in ".*>" or c.isspace() for c in token)


class Subjects:
    """The subjects of one deployment (`prefix` from relay.nats.subject_prefix)."""

    def __init__(self, prefix: str = "callsentry") -> None:
        self.prefix = prefix
        self.calls = f"{prefix}.calls"
        self.reviews = f"{prefix}.reviews"
        # The stream's subjects.
        self.all = [f"{prefix}.reports.>", self.calls, f"{prefix}.alerts.>", self.reviews]
        self._menus: dict[str, str] = {}

    def report(self, menu_id: str) -> str:
        subject = self._menus.get(menu_id)
        if subject is None:
            subject = f"{self.prefix}.reports.{encode_token(menu_id)}"
            if len(self._menus) < 10_000:
                self._menus[menu_id] = subject
        return subject

    def alert(self, severity: str) -> str:
        return f"{self.prefix}.alerts.{encode_token(severity)}"


def report_id(switch: str, call_id: str, serial: int) -> str:
    """A report's Nats-Msg-Id: the switch (its source address), call_id and serial."""
    return f"r:{encode_token(switch)}:{encode_token(call_id)}:{serial}"


def call_id_key(call_id: str) -> str:
    return f"c:{encode_token(call_id)}"


def alert_key(alert_id: str) -> str:
    return f"a:{encode_token(alert_id)}"


def review_key(row_id: str) -> str:
    return f"v:{encode_token(row_id)}"
