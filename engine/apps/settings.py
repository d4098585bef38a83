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
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.core.addresses import parse_hostport

ENV_PREFIX = "CALLSENTRY_"


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


class DetectionSettings(_Section):
    enabled: bool = True
    rules_dir: Path = Path("rules")
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
    max_open_calls: int = Field(default=1_000_000, ge=1000)
    # With no report for this long, the receiver journals a tick so event time
    # (and call timeouts) move on while traffic is quiet.
    tick_s: float = Field(default=5.0, gt=0)
    # Alerts also go to this JSON-lines file ("" = DATA_DIR/alerts.jsonl, "off" = none)
    # and, when set, are POSTed to this URL.
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

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class MetricsSettings(_Section):
    # HOST:PORT serving /metrics, /healthz and /readyz ("": none).
    listen: str = ""
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
        if value:
            parse_hostport(value)
        return value


class Settings(_Section):
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """CALLSENTRY_STORE__DATA_DIR=/x -> {"store": {"data_dir": "/x"}}; values are TOML literals
    when they parse as one (numbers, booleans, ["lists"]), plain strings otherwise."""
    layer: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
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
    env_layer, env_origin = _env_layer(os.environ if environ is None else environ)
    tree = _merge(tree, env_layer)
    origin.update(env_origin)
    if overrides:
        tree = _merge(tree, overrides)
        origin.update((key, "a flag") for key in _flatten(overrides))
    try:
        return Settings.model_validate(tree)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"])
            source = next(
                (src for k, src in origin.items() if key == k or key.startswith(k + ".")),
                None,
            )
            message = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                message = "unknown setting"
            where = f" (from {source})" if source else ""
            lines.append(f"{key}{where}: {message}")
        raise ConfigError("\n".join(lines)) from None
