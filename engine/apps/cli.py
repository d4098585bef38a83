"""The `callsentry` command and its subcommands. What they share (errors as one line and
an exit code, the common options, settings, logging) is in engine/apps/commandline.py."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.apps.actions import actions
from engine.apps.alerts_commands import alerts
from engine.apps.blocklist_commands import blocklist
from engine.apps.commandline import (
    UNEXPECTED,
    CommandLine,
    FiniteFloatRange,
    command_ended,
    config_option,
    data_dir_option,
    end_at_once_when_done,
    fail,
    fail_rules,
    fail_with_problems,
    log_level_option,
    missing_files,
    os_error_text,
    settings_or_fail,
    setup_logging,
)
from engine.apps.console import console
from engine.apps.notifycli import notify
from engine.apps.rules_commands import rules
from engine.core.text import shown

# Each command imports what it needs when it runs: `--help` and the small commands
# start without pydantic's models, asyncio or the store.
if TYPE_CHECKING:
    from engine.core.events import Reject

log = logging.getLogger("callsentry")

__all__ = ["UNEXPECTED", "main"]


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callsentry")
def main() -> None:
    """callsentry: fraud and anomaly detection for a VOS3000 IVR's call-state reports."""


def run() -> None:
    """The `callsentry` program (and `python -m engine`): `main`, and the process ends
    at once when it is over (`end_at_once_when_done`). Whoever calls `main` in a
    process of its own (a test) ends it as usual."""
    end_at_once_when_done()
    try:
        main()
    except SystemExit as end:
        command_ended(end.code)
        raise
    command_ended(0)


@main.command()
def version() -> None:
    """The installed release: version, Python, whether its compiled parts are in use,
    and where its shipped rules are."""
    from engine.apps.build import build_info, shipped_rules, uncompiled_parts

    info = build_info()
    click.echo(f"callsentry {info['version']} (Python {info['python']})")
    missing = uncompiled_parts()
    if missing:
        for part in missing:
            click.echo(f"without compiled parts: {part}")
    else:
        click.echo("compiled parts: all in use (detection by mypyc, the C helpers)")
    click.echo(f"shipped rules: {shipped_rules()}")


@main.command()
@config_option
@click.option("--listen", multiple=True, help="UDP HOST:PORT to receive on (repeatable).")
@data_dir_option
@click.option("--allow", multiple=True, help="Sender CIDR allowed to report (repeatable).")
@click.option("--metrics", default=None, help="HOST:PORT for Prometheus metrics over HTTP.")
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Rule folder (default: detection.rules_dir, else the rules shipped with callsentry). "
    "Edits are picked up while serving, and on SIGHUP.",
)
@click.option(
    "--relay-udp",
    multiple=True,
    help="Pass every stored report on to this UDP consumer IP:PORT, with the switch's "
    "retries (repeatable; adds to [[relay.udp]]).",
)
@click.option(
    "--relay-nats",
    default=None,
    metavar="nats://HOST:PORT",
    help="Publish reports, calls, alerts and reviews to NATS JetStream there "
    "(sets relay.nats.urls; credentials from $CALLSENTRY_NATS_CREDENTIALS).",
)
@click.option(
    "--relay-allow",
    multiple=True,
    help="Network CIDR relay targets may be in (repeatable; default: loopback only).",
)
@log_level_option
def serve(
    config: Path | None,
    listen: tuple[str, ...],
    data_dir: Path | None,
    allow: tuple[str, ...],
    metrics: str | None,
    rules_dir: Path | None,
    relay_udp: tuple[str, ...],
    relay_nats: str | None,
    relay_allow: tuple[str, ...],
    log_level: str,
) -> None:
    """Receive, store and answer the switch's reports until SIGTERM or SIGINT."""
    overrides: dict[str, Any] = {}
    if relay_udp or relay_allow:
        overrides["relay"] = _relay_overrides(config, relay_udp, relay_allow)
    if relay_nats is not None:
        overrides.setdefault("relay", {})["nats"] = {"urls": [relay_nats]}
    if listen:
        overrides.setdefault("receiver", {})["listen"] = list(listen)
    if allow:
        overrides.setdefault("receiver", {})["allow"] = list(allow)
    if data_dir is not None:
        overrides.setdefault("store", {})["data_dir"] = str(data_dir)
    if metrics is not None:
        overrides.setdefault("metrics", {})["listen"] = metrics
    if rules_dir is not None:
        overrides.setdefault("detection", {})["rules_dir"] = str(rules_dir)
    settings = settings_or_fail(config, overrides)
    setup_logging(log_level)
    from engine.apps.serve import serve as serve_forever
    from engine.core.yamlfile import YamlFileError
    from engine.ingest.store import StoreError

    try:
        from engine.core.runtime import run_async

        code = run_async(serve_forever(settings))
    except StoreError as error:
        fail(str(error))
    except YamlFileError as error:
        fail_rules(error)
    except OSError as error:
        fail(os_error_text(error))
    sys.exit(code)


def _relay_overrides(
    config: Path | None, relay_udp: tuple[str, ...], relay_allow: tuple[str, ...]
) -> dict[str, Any]:
    """`--relay-udp` adds to the targets the settings name (a flag overrides a list whole,
    so the list is read first)."""
    overrides: dict[str, Any] = {}
    if relay_udp:
        configured = settings_or_fail(config, {}).relay.udp
        overrides["udp"] = [t.model_dump() for t in configured] + [
            {"target": target} for target in relay_udp
        ]
    if relay_allow:
        overrides["allow"] = list(relay_allow)
    return overrides


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@config_option
@data_dir_option
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Rule folder (default: detection.rules_dir, else the shipped rules).",
)
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Rejected rows and alerts to list.",
)
@log_level_option
def replay(
    files: tuple[Path, ...],
    config: Path | None,
    data_dir: Path | None,
    rules_dir: Path | None,
    show: int,
    log_level: str,
) -> None:
    """Feed event files (CSV, JSONL, Parquet) through the pipeline in event time.

    Exit code 0: every row stored; 1: some rows were rejected (listed, and kept
    in the rejects table) or a file could not be read; 2: the rules or the settings
    are invalid (nothing was replayed).
    """
    from engine.lake.views import ViewsFile

    # Started first, the process that writes the analysts' views file loads DuckDB
    # while this one loads the rest (run_replay tells it what to write, and closes it).
    views = ViewsFile()
    loading = None
    try:
        overrides: dict[str, Any] = {}
        if data_dir is not None:
            overrides["store"] = {"data_dir": str(data_dir)}
        settings = settings_or_fail(config, overrides)
        setup_logging(log_level)
        missing = missing_files(files)
        if missing:
            # A mistyped name: said before a data dir is made for nothing.
            fail(f"no such file: {', '.join(missing)}; nothing was replayed")

        from engine.apps.detectfork import start_loading
        from engine.core.runtime import tune_gc_for_detection

        tune_gc_for_detection()
        # Forked before the imports below: detection (its modules, rules, models and
        # state) loads in a process of its own while this one loads polars and the
        # lake's modules and opens the store (run_replay waits for it, and closes it).
        loading = start_loading(settings, rules_dir, views.pipe_ends())

        from engine.apps.progress import ProgressBar, on_terminal
        from engine.apps.replay import Progress
        from engine.apps.replay import replay as run_replay
        from engine.core.yamlfile import YamlFileError
        from engine.ingest.eventfiles import parquet_rows
        from engine.ingest.store import StoreError
        from engine.lake.parquet import storage_errors

        total = parquet_rows(files)
        progress = ProgressBar(total) if on_terminal() else Progress(total)
    except BaseException:
        if loading is not None:
            loading.close()
        views.close()
        raise
    try:
        report = run_replay(
            list(files), settings, rules_dir, progress=progress, views=views, loading=loading
        )
    except StoreError as error:
        fail(str(error))
    except YamlFileError as error:
        fail_rules(error)
    except storage_errors() as error:
        # A full or read-only disk under the data dir, in whichever library's words.
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        fail(
            f"replay stopped: cannot write to {settings.store.data_dir}: {reason}; what was "
            "stored stays, and the same replay again carries on"
        )
    for problem in report.file_errors:
        click.echo(shown(problem), err=True)
    if report.read == 0 and not report.file_errors:
        # Not an error (nothing was dropped), but seldom what was meant: an export
        # that wrote no rows, or the wrong file.
        said = ", ".join(str(path) for path in files)
        click.echo(f"{shown(said)}: no rows to replay (empty, or a header alone)", err=True)

    def file_line(reject: Reject) -> tuple[str, int]:
        # Stored in event-time order (a bad row's time is the last good row's before
        # it); said in the order of the file's lines.
        name, _, line = reject.source.rpartition(":")
        return (name, int(line)) if line.isdigit() else (reject.source, 0)

    for reject in sorted(report.rejects, key=file_line)[:show]:
        click.echo(shown(reject.said()), err=True)
    if len(report.rejects) > show:
        click.echo(
            f"... and {len(report.rejects) - show} more rejected rows (see the rejects table)",
            err=True,
        )
    click.echo(
        f"replayed {report.read} rows: {report.stored - len(report.rejects)} events stored, "
        f"{len(report.rejects)} rejected, {report.duplicates} duplicates skipped, "
        f"{len(report.file_errors)} files unreadable"
    )
    if report.late:
        click.echo(
            f"{report.late} rows came after later rows had been taken (a file out of "
            "event-time order across its parts): stored, and detected late; sort the "
            "file by ts for the result of an ordered one",
            err=True,
        )
    raised = [a for a in report.alerts if not a.escalation]
    live = [a for a in raised if a.mode == "alert"]
    escalated = sum(1 for a in report.alerts if a.escalation and a.mode == "alert")
    warnings = sum(1 for a in live if a.level == "warning")
    click.echo(
        f"{report.calls} calls rebuilt; {len(live)} alerts ({warnings} raised at warning, "
        f"{escalated} of them escalated to critical), {len(raised) - len(live)} shadow alerts"
    )
    # Past these bounds detection forgets: an operator must see when a replay met them.
    click.echo(
        f"evicted: {report.evicted.keys} entities from rule state "
        f"(detection.max_keys_per_rule {settings.detection.max_keys_per_rule}), "
        f"{report.evicted.calls} calls in progress "
        f"(detection.max_open_calls {settings.detection.max_open_calls})"
    )
    for alert in live[:show]:
        click.echo(f"  [{alert.severity}/{alert.level}] {alert.rule_id}: {shown(alert.summary)}")
    if len(live) > show:
        click.echo(f"  ... and {len(live) - show} more (SELECT * FROM alerts)")
    from engine.lake.views import analysts_command

    click.echo(f"query them: {analysts_command(settings.store.data_dir)}")
    if not report.clean:
        unreadable = len(report.file_errors)
        fail(f"{len(report.rejects)} rows rejected, {unreadable} of {len(files)} files unreadable")
    sys.exit(0)


@main.group()
def relay() -> None:
    """The relay to existing consumers: where each target's cursor is."""


@relay.command("status")
@data_dir_option
@config_option
def relay_status(data_dir: Path | None, config: Path | None) -> None:
    """Each relay target's state, cursor, lag and counts, as the relay last saved them."""
    import time

    from engine.apps.relay import status_lines
    from engine.relay.state import RelayStateError

    directory = data_dir or settings_or_fail(config, {}).store.data_dir
    if not directory.is_dir():
        fail(f"data dir {directory} does not exist")
    try:
        lines = status_lines(directory, time.time())
    except RelayStateError as error:
        fail(str(error))
    for line in lines:
        click.echo(line)


@main.group()
def config() -> None:
    """Settings."""


@config.command("check")
@config_option
def config_check(config: Path | None) -> None:
    """Validate settings (file, environment) and print the result."""
    from engine.apps.settingstext import settings_lines

    settings = settings_or_fail(config, {})
    for line in settings_lines(settings, os.environ):
        click.echo(line)
    if settings.console.tariffs is not None:
        from engine.console.tariffs import load_tariffs
        from engine.core.yamlfile import YamlFileError

        try:
            tariffs = load_tariffs(settings.console.tariffs)
        except YamlFileError as error:
            fail_with_problems(error, "the tariff list is invalid ({count} problem(s))", 2)
        click.echo(
            f"# console.tariffs: {len(tariffs.tariffs)} destination(s), in {tariffs.currency}"
        )
    click.echo("configuration OK", err=True)


@main.command()
@click.option(
    "--scenario",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Scenario YAML (benign traffic and labelled incidents).",
)
@click.option(
    "--events",
    "events_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Send an existing event file instead of a scenario.",
)
@click.option(
    "--to-file",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write events and labels to this folder (with --send, then send them too).",
)
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["csv", "parquet", "jsonl"]),
    default="csv",
    show_default=True,
)
@click.option("--send", is_flag=True, help="Send the reports over UDP, as the switch would.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a target that is not a loopback address (a real receiver).",
)
@click.option(
    "--speed",
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Time compression: 60 sends an hour of events in a minute; 0 sends as fast as "
    "the window of unanswered reports allows.",
)
@click.option("--rate", type=FiniteFloatRange(min=0), default=0.0, help="Reports per second.")
@click.option("--window", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--retries", type=click.IntRange(min=0), default=6, show_default=True)
@click.option("--retry-interval", type=FiniteFloatRange(min=0.001), default=3.0, show_default=True)
@click.option("--request-loss", type=FiniteFloatRange(0, 1, max_open=True), default=0.0)
@click.option("--answer-loss", type=FiniteFloatRange(0, 1, max_open=True), default=0.0)
@click.option(
    "--separator",
    type=click.Choice([",", "|", ";", "tab"]),
    default=",",
    show_default=True,
    help="Between a report's fields, as the receiver's codec.separator.",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Of the reports' text (the receiver reads its codec.encodings).",
)
@click.option("--seed", type=int, default=None, help="Override the scenario's seed.")
@click.option("--duration", default=None, help="Override the scenario's duration (e.g. 10m, 2h).")
@click.option(
    "--check",
    is_flag=True,
    help="With --send: mark the reports as deployment checks (call ids starting "
    "'callsentry-check-'); an engine that lists this host in receiver.check_senders "
    "answers and keeps them in its checks table, apart from detection and alerts.",
)
@click.option(
    "--consume",
    is_flag=True,
    help="Stand in for an existing consumer instead: answer reports on --host/--port and "
    "print what came (duplicates, gaps, order per call) until Ctrl-C.",
)
@click.option(
    "--for",
    "consume_for",
    type=FiniteFloatRange(min=0),
    default=0.0,
    help="With --consume: stop after this many seconds (0: at Ctrl-C or SIGTERM).",
)
@click.option(
    "--drop",
    type=FiniteFloatRange(0, 1, max_open=True),
    default=0.0,
    help="With --consume: leave this share of datagrams unanswered, as a lossy consumer.",
)
@click.option("--quiet", is_flag=True, help="With --consume: print only the summary.")
def simulate(**options: Any) -> None:
    """Stand in for the switch: generate a scenario's traffic, write it, or send it.
    Or, with --consume, stand in for a consumer the relay feeds.

    Exit code 0 when every report sent was answered; 1 when any was given up
    after its retries (so it doubles as a deployment check: add --check against a
    production engine, and nothing it sends reaches detection or alerts).
    """
    from engine.apps.simulate import SimulateError, SimulateOptions, run_simulate

    if options["separator"] == "tab":
        options["separator"] = "\t"
    try:
        code = run_simulate(SimulateOptions(**options), click.echo)
    except SimulateError as error:
        fail(str(error), error.code)
    sys.exit(code)


@main.group()
def checks() -> None:
    """Deployment checks (simulate --send --check) an engine answered and kept apart."""


@checks.command("list")
@data_dir_option
@config_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
def checks_list(data_dir: Path | None, config: Path | None, limit: int) -> None:
    """Runs of check reports, newest first: when, from where, how many reports and calls."""
    from engine.lake.checks import CheckListError, list_checks

    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    try:
        rows = list_checks(settings.store.data_dir, limit)
    except CheckListError as error:
        fail(str(error))
    if not rows:
        click.echo("no check reports stored")
    for row in rows:
        click.echo(
            f"{row['first']:%Y-%m-%d %H:%M:%S} - {row['last']:%H:%M:%S}  "
            f"from {shown(row['sender'])}  {row['reports']} reports, {row['calls']} calls"
        )


main.add_command(rules)
main.add_command(alerts)
main.add_command(console)
main.add_command(notify)
main.add_command(actions)
main.add_command(blocklist)
