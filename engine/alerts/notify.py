"""Notifications that reach people: each channel (an Apprise URL: e-mail, Slack, Teams,
Telegram, JSON...; or a syslog receiver) takes the alerts its route matches, through
the outbox (engine.alerts.outbox), so a channel is one more destination: at least
once, never in detection's way, counted with the others.

The path of an alert:

    lake writer: NotifySink.deliver -> route -> Outbox row (notify.NAME, alert_id, payload)
    serve:       Courier(notify.NAME) -> NotifyDestination.send -> rate limit ->
                 a message now, or held for the channel's digest

Rate limit and digest. A channel sends at most `limit` messages in any `period_s`
(sliding, wall clock: it protects the people reading). An alert that finds the limit
reached, or finds alerts already held, is held in `DATA_DIR/outbox/notify.sqlite3`
and a digest delivery is enqueued for the channel, due when the limit lets one
message through again (the oldest send of the period, plus the period). The digest
is keyed by that time, so every alert held in one burst names the same digest (the
outbox keeps one row per key), and it sends all that is held when it goes, as one
message, then releases them. Each step is on disk before the one after it:

- an alert is held (committed) and its digest enqueued (committed) before `send`
  returns, so the courier marks the alert delivered only once both hold; a crash in
  between delivers the alert again, which finds itself held and enqueues the same
  digest key again: a no-op.
- the held alerts are released (committed) only after the digest was sent; a crash
  in between sends the digest again (at least once, as every delivery).

Text from the network (numbers, menu names, a rule's summary) is escaped for the
format the channel reads (engine.core.text: markdown_text, html_text, shown,
syslog_param): the format an Apprise service renders natively (HTML mail, Markdown
for chat, text elsewhere) is what is written, so Apprise converts nothing. A title
holds only our own words and ids (severity, level, rule id, a count).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.alerts.outbox import DeliveryError, Outbox, OutboxError
from engine.core.text import html_text, markdown_text, shown, syslog_param

if TYPE_CHECKING:
    from engine.detect.alerts import Alert

log = logging.getLogger(__name__)

# A digest's key in the outbox; an alert's key is its alert_id (a UUID), never this.
DIGEST_PREFIX = "digest:"
# Alerts a digest lists one by one; the rest are counted.
DIGEST_LISTED = 20
FORMATS = ("text", "markdown", "html")


def alert_level(alert: Alert) -> str:
    """An alert's level: `warning` or `critical` (an escalation's is `critical`: a route
    for critical takes the escalation of an alert raised at warning). An alert that
    carries none was raised at its rule's one (main) threshold, the critical one."""
    return str(getattr(alert, "level", "") or "critical")


# -- routing (in the lake writer) -----------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Which alerts a channel takes: every non-empty condition must hold."""

    severities: frozenset[str] = frozenset()
    levels: frozenset[str] = frozenset()
    # Rule or model ids, shell-style patterns.
    rules: tuple[str, ...] = ()
    # The alert's rule has at least one of these.
    tags: frozenset[str] = frozenset()

    def takes(self, alert: Alert, tags: Collection[str]) -> bool:
        if self.severities and alert.severity not in self.severities:
            return False
        if self.levels and alert_level(alert) not in self.levels:
            return False
        if self.rules and not any(fnmatch.fnmatchcase(alert.rule_id, p) for p in self.rules):
            return False
        return not self.tags or not self.tags.isdisjoint(tags)


class NotifySink:
    """An alert sink (in the lake writer) that enqueues each alert (not shadow ones) for
    every channel whose route takes it; `deliver` returns once they are durable.
    `tags_of(rule_id)`: the tags of the rule that raised an alert (none for a model)."""

    def __init__(
        self,
        outbox: Outbox,
        routes: Sequence[tuple[str, Route]],
        tags_of: Callable[[str], Collection[str]] = lambda rule_id: (),
    ) -> None:
        self.outbox = outbox
        self.routes = list(routes)
        self.tags_of = tags_of

    def deliver(self, alerts: Sequence[Alert]) -> None:
        items: list[tuple[str, str, bytes]] = []
        for alert in alerts:
            if alert.mode != "alert":
                continue
            tags = sorted(self.tags_of(alert.rule_id))
            payload = b""
            for destination, route in self.routes:
                if route.takes(alert, tags):
                    payload = payload or notification_payload(alert, tags)
                    items.append((destination, alert.delivery_key, payload))
        self.outbox.enqueue_many(items)

    def close(self) -> None:
        self.outbox.close()


def notification_payload(alert: Alert, tags: Sequence[str]) -> bytes:
    data = {**alert.as_json(), "level": alert_level(alert), "tags": list(tags)}
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


# -- messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    title: str
    body: str


def alert_link(public_url: str, alert_id: str) -> str:
    """The alert's page in the console ("" when no public URL is set)."""
    return f"{public_url}/alerts/{alert_id}" if public_url else ""


def _escape(fmt: str) -> Callable[[str], str]:
    return {"markdown": markdown_text, "html": html_text}.get(fmt, shown)


def _field(alert: dict[str, Any], name: str) -> str:
    value = alert.get(name, "")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(value: object) -> str:
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
    esc = _escape(fmt)
    link = alert_link(public_url, _field(alert, "alert_id"))
    facts = [
        ("Severity", f"{_field(alert, 'severity')} (level {_field(alert, 'level')})"),
        ("Rule", _field(alert, "rule_id")),
        (_field(alert, "entity_type").capitalize() or "Entity", _field(alert, "entity")),
        ("Value", f"{_number(alert.get('value'))} (threshold {_number(alert.get('threshold'))})"),
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
            parts.append(f'<p><a href="{esc(link)}">Open the alert in the console</a></p>')
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
    esc = _escape(fmt)
    title = shown(
        f"[callsentry] {len(alerts)} alert{'s' if len(alerts) != 1 else ''} held by the "
        f"rate limit ({limit} messages per {period_s:g} s)"
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
            f'<li>{esc(text)} <a href="{esc(link)}">open</a></li>'
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


# -- transports -----------------------------------------------------------------------


class Transport(Protocol):
    """How a channel's messages leave: one alert, or a digest of held ones."""

    def send_alert(self, alert: dict[str, Any], public_url: str) -> None: ...

    def send_digest(
        self, alerts: Sequence[dict[str, Any]], public_url: str, limit: int, period_s: float
    ) -> None: ...


class _ThreadLog(logging.Handler):
    """What Apprise logs while this thread sends, for the error a failed send reports
    (each courier is a thread of its own)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(self.local, "lines", None)
        if lines is not None:
            lines.append(record.getMessage())


_APPRISE_LOG: _ThreadLog | None = None
_APPRISE_LOCK = threading.Lock()


def _apprise_log() -> _ThreadLog:
    global _APPRISE_LOG
    with _APPRISE_LOCK:
        if _APPRISE_LOG is None:
            handler = _ThreadLog()
            logger = logging.getLogger("apprise")
            # Apprise's own lines may quote a URL with its token: they are kept, scrubbed,
            # only as the reason of a failed delivery, never passed on to the log as is.
            logger.propagate = False
            logger.setLevel(logging.WARNING)
            logger.addHandler(handler)
            _APPRISE_LOG = handler
        return _APPRISE_LOG


class AppriseTransport:
    """An Apprise URL. The message is written in the format the service renders (its
    `resolve_format`), so Apprise converts nothing. The URL (with its secrets) and the
    secrets themselves never appear in an error or a log line: they are scrubbed."""

    def __init__(self, url: str, *, secrets: Sequence[str] = (), timeout_s: float = 10.0) -> None:
        self._url = url
        self._secrets = [s for s in secrets if s]
        self.timeout_s = timeout_s
        self._service: Any = None
        self._apprise: Any = None

    def __repr__(self) -> str:
        return "AppriseTransport(url not shown)"

    def _ready(self) -> Any:
        if self._service is None:
            import apprise  # in serve's courier thread only, when a channel is configured

            asset = apprise.AppriseAsset(storage_mode="memory", async_mode=False)
            service = apprise.Apprise.instantiate(self._url, asset=asset)
            if service is None:
                raise DeliveryError("the channel's URL is not one Apprise can use")
            service.socket_connect_timeout = self.timeout_s
            service.socket_read_timeout = self.timeout_s
            self._service = service
        return self._service

    @property
    def format(self) -> str:
        value = str(self._ready().resolve_format(None).value)
        return value if value in FORMATS else "text"

    def _scrub(self, text: str) -> str:
        for secret in [self._url, *self._secrets]:
            text = text.replace(secret, "***")
        return shown(text)

    def _notify(self, message: Message) -> None:
        service = self._ready()
        fmt = self.format
        # A service that folds the title into the body reads it in the body's format.
        title = _escape(fmt)(message.title) if service.title_maxlen <= 0 else message.title
        handler = _apprise_log()
        handler.local.lines = []
        try:
            sent = service.notify(body=message.body, title=title, body_format=fmt)
        except Exception as error:  # a plugin's bug must not end the courier
            raise DeliveryError(self._scrub(f"{type(error).__name__}: {error}")) from None
        finally:
            lines = handler.local.lines
            handler.local.lines = None
        if not sent:
            reason = "; ".join(lines[-2:]) or "the service did not accept the message"
            raise DeliveryError(self._scrub(reason))

    def send_alert(self, alert: dict[str, Any], public_url: str) -> None:
        self._notify(alert_message(alert, self.format, public_url))

    def send_digest(
        self, alerts: Sequence[dict[str, Any]], public_url: str, limit: int, period_s: float
    ) -> None:
        self._notify(digest_message(alerts, self.format, public_url, limit, period_s))


# RFC 5424 numbers: facilities, and the severity each alert severity is sent as.
SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
_FACILITY = {name: number for number, name in enumerate(SYSLOG_FACILITIES)}
_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}
# The structured data's id: a name of ours at the private enterprise number RFC 5612
# reserves for documentation (32473); a site with its own number can map it.
SD_ID = "callsentry@32473"
_SD_FIELDS = (
    "alert_id",
    "rule_id",
    "detector",
    "severity",
    "level",
    "kind",
    "entity_type",
    "entity",
    "value",
    "threshold",
    "window_start",
    "window_end",
    "raised_at",
    "escalated_at",
    "rule_version",
)
_BOM = "\ufeff"


def _header_token(text: str, limit: int) -> str:
    """A header field of RFC 5424: printable US-ASCII without spaces, or `-`."""
    kept = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return kept or "-"


def syslog_line(
    alert: dict[str, Any] | None,
    *,
    facility: str,
    public_url: str,
    now: float,
    hostname: str,
    summary: str = "",
    severity: str = "",
    extra: dict[str, str] | None = None,
) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOST callsentry PROCID MSGID [SD] BOM MSG`."""
    params: dict[str, str] = {}
    if alert is not None:
        for name in _SD_FIELDS:
            if name in alert:
                value = alert[name]
                params[name] = _number(value) if name in ("value", "threshold") else str(value)
        tags = alert.get("tags")
        if isinstance(tags, list) and tags:
            params["tags"] = ",".join(str(tag) for tag in tags)
        link = alert_link(public_url, str(alert.get("alert_id", "")))
        if link:
            params["link"] = link
        summary = str(alert.get("summary", ""))
        severity = str(alert.get("severity", ""))
    params.update(extra or {})
    pri = _FACILITY[facility] * 8 + _SEVERITY.get(severity, 5)
    stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    msgid = "alert" if alert is not None else "digest"
    data = " ".join(f'{name}="{syslog_param(value)}"' for name, value in params.items())
    head = (
        f"<{pri}>1 {stamp} {_header_token(hostname, 255)} callsentry "
        f"{_header_token(str(os.getpid()), 128)} {msgid}"
    )
    return f"{head} [{SD_ID} {data}] {_BOM}{shown(summary)}".encode()


class SyslogTransport:
    """RFC 5424 messages to a syslog receiver (a SIEM): UDP (one datagram each) or TCP
    (octet-counted frames, RFC 6587), a connection per message."""

    format = "syslog"

    def __init__(
        self,
        protocol: str,
        host: str,
        port: int,
        *,
        facility: str = "local0",
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.protocol = protocol
        self.host = host
        self.port = port
        self.facility = facility
        self.timeout_s = timeout_s
        self.clock = clock
        self.hostname = socket.gethostname()

    def _send(self, line: bytes) -> None:
        kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=kind)
            family, _, _, _, address = infos[0]
            with socket.socket(family, kind) as sock:
                sock.settimeout(self.timeout_s)
                if self.protocol == "udp":
                    sock.sendto(line, address)
                else:
                    sock.connect(address)
                    sock.sendall(b"%d " % len(line) + line)
        except OSError as error:
            raise DeliveryError(
                shown(f"syslog {self.protocol}://{self.host}:{self.port}: {error}")
            ) from None

    def send_alert(self, alert: dict[str, Any], public_url: str) -> None:
        self._send(
            syslog_line(
                alert,
                facility=self.facility,
                public_url=public_url,
                now=self.clock(),
                hostname=self.hostname,
            )
        )

    def send_digest(
        self, alerts: Sequence[dict[str, Any]], public_url: str, limit: int, period_s: float
    ) -> None:
        ids = [str(alert.get("alert_id", "")) for alert in alerts]
        worst = min((str(a.get("severity", "")) for a in alerts), key=_rank, default="low")
        self._send(
            syslog_line(
                None,
                facility=self.facility,
                public_url=public_url,
                now=self.clock(),
                hostname=self.hostname,
                summary=f"{len(alerts)} alerts held by the rate limit ({limit} per {period_s:g} s)",
                severity=worst,
                extra={"count": str(len(alerts)), "alert_ids": ",".join(ids)},
            )
        )


def _rank(severity: str) -> int:
    return _SEVERITY.get(severity, 9)


# -- the channel's rate limit and digest -----------------------------------------------


def notify_state_path(data_dir: Path) -> Path:
    return data_dir / "outbox" / "notify.sqlite3"


_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (channel TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sent_at ON sent (channel, at);
CREATE TABLE IF NOT EXISTS held (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    held_at REAL NOT NULL,
    PRIMARY KEY (channel, key)
);
"""


class ChannelState:
    """Each channel's recent sends and held alerts (SQLite, WAL, every commit on disk):
    the memory of the rate limit across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, check_same_thread=False, timeout=10, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_STATE_SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise OutboxError(f"notification state {path}: {error}") from None

    def _run(self, statements: Callable[[sqlite3.Connection], list[Any]]) -> list[Any]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = statements(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                raise OutboxError(f"notification state {self.path}: {error}") from None

    def sent_since(self, channel: str, since: float) -> list[float]:
        return self._run(
            lambda db: [
                float(at)
                for (at,) in db.execute(
                    "SELECT at FROM sent WHERE channel = ? AND at > ? ORDER BY at",
                    (channel, since),
                )
            ]
        )

    def record_sent(self, channel: str, at: float, forget_before: float) -> None:
        def record(db: sqlite3.Connection) -> list[Any]:
            db.execute("INSERT INTO sent (channel, at) VALUES (?, ?)", (channel, at))
            db.execute("DELETE FROM sent WHERE channel = ? AND at <= ?", (channel, forget_before))
            return []

        self._run(record)

    def hold(self, channel: str, key: str, payload: bytes, at: float) -> None:
        self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO held (channel, key, payload, held_at) VALUES (?, ?, ?, ?)",
                (channel, key, payload, at),
            ).fetchall()
        )

    def holds(self, channel: str) -> bool:
        return bool(
            self._run(
                lambda db: db.execute(
                    "SELECT 1 FROM held WHERE channel = ? LIMIT 1", (channel,)
                ).fetchall()
            )
        )

    def held(self, channel: str) -> list[tuple[str, bytes]]:
        return self._run(
            lambda db: db.execute(
                "SELECT key, payload FROM held WHERE channel = ? ORDER BY held_at, key",
                (channel,),
            ).fetchall()
        )

    def release(self, channel: str, keys: Sequence[str], at: float, forget_before: float) -> None:
        """The held `keys` went out in a digest at `at` (one send of the rate limit)."""

        def release(db: sqlite3.Connection) -> list[Any]:
            db.executemany(
                "DELETE FROM held WHERE channel = ? AND key = ?", [(channel, k) for k in keys]
            )
            db.execute("INSERT INTO sent (channel, at) VALUES (?, ?)", (channel, at))
            db.execute("DELETE FROM sent WHERE channel = ? AND at <= ?", (channel, forget_before))
            return []

        self._run(release)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NotifyDestination:
    """A notification channel as an outbox destination (`notify.NAME`): sends each alert
    delivered to it, within the channel's rate limit, and its digests (see the module's
    description)."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        data_dir: Path,
        *,
        limit: int = 0,
        period_s: float = 3600.0,
        public_url: str = "",
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.transport = transport
        self.data_dir = data_dir
        self.limit = limit
        self.period_s = period_s
        self.public_url = public_url
        self.clock = clock
        self._outbox = outbox
        self._state: ChannelState | None = None

    def _ready(self) -> tuple[ChannelState, Outbox]:
        if self._state is None:
            self._state = ChannelState(notify_state_path(self.data_dir))
        if self._outbox is None:
            self._outbox = Outbox.of(self.data_dir)
        return self._state, self._outbox

    def send(self, key: str, payload: bytes) -> None:
        if key.startswith(DIGEST_PREFIX):
            self._send_digest()
            return
        alert = _alert_of(payload)
        if self.limit <= 0:
            self.transport.send_alert(alert, self.public_url)
            return
        state, outbox = self._ready()
        now = self.clock()
        recent = state.sent_since(self.name, now - self.period_s)
        if len(recent) >= self.limit or state.holds(self.name):
            state.hold(self.name, key, payload, now)
            # While alerts are held no message but the digest goes out, so `recent` is
            # the same for every alert of the burst, and so is the digest's key.
            due = max(recent[0] + self.period_s, now) if recent else now
            outbox.enqueue_later(self.name, f"{DIGEST_PREFIX}{due:.6f}", b"", due)
            return
        self.transport.send_alert(alert, self.public_url)
        state.record_sent(self.name, now, now - self.period_s)

    def _send_digest(self) -> None:
        state, _ = self._ready()
        held = state.held(self.name)
        if not held:
            return  # sent before a crash, released, and delivered again: nothing to do
        alerts = [_alert_of(payload) for _, payload in held]
        self.transport.send_digest(alerts, self.public_url, self.limit, self.period_s)
        now = self.clock()
        state.release(self.name, [key for key, _ in held], now, now - self.period_s)
        log.info("%s: a digest of %d alerts went out", self.name, len(held))

    def close(self) -> None:
        if self._state is not None:
            self._state.close()


def _alert_of(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise DeliveryError("not an alert (unreadable payload)", refused=True) from None
    if not isinstance(data, dict):
        raise DeliveryError("not an alert (payload is no JSON object)", refused=True)
    return data
