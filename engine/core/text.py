"""Text that came from the network, shown safely; templates checked before they are used.

Caller and callee numbers, forward numbers and menu names come from the switch (or
from whoever can reach its port) and are stored as received, for forensics. Wherever
they are shown (a terminal, a log line, a web page, a notification) they pass
through one function for that kind of output, so an ESC sequence cannot clear a
reviewer's screen, a newline cannot forge a log line, a leading `=` cannot become a
spreadsheet formula, and markup cannot become a link or a tag in a message:

>>> shown("8613800000001\\x1b[2J\\nALERT forged")
'8613800000001\\\\x1b[2J\\\\x0aALERT forged'
>>> shown("Menú principal 主菜单")
'Menú principal 主菜单'
>>> csv_cell("=HYPERLINK(\\"http://x\\")")
'\\'=HYPERLINK("http://x")'
>>> markdown_text("*[pay](http://x)* <b>")
'\\\\*\\\\[pay\\\\](http://x)\\\\* \\\\<b\\\\>'
>>> markdown_text("# Menu 1.2-b")
'\\\\# Menu 1.2-b'
>>> html_text('<img src=x onerror="alert(1)">')
'&lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
>>> syslog_param('a"b]c\\\\d')
'a\\\\"b\\\\]c\\\\\\\\d'

One function per kind of output: `shown` (terminal, log, plain-text message),
`csv_cell` (a spreadsheet), `html_text` (a web page, an HTML e-mail), `markdown_text`
(a chat message: Slack, Teams, Telegram, Discord...), `syslog_param` (an RFC 5424
structured-data value).

Templates (a rule's `summary`, and every template added later) name fields in braces;
`check_template` refuses, at validation, any placeholder that formatting would not
fill, so a typo is a `file:line` error rather than a crash or a silent default:

>>> check_template("caller {entity} made {value} calls", ("entity", "value"))
>>> check_template("{entity.nope}", ("entity", "value"))
Traceback (most recent call last):
...
ValueError: placeholder {entity.nope}: only plain names are accepted (known: entity, value)
"""

from __future__ import annotations

import html
import re
import string
import unicodedata
from collections.abc import Collection, Sequence

# C0 controls, DEL, C1 controls; the Unicode line and paragraph separators; the
# bidirectional marks, embeddings, overrides and isolates (they reorder what follows
# them on screen, so a number could be made to read as another); the byte-order mark.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """`text` for a terminal or a log line: every control or reordering character
    written as a visible escape (`\\x1b`, `\\x0a`, `\\u202e`), everything else as it is."""
    return _UNSAFE.sub(_escape, text)


def display_width(text: str) -> int:
    """The columns `text` takes on a terminal: two for a wide character (CJK), none
    for a combining mark.

    >>> display_width("Menu 1"), display_width("主菜单"), display_width("e\u0301")
    (6, 6, 1)
    """
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def terminal_table(rows: Sequence[Sequence[str]], titles: Sequence[str]) -> list[str]:
    """Lines of a table for a terminal: a header, then the rows; each cell through
    `shown`, each column as wide as its widest cell (the last one as it is).

    >>> for line in terminal_table([["主菜单", "1"], ["x\x1b", "22"]], ["MENU", "N"]):
    ...     print(line)
    MENU    N
    主菜单  1
    x\\x1b   22
    """
    cells = [[shown(cell) for cell in row] for row in rows]
    header = list(titles)
    widths = [
        max([display_width(title), *(display_width(row[i]) for row in cells)])
        for i, title in enumerate(header)
    ]
    return [
        "  ".join(
            cell + " " * (width - display_width(cell))
            for cell, width in zip(row[:-1], widths[:-1], strict=True)
        )
        + "  "
        + row[-1]
        for row in [header, *cells]
    ]


def csv_cell(text: str) -> str:
    """`text` for a CSV cell a spreadsheet will open: escaped as by `shown`, and a
    leading `=`, `+`, `-` or `@` quoted with `'` so it is not read as a formula."""
    safe = shown(text)
    if safe[:1] in ("=", "+", "-", "@"):
        return "'" + safe
    return safe


# What CommonMark (with GitHub's tables and strikethrough) reads as markup inside a
# line: emphasis, code spans, links and images, HTML tags, entities and autolinks,
# table cells, strikethrough, and the backslash itself. Apprise turns CommonMark
# into each chat's own dialect (Slack, Telegram), escapes included.
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&|~])")
# ...and at the start of a line also headings, lists, quotes and thematic breaks (the
# other punctuation there, escaped or not, is text).
_MARKDOWN_LEADING = re.compile(r"^([!\"#$%'()+,\-./:;=?@^{}])")


def markdown_text(text: str) -> str:
    """`text` for a Markdown (CommonMark) message: escaped as by `shown` (so it is one
    line), then every character that would start markup backslash-escaped, so it reads
    as the text it is, wherever in a line it stands."""
    return _MARKDOWN_LEADING.sub(r"\\\1", _MARKDOWN_INLINE.sub(r"\\\1", shown(text)), count=1)


def html_text(text: str) -> str:
    """`text` for HTML (a page, an HTML e-mail, an attribute value in double or single
    quotes): escaped as by `shown`, then `&`, `<`, `>`, `"` and `'` as entities."""
    return html.escape(shown(text), quote=True)


_SYSLOG_SPECIAL = re.compile(r'(["\\\]])')


def syslog_param(text: str) -> str:
    """`text` as an RFC 5424 PARAM-VALUE (inside its double quotes): escaped as by
    `shown` (a SIEM splits on newlines), then `"`, `\\` and `]` backslash-escaped,
    as section 6.3.3 requires."""
    return _SYSLOG_SPECIAL.sub(r"\\\1", shown(text))


def check_template(template: str, fields: Collection[str]) -> None:
    """Raise ValueError naming the first placeholder of `template` that is not one of
    `fields` as a plain `{name}` (no attribute, index or conversion, and a format spec
    only if a text takes it)."""
    known = ", ".join(fields)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"{error} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown_name = "{" + name + "}"
        if not name or name.isdigit():
            raise ValueError(f"placeholder {shown_name}: name a field (known: {known})")
        if not name.isidentifier():
            raise ValueError(
                f"placeholder {shown_name}: only plain names are accepted (known: {known})"
            )
        if name not in fields:
            raise ValueError(f"unknown placeholder {shown_name} (known: {known})")
        if conversion is not None:
            raise ValueError(
                f"placeholder {shown_name}: conversions (!{conversion}) are not accepted"
            )
        if spec:
            if "{" in spec:
                raise ValueError(f"placeholder {shown_name}: nested placeholders are not accepted")
            try:
                format("", spec)
            except ValueError:
                raise ValueError(
                    f"placeholder {shown_name}: format {spec!r} does not apply to text"
                ) from None
