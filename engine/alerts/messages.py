"""Alerts as messages people read: one alert, or a digest of the alerts a channel held
past its rate limit, in the format the channel renders (text, Markdown or HTML).

Text from the network (numbers, menu names, a rule's summary) is escaped for that
format (engine.core.text: markdown_text, html_text, shown); a title holds only our own
words and ids (severity, level, rule id, a count).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.core.text import html_text, markdown_text, shown

# Alerts a digest lists one by one; the rest are counted.
DIGEST_LISTED = 20
FORMATS = ("text", "markdown", "html")


@dataclass(frozen=True)
class Message:
    title: str
    body: str


def alert_link(public_url: str, alert_id: str) -> str:
    """The alert's page in the console ("" when no public URL is set)."""
    return f"{public_url}/alerts/{alert_id}" if public_url else ""


def escape_for(fmt: str) -> Callable[[str], str]:
    return {"markdown": markdown_text, "html": html_text}.get(fmt, shown)


def _field(alert: dict[str, Any], name: str) -> str:
    value = alert.get(name, "")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def number_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float | int) else shown(str(value))


def alert_title(alert: dict[str, Any]) -> str:
    # Only words and ids of our own: a rule id is [a-z0-9_.-] (the rule schema).
    severity = _field(alert, "severity").upper()
    rule_id = _field(alert, "rule_id")
    if alert.get("kind") == "escalation":
        return shown(f"[callsentry] {severity} alert escalated to critical: {rule_id}")
    level = " (warning)" if alert.get("level") == "warning" else ""
    return shown(f"[callsentry] {severity} alert{level}: {rule_id}")


def alert_message(alert: dict[str, Any], fmt: str, public_url: str) -> Message:
    """One alert as a message in `fmt` (text, markdown or html)."""
    esc = escape_for(fmt)
    link = alert_link(public_url, _field(alert, "alert_id"))
    facts = [
        ("Severity", f"{_field(alert, 'severity')} (level {_field(alert, 'level')})"),
        ("Rule", _field(alert, "rule_id")),
        (_field(alert, "entity_type").capitalize() or "Entity", _field(alert, "entity")),
        (
            "Value",
            f"{number_text(alert.get('value'))} (threshold {number_text(alert.get('threshold'))})",
        ),
        ("Raised at", _field(alert, "raised_at")),
        ("Alert", _field(alert, "alert_id")),
    ]
    if alert.get("kind") == "escalation":
        facts.insert(4, ("Escalated at", _field(alert, "escalated_at")))
    tags = alert.get("tags")
    if isinstance(tags, list) and tags:
        facts.append(("Tags", ", ".join(str(tag) for tag in tags)))
    summary = _field(alert, "summary")
    title = alert_title(alert)
    if fmt == "html":
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
        parts = [f"<p>{esc(summary)}</p>", f"<table>{rows}</table>"]
        if link:
            # The address as the link's text too: a mail's plain-text part (made from
            # this by the transport) keeps the text of a link, not its target.
            parts.append(
                f'<p>Open the alert in the console: <a href="{esc(link)}">{esc(link)}</a></p>'
            )
        return Message(title, "\n".join(parts))
    if fmt == "markdown":
        lines = [esc(summary), ""]
        lines += [f"**{esc(k)}:** {esc(v)}  " for k, v in facts]
        if link:
            # The link is ours (the console's URL, checked at load, and a UUID).
            lines += ["", f"[Open the alert in the console](<{link}>)"]
        return Message(title, "\n".join(lines))
    lines = [esc(summary), ""] + [f"{k}: {esc(v)}" for k, v in facts]
    if link:
        lines += ["", f"Open the alert in the console: {link}"]
    return Message(title, "\n".join(lines))


def digest_message(
    alerts: Sequence[dict[str, Any]], fmt: str, public_url: str, limit: int, period_s: float
) -> Message:
    """The alerts a channel held past its rate limit, as one message."""
    esc = escape_for(fmt)
    title = shown(
        f"[callsentry] {len(alerts)} alert{'s' if len(alerts) != 1 else ''} held by the "
        f"rate limit ({limit} message{'s' if limit != 1 else ''} per {period_s:g} s)"
    )
    counts: dict[str, int] = {}
    for alert in alerts:
        severity = _field(alert, "severity")
        counts[severity] = counts.get(severity, 0) + 1
    overview = "By severity: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    listed = alerts[:DIGEST_LISTED]
    rest = len(alerts) - len(listed)
    more = f"... and {rest} more (callsentry alerts list)" if rest else ""
    items: list[tuple[str, str]] = []
    for alert in listed:
        text = (
            f"{_field(alert, 'severity')} {_field(alert, 'rule_id')} "
            f"{_field(alert, 'entity_type')} {_field(alert, 'entity')}: {_field(alert, 'summary')}"
        )
        items.append((text, alert_link(public_url, _field(alert, "alert_id"))))
    if fmt == "html":
        entries = "".join(
            f'<li>{esc(text)} <a href="{esc(link)}">{esc(link)}</a></li>'
            if link
            else f"<li>{esc(text)}</li>"
            for text, link in items
        )
        body = f"<p>{esc(overview)}</p><ul>{entries}</ul>"
        return Message(title, body + (f"<p>{esc(more)}</p>" if more else ""))
    if fmt == "markdown":
        lines = [esc(overview), ""]
        lines += [
            f"- {esc(text)} [open](<{link}>)" if link else f"- {esc(text)}" for text, link in items
        ]
        return Message(title, "\n".join(lines + ([f"\n{esc(more)}"] if more else [])))
    lines = [esc(overview), ""]
    lines += [f"- {esc(text)} {link}".rstrip() for text, link in items]
    return Message(title, "\n".join(lines + ([more] if more else [])))
