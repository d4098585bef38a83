"""Settings: defaults, then a TOML file, then CALLSENTRY_* environment variables, then flags.

Every protocol choice that docs/protocol.md marks [ours] is a setting here, so a site
whose switch differs changes configuration, not code. Errors name the key, the
source it came from and the reason:

>>> try:
...     load_settings(overrides={"store": {"flush_interval_s": -1}})
... except ConfigError as error:
...     print(error)
store.flush_interval_s (from a flag): Input should be greater than 0
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import stat
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.apps.build import shipped_rules
from engine.core.addresses import parse_hostport

if TYPE_CHECKING:
    from engine.detect.numbers import NumberPlan

ENV_PREFIX = "CALLSENTRY_"
# Where `serve` answers /metrics, /healthz and /readyz unless told otherwise: loopback
# only, on a port no common exporter uses (9100 is node_exporter's).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9810"
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)$")


def time_zone(name: str) -> tzinfo:
    """A time zone by its IANA name; UTC also where the system has no tz database."""
    if name.upper() == "UTC":
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not a time zone name (e.g. UTC, Asia/Shanghai)") from None


def parse_hours(text: str) -> tuple[int, int]:
    """`HH:MM-HH:MM` as minutes of the day, end after start or the next day's when it
    is not (`22:00-06:00`); `00:00-24:00` is the whole day.

    >>> parse_hours("07:30-23:00"), parse_hours("22:00-06:00")
    ((450, 1380), (1320, 360))
    """
    match = _HOURS.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a range of hours as HH:MM-HH:MM (e.g. 07:00-23:00)")
    start = int(match[1]) * 60 + int(match[2])
    end = int(match[3]) * 60 + int(match[4])
    if end > 24 * 60:
        raise ValueError(f"{text!r}: 24:00 is the latest end")
    if start == end:
        raise ValueError(f"{text!r} is empty (for the whole day, write 00:00-24:00)")
    return start, end


class ConfigError(Exception):
    """A setting is wrong; the message names where it came from and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None


def _networks(value: Any) -> Any:
    # One address may be written alone: `east = "10.0.0.5"`.
    return [value] if isinstance(value, str) else value


# A switch's name: stored with every report and call, and part of a rule's entity
# (`group_by: [switch, caller]` names it `east/8613...`), so no '/' and no spaces.
SWITCH_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SWITCH_NAME = re.compile(SWITCH_NAME)


class ReceiverSettings(_Section):
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:8000"], min_length=1)
    # Default: loopback only, so a fresh install answers nobody it was not told about.
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    socket_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=65536)
    # Read and answer datagrams in batches (recvmmsg/sendmmsg) where the platform has them.
    batched_io: bool = True
    # Switch name -> its sender addresses or networks (`[receiver.switches]`, e.g.
    # east = ["10.0.0.5"]); stored as `switch` with every report and call. Each must
    # be within `allow` (a switch the allow-list drops is a mistake, refused here).
    # An address named by none gets switch "".
    switches: dict[str, Annotated[list[str], BeforeValidator(_networks)]] = Field(
        default_factory=dict
    )
    # Where deployment checks may come from (`simulate --send --check`): reports whose
    # call_id starts with "callsentry-check-" from here are answered and stored in the
    # `checks` table, never detected on. A switch's address is never a check sender.
    check_senders: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item)
        return value

    @field_validator("allow", "check_senders")
    @classmethod
    def _check_allow(cls, value: list[str]) -> list[str]:
        for item in value:
            _network(item)
        return value

    @field_validator("switches")
    @classmethod
    def _check_switches(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        named: dict[Any, str] = {}
        for name, addresses in value.items():
            if not _SWITCH_NAME.match(name):
                raise ValueError(
                    f"switch name {name!r}: letters, digits, '_', '.' and '-', at most 64"
                )
            if not addresses:
                raise ValueError(f"switch {name!r} has no address")
            for address in addresses:
                network = _network(address)
                other = named.setdefault(network, name)
                if other != name:
                    raise ValueError(f"{address} is named twice: switch {other!r} and {name!r}")
        return value

    @model_validator(mode="after")
    def _switches_allowed(self) -> ReceiverSettings:
        allowed = [_network(item) for item in self.allow]
        for name, addresses in self.switches.items():
            for address in addresses:
                network = _network(address)
                if not any(
                    network.version == a.version and network.subnet_of(a)  # type: ignore[arg-type]
                    for a in allowed
                ):
                    raise ValueError(
                        f"switches.{name}: {address} is not within receiver.allow "
                        f"({', '.join(self.allow) or 'empty'}), so its reports would be "
                        "dropped; add it to receiver.allow"
                    )
        return self

    def checks_refused(self) -> list[str]:
        """The check senders `allow` does not cover: checks from there are dropped with
        everything else from there (a site may mean that: no checks)."""
        allowed = [_network(item) for item in self.allow]
        return [
            item
            for item in self.check_senders
            if not any(
                _network(item).version == a.version and _network(item).subnet_of(a)  # type: ignore[arg-type]
                for a in allowed
            )
        ]


class CodecSettings(_Section):
    name: Literal["vos3000-text"] = "vos3000-text"
    separator: Literal[",", "|", ";", "\t"] = ","
    encodings: list[str] = Field(default_factory=lambda: ["utf-8", "gbk"], min_length=1)

    @field_validator("encodings")
    @classmethod
    def _check_encodings(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"unknown encoding {name!r}") from None
        return value


class StoreSettings(_Section):
    data_dir: Path = Path("data")
    # Group commit: a batch is made durable when it holds this many reports or
    # when its oldest report has waited this long, whichever comes first.
    commit_max_reports: int = Field(default=4096, ge=1)
    commit_max_delay_ms: float = Field(default=2.0, ge=0, le=1000)
    # Reports accepted but not yet durable. Past this the receiver stops
    # answering new reports: the switch's retries are the back-pressure.
    max_pending_reports: int = Field(default=50_000, ge=1)
    # Reports stored but not yet in the lake (the lake writer behind, under a
    # flood that leaves it no CPU). Past this the receiver stops taking new
    # reports until the lake writer is within half of it: the journal does not
    # grow without bound, and what analysts see stays minutes fresh, not hours.
    # 0: no bound.
    max_lake_backlog: int = Field(default=2_000_000, ge=0)
    fsync: bool = True
    # Under load, start each journal segment as a file of zeros made ahead of time:
    # an fdatasync then changes no file size and needs no filesystem journal commit
    # (a third to half less time on the project's disk). Costs writing those zeros, up to
    # twice the journal's own bytes, and only past a MiB per segment.
    preallocate_journal: bool = True
    flush_interval_s: float = Field(default=2.0, gt=0, le=5)
    compact_interval_s: float = Field(default=60.0, gt=0)
    compact_target_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Copies of one report arrive within the switch's retry span (18 s by
    # default); keys are remembered far longer than that.
    dedup_horizon_s: float = Field(default=3600.0, ge=60)
    # ...but at most this many keys (the newest): each costs the receiver 43 to 85
    # bytes, and the key file beside the lake about 45 (README, "Memory"). Past it
    # the oldest are forgotten early and counted (dedup_forgotten_early).
    max_dedup_keys: int = Field(default=4_000_000, ge=10_000)
    # Reports whose call_id and serial are unreadable are stored at most this
    # many times per minute; the rest are only counted (a garbage flood must
    # not fill the disk).
    quarantine_unkeyed_per_minute: int = Field(default=600, ge=0)
    # Events, rejects and calls older than this many days are deleted once a day
    # (0: kept for ever). Alerts and reviews are always kept.
    retention_days: int = Field(default=0, ge=0)
    # The lake writer's CPU priority. "idle": it runs only when no other process
    # wants the CPU, so answers never wait for it (under a flood the lake and
    # detection fall behind and catch up after). "low": nice 10, for a machine
    # busy with other work, where "idle" could leave the lake behind for long.
    lake_writer_priority: Literal["idle", "low"] = "idle"

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        """A folder, or a path where one can be made: a regular file there (a typo in
        the settings) is said as such, not as whichever file under it each command
        fails to open first. A folder that is missing is made by serve and replay.
        Not a folder inside another data dir (`DATA_DIR/lake/events` for `DATA_DIR`):
        serve and replay would make a data dir of their own among its files."""
        from engine.lake.views import DATABASE

        for parent in value.absolute().parents:
            if (parent / DATABASE).is_file() and (parent / "lake").is_dir():
                raise ValueError(
                    f"{value} is inside the data dir {parent}: give {parent} itself, or "
                    "a folder of its own"
                )
        try:
            mode = value.stat().st_mode
        except NotADirectoryError:
            raise ValueError(f"{value} is under a file, not in a folder") from None
        except OSError:
            return value  # missing (made later), or said by whoever opens it
        if not stat.S_ISDIR(mode):
            raise ValueError(f"{value} is a file, not a folder")
        return value


class DetectionSettings(_Section):
    enabled: bool = True
    # The rule folder. Unset: the rules shipped with this release (`shipped_rules()`,
    # said in the start-up log). Set: that folder, which must exist (never a fallback).
    rules_dir: Path | None = None
    # How often a running engine looks for edited rule files (0: only on SIGHUP).
    reload_interval_s: float = Field(default=5.0, ge=0)
    max_keys_per_rule: int = Field(default=200_000, ge=100)
    # Call tracking, in event time: a call is finished `settle_s` after its Bye
    # (a retried OK may still come), after `ring_timeout_s` of only ringing, or
    # after `max_call_s` without a Bye once answered.
    settle_s: float = Field(default=6.0, ge=0)
    ring_timeout_s: float = Field(default=180.0, gt=0)
    max_call_s: float = Field(default=4 * 3600.0, gt=0)
    abandon_s: float = Field(default=10.0, ge=0)
    # At most this many calls in progress are tracked; past it the oldest are
    # finished as timed out (a flood of calls that never end costs bounded memory).
    max_open_calls: int = Field(default=200_000, ge=1000)
    # With no report for this long, the receiver journals a tick so event time
    # (and call timeouts) move on while traffic is quiet.
    tick_s: float = Field(default=5.0, gt=0)
    # Alerts also go to this JSON-lines file ("" = DATA_DIR/alerts.jsonl, "off" = none)
    # and, when set, are POSTed to this URL through the outbox ([outbox] settings).
    alerts_jsonl: str = ""
    webhook_url: str = ""
    # Sent as `Authorization: Bearer <token>`; better given as the environment
    # variable CALLSENTRY_DETECTION__WEBHOOK_TOKEN than written in a file.
    webhook_token: str = Field(default="", repr=False)
    # Detection state (call tracker, windows, models) is saved to
    # DATA_DIR/state/detection.snapshot this often and on shutdown, and restored on
    # start (0: only on shutdown).
    snapshot_interval_s: float = Field(default=300.0, ge=0)
    # Off: models in rules/models are not run (rules only).
    models_enabled: bool = True
    # The feed-silence alert (rule id `system.feed-silence`): no report for this many
    # seconds of event time within `feed_hours` (in `feed_timezone`) says the switch's
    # feed went quiet. 0: off. Event time, never the wall clock: live, the receiver's
    # ticks move event time on through a silence; a replay sees a gap in its rows.
    feed_silence_s: float = Field(default=0.0, ge=0, le=7 * 86_400)
    feed_hours: list[str] = Field(default_factory=lambda: ["00:00-24:00"], min_length=1)
    feed_timezone: str = "UTC"
    feed_severity: Literal["low", "medium", "high", "critical"] = "high"
    # The site's time zone (an IANA name): the rules' `hour` and `weekday` selections
    # read a call's start in it. Event time, never the wall clock.
    timezone: str = "UTC"
    # How the destination fields (callee_country, forward_type, callee_valid, ...) read
    # a number (engine.detect.numbers): the carrier and trunk prefixes the switch puts
    # before a number, stripped first (the longest that matches, once); the prefixes
    # that introduce a country code ("0044..." is "+44..."); the region (ISO 3166, e.g.
    # "CN") national forms belong to ("": national forms are not judged); and how many
    # numbers' parses are kept.
    dial_prefixes: list[str] = Field(default_factory=list, max_length=1000)
    international_prefixes: list[str] = Field(default_factory=lambda: ["00"], max_length=100)
    default_region: str = ""
    number_cache_size: int = Field(default=100_000, ge=1000, le=10_000_000)

    @field_validator("dial_prefixes", "international_prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str]) -> list[str]:
        from engine.detect.numbers import check_prefix

        for prefix in value:
            check_prefix(prefix)
        return value

    @field_validator("default_region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        from engine.detect.numbers import check_region

        return check_region(value)

    def number_plan(self) -> NumberPlan:
        """How numbers are read (engine.detect.numbers), as these settings say."""
        from engine.detect.numbers import NumberPlan

        return NumberPlan(
            dial_prefixes=tuple(self.dial_prefixes),
            international_prefixes=tuple(self.international_prefixes),
            default_region=self.default_region,
        )

    @property
    def rules_folder(self) -> Path:
        """The rule folder in use: `rules_dir` when set, else the shipped rules."""
        return self.rules_dir if self.rules_dir is not None else shipped_rules()

    @field_validator("feed_hours")
    @classmethod
    def _check_hours(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hours(item)
        return value

    @field_validator("feed_timezone", "timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        time_zone(value)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if "@" in urlsplit(value).netloc:
            # Never sent as credentials (the request would go to a host named
            # 'user:password@host'), and `config check` would print the password.
            raise ValueError(
                "a webhook URL carries no user or password: give a token in "
                "detection.webhook_token (better: CALLSENTRY_DETECTION__WEBHOOK_TOKEN)"
            )
        return value


class OutboxSettings(_Section):
    """Deliveries that leave the machine (the webhook): DATA_DIR/outbox (see
    engine.alerts.outbox), and how its couriers retry (engine.alerts.couriers)."""

    # Still undelivered this long after it was raised: given up, counted and listed
    # (`callsentry alerts deliveries`).
    give_up_after_s: float = Field(default=86_400.0, gt=0, le=365 * 86_400)
    # A failing endpoint is tried again after 1 s, 2 s, 4 s ... up to this.
    max_backoff_s: float = Field(default=60.0, gt=0, le=3600)
    # One attempt's bound (connect, send, answer).
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Delivered and given-up deliveries are listed this long, then dropped (counts stay).
    keep_days: float = Field(default=7.0, gt=0, le=3650)


class MetricsSettings(_Section):
    # HOST:PORT serving /metrics, /healthz and /readyz ("" or "off": none). On by
    # default, on loopback: a scraper on the same machine (or a tunnel) reaches it;
    # the network does not until an operator says which address.
    listen: str = DEFAULT_METRICS_LISTEN
    log_interval_s: float = Field(default=30.0, gt=0)
    # /readyz says not ready while the lake writer is more than this many reports
    # behind (0: no bound); by default half of store.max_lake_backlog, where the
    # receiver starts to refuse reports.
    ready_max_lake_backlog: int = Field(default=1_000_000, ge=0)
    # ... and after this many seconds without a report from the switch (0: the age is
    # reported, never held against readiness: a quiet night is normal at many sites).
    ready_max_report_age_s: float = Field(default=0.0, ge=0)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value.strip().lower() in ("", "off"):
            return ""
        parse_hostport(value)
        return value


def _check_networks(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return value


# A target's name names its cursor in the data dir and its metrics: a plain token.
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class UdpTargetSettings(_Section):
    """One existing consumer of the switch's reports (`[[relay.udp]]`)."""

    # IP:PORT (an address, not a host name: the allow-list is checked on it).
    target: str
    # Names its cursor file and its metrics; default: the address with `_` for `:`.
    name: str = ""
    # The switch's own retry rules (IVR_CALL_REPORT_RETRY and _RETRY_INTERVAL).
    retries: int = Field(default=6, ge=0, le=1000)
    retry_interval_s: float = Field(default=3.0, gt=0, le=3600)
    # "" sends the datagram exactly as the switch sent it; either set re-encodes it.
    separator: Literal["", ",", "|", ";", "\t"] = ""
    encoding: str = ""
    # Reports sent and not yet answered, at most.
    window: int = Field(default=10_000, ge=1, le=1_000_000)

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        host, port = parse_hostport(value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: the host must be an IP address, not a name") from None
        if port == 0:
            raise ValueError(f"{value!r}: port 0 is no target")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value and not _TARGET_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r}: a name is 1 to 64 letters, digits, '_', '.' or '-' "
                "(it names a file and a metric label)"
            )
        return value

    @field_validator("encoding")
    @classmethod
    def _check_encoding(cls, value: str) -> str:
        if value:
            try:
                ascii_kept = "Az09,|;\t".encode(value) == b"Az09,|;\t"
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}") from None
            if not ascii_kept:
                raise ValueError(f"encoding {value!r} does not keep ASCII as it is")
        return value

    @property
    def label(self) -> str:
        host, port = parse_hostport(self.target)
        return self.name or f"{host}_{port}".replace(":", "_")


# A JetStream stream's name: no '.', '*', '>', whitespace or path separators.
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A subject prefix: plain tokens joined by dots.
_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,32}(\.[A-Za-z0-9_-]{1,32}){0,7}")


class NatsSettings(_Section):
    """Publication to NATS JetStream (`[relay.nats]`, engine.relay.nats): reports, finished
    calls, alerts and review verdicts, each once per stream (`Nats-Msg-Id`)."""

    # nats://HOST:PORT (or tls://), one or more servers of one cluster; [] is off.
    # No user or password in a URL: they go in the variable `credentials_env` names.
    urls: list[str] = Field(default_factory=list)
    stream: str = "CALLSENTRY"
    # Subjects are PREFIX.reports.<menu>, PREFIX.calls, PREFIX.alerts.<severity>,
    # PREFIX.reviews.
    subject_prefix: str = "callsentry"
    # The name of an environment variable holding the credentials ("" = none): a token,
    # `user:password`, or the path of a `.creds` file. Its value is never logged or shown.
    credentials_env: str = "CALLSENTRY_NATS_CREDENTIALS"
    # The stream's duplicate window (Nats-Msg-Id kept this long); 0: relay.horizon_s,
    # so whatever the relay may send again within its horizon is dropped by the server.
    duplicate_window_s: float = Field(default=0.0, ge=0, le=30 * 86_400)
    # Create the stream when it is missing (and widen its duplicate window when it is
    # narrower); off: the stream must exist, made by the NATS operator.
    create_stream: bool = True
    # Messages published and not yet acknowledged, at most.
    window: int = Field(default=10_000, ge=1, le=1_000_000)
    # One publication's bound: past it, the message is sent again (same Nats-Msg-Id).
    ack_timeout_s: float = Field(default=5.0, gt=0, le=300)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("nats", "tls"):
                raise ValueError(f"{url!r} is not a nats://HOST:PORT or tls://HOST:PORT URL")
            if "@" in rest:
                raise ValueError(
                    "a URL carries no user or password: put them in the environment "
                    "variable relay.nats.credentials_env names"
                )
            if "/" in rest or not rest:
                raise ValueError(f"{url!r} is not a nats://HOST:PORT URL")
            host, port = parse_hostport(rest, default_port=4222)
            if not host or port == 0:
                raise ValueError(f"{url!r} has no host or port")
        return value

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: str) -> str:
        if not _STREAM_NAME.fullmatch(value):
            raise ValueError(f"{value!r}: a stream name is 1 to 64 letters, digits, '_' or '-'")
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _SUBJECT_PREFIX.fullmatch(value):
            raise ValueError(
                f"{value!r}: a subject prefix is 1 to 8 tokens of letters, digits, '_' or '-' "
                "joined by '.'"
            )
        return value

    @field_validator("credentials_env")
    @classmethod
    def _check_env(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", value):
            raise ValueError(f"{value!r} is not an environment variable's name")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.urls)


class RelaySettings(_Section):
    """Fan-out of every stored live report to the consumers that listened before."""

    udp: list[UdpTargetSettings] = Field(default_factory=list)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    # Targets must be in these networks (default: loopback only, as receiver.allow).
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Journal segments are kept for a target that is down this long at most; past it
    # (or past `max_held_bytes`) the oldest go, and their reports are counted as given up.
    horizon_s: float = Field(default=86_400.0, ge=60)
    max_held_bytes: int = Field(default=4 << 30, ge=1 << 20)
    # As store.lake_writer_priority: "idle" relays with spare CPU only, so answers to
    # the switch never wait for it; "low" is nice 10.
    priority: Literal["idle", "low"] = "idle"

    @field_validator("allow")
    @classmethod
    def _check_allow(cls, value: list[str]) -> list[str]:
        return _check_networks(value)

    @model_validator(mode="after")
    def _check_targets(self) -> RelaySettings:
        networks = [ipaddress.ip_network(item, strict=False) for item in self.allow]
        names: set[str] = set()
        for target in self.udp:
            host, _ = parse_hostport(target.target)
            address = ipaddress.ip_address(host)
            if not any(address in network for network in networks):
                raise ValueError(
                    f"target {target.target} is not in relay.allow "
                    f"({', '.join(self.allow) or 'empty'})"
                )
            if target.label in names:
                raise ValueError(f"two targets are named {target.label!r}; give each a name")
            names.add(target.label)
        if self.nats.enabled and "nats" in names:
            raise ValueError("a UDP target is named 'nats', the name of the NATS publication")
        return self

    @property
    def enabled(self) -> bool:
        """Anything to relay or publish: the relay process runs."""
        return bool(self.udp) or self.nats.enabled

    @property
    def nats_duplicate_window_s(self) -> float:
        return self.nats.duplicate_window_s or self.horizon_s


# `${NAME}` in a channel's URL: the environment variable NAME's value (a token or a
# password stays out of the settings file, and out of `config check`).
_ENV_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_environment(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """`text` with each `${NAME}` replaced by that variable's value, and the values put
    in (to scrub them from any error text); ValueError naming a variable that is unset.

    >>> expand_environment("tgram://${BOT}/1", {"BOT": "123:abc"})
    ('tgram://123:abc/1', ['123:abc'])
    """
    secrets: list[str] = []

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"${{{name}}} does not name an environment variable")
        if name not in environ:
            raise ValueError(f"environment variable {name} (named as ${{{name}}}) is not set")
        secrets.append(environ[name])
        return environ[name]

    return _ENV_REFERENCE.sub(value, text), [s for s in secrets if s]


class ChannelSettings(_Section):
    """A notification channel (`[[notify.channels]]`): an Apprise URL or a syslog
    receiver, and which alerts it takes (each list empty: any; all lists must match)."""

    # Names the channel's outbox destination (`notify.NAME`), its metrics and state.
    name: str
    # An Apprise URL (mailtos://, slack://, msteams://, tgram://, json://, ...); `${NAME}`
    # takes a secret from the environment variable NAME. Exactly one of url and syslog.
    url: str = Field(default="", repr=False)
    # A syslog receiver, RFC 5424: udp://HOST:PORT or tcp://HOST:PORT (default port 514).
    syslog: str = ""
    facility: str = "local0"
    severities: list[Literal["low", "medium", "high", "critical"]] = Field(default_factory=list)
    # An alert's level (warning or critical; an alert without one is at its rule's main
    # threshold, so critical).
    levels: list[Literal["warning", "critical"]] = Field(default_factory=list)
    # Rule or model ids, shell-style patterns (`short-calls-*`).
    rules: list[str] = Field(default_factory=list)
    # Any of these tags of the alert's rule.
    tags: list[str] = Field(default_factory=list)
    # At most this many messages per `rate_period_s`; past it the alerts wait and go
    # together in one digest. 0: no limit. Unset: 20 for a URL, 0 for syslog (a SIEM
    # wants every event).
    rate_limit: int | None = Field(default=None, ge=0, le=100_000)
    rate_period_s: float = Field(default=3600.0, gt=0, le=86_400)
    # The URL with its `${NAME}`s expanded, and their values: never shown or logged.
    _expanded: str = PrivateAttr(default="")
    _secrets: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _TARGET_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r}: a channel's name is 1 to 64 letters, digits, '_', '.' or '-' "
                "(it names an outbox destination and a metric label)"
            )
        return value

    @field_validator("facility")
    @classmethod
    def _check_facility(cls, value: str) -> str:
        from engine.alerts.transports import SYSLOG_FACILITIES

        if value not in SYSLOG_FACILITIES:
            raise ValueError(f"{value!r} is not a syslog facility ({', '.join(SYSLOG_FACILITIES)})")
        return value

    @model_validator(mode="after")
    def _check_target(self, info: ValidationInfo) -> ChannelSettings:
        where = f"channel {self.name!r}"
        if bool(self.url) == bool(self.syslog):
            raise ValueError(f"{where}: give either url (an Apprise URL) or syslog, not both")
        if self.syslog:
            syslog_target(self.syslog, where)
            return self
        environ = (info.context or {}).get("environ", os.environ)
        try:
            expanded, secrets = expand_environment(self.url, environ)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        problem = apprise_problem(expanded)
        if problem:
            raise ValueError(f"{where}: {problem}")
        self._expanded = expanded
        self._secrets = tuple(secrets)
        return self

    @property
    def label(self) -> str:
        """The channel's outbox destination."""
        return f"notify.{self.name}"

    @property
    def limit(self) -> int:
        if self.rate_limit is not None:
            return self.rate_limit
        return 0 if self.syslog else 20

    @property
    def expanded_url(self) -> str:
        return self._expanded

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def shown(self) -> dict[str, Any]:
        """The channel as `config check` prints it: the URL with its tokens and
        passwords masked."""
        data = self.model_dump(mode="json")
        if self.url:
            data["url"] = apprise_masked(self._expanded)
        data["rate_limit"] = self.limit
        return data


def syslog_target(text: str, where: str = "syslog") -> tuple[str, str, int]:
    """`udp://HOST:PORT` or `tcp://HOST:PORT` -> (protocol, host, port)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("udp", "tcp"):
        raise ValueError(f"{where}: syslog {text!r} is not udp://HOST:PORT or tcp://HOST:PORT")
    try:
        host, port = parse_hostport(rest, 514)
    except ValueError as error:
        raise ValueError(f"{where}: syslog {error}") from None
    if not host or port == 0 or "/" in host:
        raise ValueError(f"{where}: syslog {text!r} names no host and port")
    return scheme, host, port


def _apprise() -> Any:
    import apprise  # only where channels are configured: it loads its many plugins

    return apprise


def apprise_problem(url: str) -> str:
    """Why Apprise cannot use `url` ("" when it can); never quotes the URL (it may hold a
    token), only its scheme."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if not scheme:
        return "url is not an Apprise URL (SCHEME://..., e.g. mailtos://, slack://, json://)"
    apprise = _apprise()
    if apprise.Apprise.instantiate(url, asset=apprise.AppriseAsset(storage_mode="memory")) is None:
        return (
            f"url ({shown_scheme(scheme)}://...) is not a URL Apprise can use: an unknown "
            "scheme, or a part missing or malformed (see the Apprise documentation "
            "for that service)"
        )
    return ""


def shown_scheme(scheme: str) -> str:
    return scheme if re.fullmatch(r"[A-Za-z0-9+.-]{1,32}", scheme) else "?"


def apprise_masked(url: str) -> str:
    apprise = _apprise()
    service = apprise.Apprise.instantiate(url, asset=apprise.AppriseAsset(storage_mode="memory"))
    return str(service.url(privacy=True)) if service is not None else "(not shown)"


class NotifySettings(_Section):
    """Notifications that reach people (engine.alerts.notify): each channel gets the
    alerts it routes, through the outbox ([outbox] settings)."""

    channels: list[ChannelSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_names(self) -> NotifySettings:
        names: set[str] = set()
        for channel in self.channels:
            if channel.name in names:
                raise ValueError(f"two channels are named {channel.name!r}")
            names.add(channel.name)
        return self


class ConsoleSettings(_Section):
    # Where people reach the console (https://callsentry.example.org): each notification
    # links to {public_url}/alerts/{alert_id}. "": messages name the alert id only.
    public_url: str = ""
    # The tariff list (engine/console/tariffs.py; rules/tariffs/tariffs.yaml is an
    # example): with it the queue can be sorted by estimated exposure. Unset: no
    # exposure. `config check` reads and validates the file.
    tariffs: Path | None = None

    @field_validator("public_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not re.fullmatch(r"https?://[^\s\x00-\x1f\x7f\"'<>\\`{}|^]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class Settings(_Section):
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """CALLSENTRY_STORE__DATA_DIR=/x -> {"store": {"data_dir": "/x"}}; values are TOML literals
    when they parse as one (numbers, booleans, ["lists"]), plain strings otherwise."""
    layer: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        import tomllib  # only where a setting comes from the environment or a file

        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} conflicts with another variable")
        node[path[-1]] = value
        origin[".".join(path)] = f"environment variable {name}"
    return layer, origin


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.extend(_flatten(value, path + ".") if isinstance(value, Mapping) else [path])
    return keys


def load_settings(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults < TOML file < environment < flags (`overrides`), validated once."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        import tomllib

        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: config file is not UTF-8 text") from None
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: {error}") from None
        origin.update((key, str(path)) for key in _flatten(tree))
    environ = os.environ if environ is None else environ
    env_layer, env_origin = _env_layer(environ)
    tree = _merge(tree, env_layer)
    origin.update(env_origin)
    if overrides:
        tree = _merge(tree, overrides)
        origin.update((key, "a flag") for key in _flatten(overrides))
    try:
        # The environment also fills the `${NAME}`s of channel URLs.
        return Settings.model_validate(tree, context={"environ": environ})
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"])
            # A section-wide check (relay targets against relay.allow) names the source
            # of a key inside it.
            source = next(
                (
                    src
                    for k, src in origin.items()
                    if key == k or key.startswith(k + ".") or k.startswith(key + ".")
                ),
                None,
            )
            message = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                message = "unknown setting"
            where = f" (from {source})" if source else ""
            lines.append(f"{key}{where}: {message}")
        raise ConfigError("\n".join(lines)) from None
