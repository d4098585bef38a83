"""How a notification channel's messages leave: an Apprise URL (e-mail, Slack, Teams,
Telegram, JSON...) or a syslog receiver (RFC 5424 over UDP or TCP). A transport sends
one alert or one digest and raises DeliveryError when the message did not go; the
channel's rate limit and the outbox around it are engine.alerts.notify's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from engine.alerts.couriers import DeliveryError
from engine.alerts.messages import (
    FORMATS,
    Message,
    alert_link,
    alert_message,
    digest_message,
    escape_for,
    number_text,
)
from engine.core.text import shown, syslog_param


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
        title = escape_for(fmt)(message.title) if service.title_maxlen <= 0 else message.title
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
            value = alert.get(name)
            if value is None:
                continue  # not there, or none (escalated_at of an alert not escalated)
            params[name] = number_text(value) if name in ("value", "threshold") else str(value)
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
