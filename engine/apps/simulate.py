"""`callsentry simulate`: generate a scenario, write it to files, or send it over UDP."""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from engine.core.durations import parse_duration
from engine.core.events import CHECK_CALL_ID_PREFIX, MAX_CALL_ID_BYTES, CallEvent
from engine.core.runtime import run_async
from engine.core.text import shown
from engine.core.yamlfile import YamlFileError
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.eventfiles import EventFileError, read_event_file
from engine.simulator.consumer import ConsumerStandIn
from engine.simulator.scenario import (
    Parts,
    generate,
    load_scenario,
    write_files,
    write_parts,
)
from engine.simulator.switch import SwitchSettings, SwitchStandIn

# Bad rows of an --events file said one by one; the rest are counted.
_BAD_ROWS_SAID = 20


class SimulateError(Exception):
    """Bad arguments or inputs for simulate; the message says which and why. `code`:
    the exit code, 2 for what the command line asks that cannot be taken as given, 1
    for a file, an address or the network that let it down (README, "exit code")."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _host(host: str) -> str:
    """`--host` as a resolver takes it: an IPv6 address may be written in brackets, as
    the README writes it for `--listen`."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def _check_target(host: str, allow_remote: bool) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)}
    except socket.gaierror as error:
        raise SimulateError(f"--host {host!r}: {error.strerror}", 1) from None
    if allow_remote:
        return
    for address in addresses:
        if not ipaddress.ip_address(str(address).split("%", 1)[0]).is_loopback:
            raise SimulateError(
                f"--host {host} is not a loopback address; simulate sends only to this "
                "machine unless you pass --allow-remote"
            )


@dataclass(frozen=True)
class SimulateOptions:
    """The `simulate` command's options, one field per flag."""

    scenario: Path | None
    events_file: Path | None
    to_file: Path | None
    file_format: str
    send: bool
    host: str
    port: int
    allow_remote: bool
    speed: float
    rate: float
    window: int
    retries: int
    retry_interval: float
    request_loss: float
    answer_loss: float
    separator: str
    encoding: str
    seed: int | None
    duration: str | None = None
    consume: bool = False
    consume_for: float = 0.0
    drop: float = 0.0
    quiet: bool = False
    check: bool = False


def run_consume(options: SimulateOptions, echo: Callable[[str], None]) -> int:
    """`simulate --consume`: answer reports as an existing consumer until SIGINT/SIGTERM
    (or `--for` seconds), printing each, then what came: duplicates, gaps, order."""
    if (
        options.scenario is not None
        or options.events_file is not None
        or options.send
        or options.check
    ):
        raise SimulateError(
            "--consume receives reports; it sends none (no --scenario/--send/--check)"
        )
    try:
        consumer = ConsumerStandIn(
            options.host,
            options.port,
            separator=options.separator,
            encodings=(options.encoding,),
            drop=options.drop,
            seed=options.seed,
            echo=None if options.quiet else echo,
        )
    except ValueError as error:
        raise SimulateError(str(error)) from None
    except OSError as error:
        raise SimulateError(
            f"cannot listen on {options.host}:{options.port}: {error.strerror or error}", 1
        ) from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host, port = consumer.address
    echo(f"consuming reports on udp {host}:{port}; Ctrl-C to stop")
    consumer.start()
    stop.wait(options.consume_for or None)
    consumer.stop()
    for line in consumer.received.lines():
        echo(line)
    return 0


def as_checks(events: list[CallEvent]) -> list[CallEvent]:
    """The reports marked as deployment checks: call ids with the reserved prefix
    (docs/protocol.md, "Check reports"), cut to the protocol's limit if need be."""
    return [
        event._replace(
            call_id=(CHECK_CALL_ID_PREFIX + event.call_id)
            .encode("utf-8")[:MAX_CALL_ID_BYTES]
            .decode("utf-8", "ignore")
        )
        for event in events
    ]


class _Counted(Parts):
    """A scenario's parts, counting the reports in them as they go by."""

    def __init__(self, parts: Parts) -> None:
        super().__init__(parts.scenario, parts.part_s)
        self._parts = parts
        self.reports = 0

    def __iter__(self) -> Iterator[list[CallEvent]]:
        for part in self._parts:
            self.reports += len(part)
            yield part
        self.labels = self._parts.labels


def _check_encodable(events: list[CallEvent], codec: Vos3000TextCodec, encoding: str) -> None:
    """Every report can be sent in --encoding, or nothing is sent: a scenario's menu
    names are Chinese, Spanish and more, which latin-1 or ascii cannot hold, and a
    report found unencodable half-way through would leave a run half sent."""
    if codecs.lookup(encoding).name == "utf-8":
        return  # holds any text
    for event in events:
        try:
            codec.encode(event)
        except UnicodeEncodeError as error:
            text = error.object[error.start : error.end]
            raise SimulateError(
                f"--encoding {encoding} cannot encode '{shown(text)}' in the report "
                f"{shown(event.call_id)},{event.serial}; nothing was sent (utf-8 holds any text)"
            ) from None


def _cannot_write(to_file: Path, error: OSError) -> SimulateError:
    """--to-file's folder or a file in it could not be made or written (a path under a
    regular file, a read-only or full disk): which, and why, without Python's errno."""
    where = error.filename if error.filename else to_file
    return SimulateError(f"--to-file {to_file}: cannot write {where}: {error.strerror or error}", 1)


def run_simulate(options: SimulateOptions, echo: Callable[[str], None]) -> int:
    options = dataclasses.replace(options, host=_host(options.host))
    if options.consume:
        return run_consume(options, echo)
    scenario, events_file, to_file = options.scenario, options.events_file, options.to_file
    send, seed = options.send, options.seed
    if (scenario is None) == (events_file is None):
        raise SimulateError("give exactly one of --scenario FILE or --events FILE")
    if not send and to_file is None:
        raise SimulateError("say what to do: --to-file DIR, --send, or both")
    if options.check and not send:
        raise SimulateError("--check marks the reports sent; it needs --send")
    if events_file is not None and to_file is not None:
        raise SimulateError("--to-file writes a scenario's files; --events already is one")
    try:
        codec = Vos3000TextCodec(separator=options.separator, encodings=(options.encoding,))
    except ValueError as error:
        raise SimulateError(str(error)) from None

    events: list[CallEvent]
    if scenario is not None:
        try:
            # --seed draws the scenario's ranges too, not only its traffic.
            spec = load_scenario(scenario, seed)
        except YamlFileError as error:
            # A file that is not there or cannot be read: 1; one that says what cannot
            # be, as an invalid rule does: 2.
            readable = scenario.is_file() and os.access(scenario, os.R_OK)
            raise SimulateError(str(error), 2 if readable else 1) from None
        if options.duration is not None:
            try:
                duration = parse_duration(options.duration)
            except ValueError as error:
                raise SimulateError(f"--duration: {error}") from None
            try:
                spec = spec.lasting(duration)
            except ValidationError as error:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
                raise SimulateError(f"--duration {options.duration}: {problems}") from None
        if not send:
            assert to_file is not None
            # Written a day of event time at a time: a month is never held at once.
            parts = Parts(spec)
            counted = _Counted(parts)
            try:
                events_path, labels_path = write_parts(counted, to_file, options.file_format)
            except OSError as error:
                raise _cannot_write(to_file, error) from None
            echo(
                f"scenario {shown(spec.name)}: {parts.calls} calls, {counted.reports} reports, "
                f"{len(parts.labels)} labelled incidents"
            )
            echo(f"wrote {shown(str(events_path))} and {shown(str(labels_path))}")
            return 0
        generated = generate(spec)
        events = generated.events
        echo(
            f"scenario {shown(spec.name)}: {generated.calls} calls, {len(events)} reports, "
            f"{len(generated.labels)} labelled incidents"
        )
        if to_file is not None:
            try:
                events_path, labels_path = write_files(generated, to_file, options.file_format)
            except OSError as error:
                raise _cannot_write(to_file, error) from None
            echo(f"wrote {shown(str(events_path))} and {shown(str(labels_path))}")
    else:
        assert events_file is not None
        try:
            items = read_event_file(events_file)
        except EventFileError as error:
            raise SimulateError(str(error), 1) from None
        events = [item for item in items if isinstance(item, CallEvent)]
        bad = [item for item in items if not isinstance(item, CallEvent)]
        events.sort(key=lambda e: e.ts)
        echo(
            f"{events_file}: {len(events)} reports"
            + (f", {len(bad)} bad rows skipped" if bad else "")
        )
        # Which, and why, as replay says them (the first few).
        for reject in bad[:_BAD_ROWS_SAID]:
            echo(shown(f"  {reject.said()}"))
        if len(bad) > _BAD_ROWS_SAID:
            echo(f"  ... and {len(bad) - _BAD_ROWS_SAID} more")
    if not send:
        return 0
    if options.check:
        events = as_checks(events)
        echo(
            f"sending as deployment checks (call ids start with {CHECK_CALL_ID_PREFIX}): "
            "a receiver that lists this host in receiver.check_senders stores them in its "
            "checks table and never detects on them"
        )

    _check_target(options.host, options.allow_remote)
    _check_encodable(events, codec, options.encoding)
    try:
        settings = SwitchSettings(
            host=options.host,
            port=options.port,
            retries=options.retries,
            retry_interval_s=options.retry_interval,
            rate=options.rate,
            window=options.window,
            request_loss=options.request_loss,
            answer_loss=options.answer_loss,
        )
    except ValueError as error:
        raise SimulateError(str(error)) from None
    offsets = None
    if options.speed > 0 and events:
        first = events[0].ts
        offsets = [(event.ts - first) / options.speed for event in events]
        echo(f"sending at {options.speed:g}x: {offsets[-1]:.0f} s of wall time")
    summary = run_async(SwitchStandIn(codec, settings).send(events, offsets))
    for line in summary.lines():
        echo(line)
    if summary.given_up:
        echo(f"FAILED: {summary.given_up} reports were never answered")
        return 1
    echo("OK: every report was answered")
    if options.check:
        # Answered is journaled; the checks table is the lake's, written moments later.
        echo(
            "the receiver lists them in its checks table once its lake writer has "
            "written them, within seconds: `callsentry checks list` there"
        )
    return 0
