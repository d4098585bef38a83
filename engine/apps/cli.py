"""The `callsentry` command and its subcommands. What they share (errors as one line and
an exit code, the common options, settings, logging) is in engine/apps/commandline.py."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.apps.actions import actions, blocklist
from engine.apps.alerts_commands import alerts
from engine.apps.commandline import (
    UNEXPECTED,
    CommandLine,
    config_option,
    data_dir_option,
    fail,
    fail_rules,
    fail_with_problems,
    log_level_option,
    os_error_text,
    settings_or_fail,
    setup_logging,
)
from engine.apps.console import console
from engine.apps.notifycli import notify
from engine.core.text import shown

# Each command imports what it needs when it runs: `--help` and the small commands
# start without pydantic's models, asyncio or the store.
if TYPE_CHECKING:
    pass

log = logging.getLogger("callsentry")

__all__ = ["UNEXPECTED", "main"]


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callsentry")
def main() -> None:
    """callsentry: fraud and anomaly detection for a VOS3000 IVR's call-state reports."""


@main.command()
def version() -> None:
    """The installed release: version, Python, whether its compiled parts are in use,
    and where its shipped rules are."""
    from engine.apps.health import build_info, uncompiled_parts
    from engine.apps.settings import shipped_rules

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
@click.option("--show", default=20, show_default=True, help="Rejected rows and alerts to list.")
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
    in the rejects table) or a file could not be read.
    """
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["store"] = {"data_dir": str(data_dir)}
    settings = settings_or_fail(config, overrides)
    setup_logging(log_level)

    from engine.apps.progress import ProgressBar, on_terminal
    from engine.apps.replay import Progress
    from engine.apps.replay import replay as run_replay
    from engine.core.runtime import tune_gc_for_detection
    from engine.core.yamlfile import YamlFileError
    from engine.ingest.eventfiles import parquet_rows
    from engine.ingest.store import StoreError
    from engine.lake.parquet import STORAGE_ERRORS

    tune_gc_for_detection()
    total = parquet_rows(files)
    progress = ProgressBar(total) if on_terminal() else Progress(total)
    try:
        report = run_replay(list(files), settings, rules_dir, progress=progress)
    except StoreError as error:
        fail(str(error))
    except YamlFileError as error:
        fail_rules(error)
    except STORAGE_ERRORS as error:
        # A full or read-only disk under the data dir, in whichever library's words.
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        fail(
            f"replay stopped: cannot write to {settings.store.data_dir}: {reason}; what was "
            "stored stays, and the same replay again carries on"
        )
    for problem in report.file_errors:
        click.echo(f"{problem}", err=True)
    for reject in report.rejects[:show]:
        click.echo(shown(f"{reject.source}: {reject.reason.value}: {reject.detail}"), err=True)
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
    live = [a for a in report.alerts if a.mode == "alert"]
    click.echo(
        f"{report.calls} calls rebuilt; {len(live)} alerts, "
        f"{len(report.alerts) - len(live)} shadow alerts"
    )
    # Past these bounds detection forgets: an operator must see when a replay met them.
    click.echo(
        f"evicted: {report.evicted.keys} entities from rule state "
        f"(detection.max_keys_per_rule {settings.detection.max_keys_per_rule}), "
        f"{report.evicted.calls} calls in progress "
        f"(detection.max_open_calls {settings.detection.max_open_calls})"
    )
    for alert in live[:show]:
        click.echo(f"  [{alert.severity}] {alert.rule_id}: {shown(alert.summary)}")
    if len(live) > show:
        click.echo(f"  ... and {len(live) - show} more (SELECT * FROM alerts)")
    click.echo(f"query them: duckdb -readonly {settings.store.data_dir / 'callsentry.duckdb'}")
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
    settings = settings_or_fail(config, {})
    for section, values in settings.model_dump(mode="json").items():
        click.echo(f"[{section}]")
        for key, value in values.items():
            if key.endswith("_token") and value:
                value = "(set, not shown)"  # secrets stay out of terminals and logs
            if (section, key) == ("notify", "channels"):
                # An Apprise URL carries tokens and passwords: shown masked.
                value = [channel.shown() for channel in settings.notify.channels]
            if (section, key) == ("relay", "nats") and value["credentials_env"]:
                name = value["credentials_env"]
                state = "set, not shown" if os.environ.get(name) else "not set"
                click.echo(f"# relay.nats credentials: ${name} ({state})")
            if value is None:
                # TOML has no null: an unset key is said as a comment, with what it means.
                meaning = (
                    f": the shipped rules, {settings.detection.rules_folder}"
                    if (section, key) == ("detection", "rules_dir")
                    else ""
                )
                click.echo(f"# {key} unset{meaning}")
                continue
            click.echo(f"{key} = {json.dumps(value, ensure_ascii=False)}")
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
    help="Write events and labels to this folder; send nothing.",
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
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Time compression: 60 sends an hour of events in a minute; 0 sends as fast as "
    "the window of unanswered reports allows.",
)
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, help="Reports per second.")
@click.option("--window", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--retries", type=click.IntRange(min=0), default=6, show_default=True)
@click.option("--retry-interval", type=click.FloatRange(min=0.001), default=3.0, show_default=True)
@click.option("--request-loss", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--answer-loss", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--separator", type=click.Choice([",", "|", ";", "tab"]), default=",")
@click.option("--encoding", default="utf-8", show_default=True)
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
    type=click.FloatRange(min=0),
    default=0.0,
    help="With --consume: stop after this many seconds (0: at Ctrl-C or SIGTERM).",
)
@click.option(
    "--drop",
    type=click.FloatRange(0, 1, max_open=True),
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
        fail(str(error), 2)
    sys.exit(code)


@main.group()
def rules() -> None:
    """The YAML detection rules: validate, test and backtest them before they go live."""


# `rules validate` and `rules test` load the rules to check them and run inline
# tests on fresh copies: no traffic to bound, so the bound on keys does not matter.
RULE_TEST_MAX_KEYS = 10_000

rules_path_argument = click.argument(
    "path", required=False, default=None, type=click.Path(path_type=Path)
)


def _rules_in_use(path: Path | None) -> Path:
    """PATH as given, else the rule folder `serve` would run: detection.rules_dir from
    the environment (CALLSENTRY_DETECTION__RULES_DIR), else the shipped rules."""
    return path if path is not None else settings_or_fail(None, {}).detection.rules_folder


@rules.command("validate")
@rules_path_argument
def rules_validate(path: Path | None) -> None:
    """Check every rule file, list and model file under PATH (default: the rules in use);
    list every problem as file:line."""
    path = _rules_in_use(path)
    from engine.alerts.actionspec import actions_dir, load_actions
    from engine.apps.lakewriter import check_detectors
    from engine.core.yamlfile import YamlFileError

    problems: list[str] = []
    try:
        loaded = check_detectors(path)
    except YamlFileError as error:
        problems.extend(error.problems)
    try:
        actions = load_actions(actions_dir(path))
    except YamlFileError as error:
        problems.extend(error.problems)
    if problems:
        fail_with_problems(YamlFileError(problems), f"{{count}} problem(s) in {path}", 1)
    modes = [r.spec.mode for r in loaded.rules.rules]
    models = loaded.catalogue
    enabled = len(models.tracked) if models is not None else 0
    total = enabled + (len(models.disabled) if models is not None else 0)
    click.echo(
        f"{path}: {len(modes)} rules valid ({modes.count('alert')} alerting, "
        f"{modes.count('shadow')} shadow), {len(loaded.rules.lists)} lists, "
        f"{total} models ({enabled} enabled), {len(actions.actions)} actions "
        f"({len(actions.enabled)} enabled)"
    )


@rules.command("test")
@rules_path_argument
def rules_test(path: Path | None) -> None:
    """Run each rule's inline tests through the pipeline in event time (default: the
    rules in use)."""
    path = _rules_in_use(path)
    from engine.apps.lakewriter import check_detectors, load_detectors
    from engine.core.yamlfile import YamlFileError
    from engine.detect.ruletest import run_rule_tests

    try:
        # Checked first without building a model: a bad folder is said without
        # waiting for River to load.
        check_detectors(path)
        loaded = load_detectors(path, RULE_TEST_MAX_KEYS, models=True)
    except YamlFileError as error:
        fail_with_problems(error, f"{{count}} problem(s) in {path}; fix them before testing", 1)
    results = run_rule_tests(loaded.rules)
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "ok  " if result.passed else "FAIL"
        click.echo(f"{mark} {result.rule_id}: {result.test}")
        if not result.passed:
            click.echo(f"       expected alerts per entity: {result.expected or 'none'}")
            click.echo(f"       actual alerts per entity:   {result.actual or 'none'}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)


@rules.command("backtest")
@rules_path_argument
@click.option(
    "--against",
    "current_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The rules to compare with (default: detection.rules_dir, the ones in use).",
)
@data_dir_option
@config_option
@click.option("--since", default=None, help="Start, ISO-8601 (default: --days before --until).")
@click.option("--until", default=None, help="End, ISO-8601 (default: the last stored report).")
@click.option("--days", default=7.0, show_default=True, help="Span when --since is not given.")
@click.option(
    "--warmup",
    default="0s",
    show_default=True,
    help="Stored history before the span fed to both rule sets first, its alerts not "
    "counted, so windows, baselines, first-seen numbers and models start the span warm "
    "(e.g. 1d, 6h).",
)
@click.option("--show", default=20, show_default=True, help="Added and removed alerts to list.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write every alert of both runs here as JSON lines, each with its change.",
)
@log_level_option
def rules_backtest(
    path: Path | None,
    current_dir: Path | None,
    data_dir: Path | None,
    config: Path | None,
    since: str | None,
    until: str | None,
    days: float,
    warmup: str,
    show: int,
    out: Path | None,
    log_level: str,
) -> None:
    """What the rules under PATH would have raised on the stored events, against the
    rules in use on the same events. Both run from a fresh start (or after the same
    --warmup), in memory: the data dir is only read."""
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    path = path if path is not None else settings.detection.rules_folder
    setup_logging(log_level)
    from engine.apps.backtest import (
        BacktestError,
        backtest,
        parse_time,
        stored_count,
        stored_span,
    )
    from engine.apps.progress import ProgressBar, on_terminal
    from engine.apps.replay import Progress
    from engine.core.durations import parse_duration
    from engine.core.runtime import tune_gc_for_detection
    from engine.core.yamlfile import YamlFileError

    tune_gc_for_detection()
    against = current_dir or settings.detection.rules_folder
    try:
        if days <= 0:
            raise BacktestError(f"--days {days:g}: must be more than 0")
        end = parse_time(until, "--until") if until else stored_span(settings.store.data_dir)[1]
        # The last stored report is in the span, not on its open end.
        end = end if until else end + 1e-6
        start = parse_time(since, "--since") if since else end - days * 86_400
        try:
            # A bare number is seconds, as in the rules' YAML.
            numeric = warmup.strip().replace(".", "", 1).isdigit()
            warmup_s = parse_duration(float(warmup) if numeric else warmup)
        except ValueError as error:
            raise BacktestError(f"--warmup: {error}") from None
        total = stored_count(settings.store.data_dir, start - warmup_s, end)
        progress = ProgressBar(total, "backtest") if on_terminal() else Progress(total, "backtest")
        report = backtest(
            settings.store.data_dir,
            path,
            against,
            settings.detection,
            start,
            end,
            warmup_s,
            progress=progress,
        )
    except BacktestError as error:
        fail(str(error))
    except YamlFileError as error:
        fail_rules(error)

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")

    click.echo(
        f"backtest of {path} against {against} on {report.events:,} stored events, "
        f"{when(report.since)} to {when(report.until)} UTC "
        + (
            f"(both after a warm-up on the {report.warmup_events:,} stored events of the "
            f"{report.warmup_s / 3600:g} h before)"
            if report.warmup_s
            else "(both from a fresh start)"
        )
    )
    click.echo(
        f"{'rule':40} {'now':>6} {'with change':>12} {'added':>6} {'removed':>8} "
        f"{'earlier':>8} {'later':>6}"
    )
    for change in report.rules:
        click.echo(
            f"{change.rule_id:40} {change.current:6} {change.candidate:12} "
            f"{len(change.added):6} {len(change.removed):8} "
            f"{len(change.earlier):8} {len(change.later):6}"
        )
    for title, listed in (("added", report.added), ("removed", report.removed)):
        if listed:
            click.echo(f"{title} ({len(listed)}):")
        for alert in sorted(listed, key=lambda a: a.raised_at)[:show]:
            verdict = report.verdicts.get(alert.alert_id) if title == "removed" else None
            click.echo(
                f"  {when(alert.raised_at)} [{alert.severity}] {alert.rule_id}: "
                f"{shown(alert.summary)}" + (f"  (reviewed: {verdict})" if verdict else "")
            )
        if len(listed) > show:
            click.echo(f"  ... and {len(listed) - show} more (--out FILE lists them all)")
    if report.removed:
        verdicts = report.removed_by_verdict()
        click.echo(
            "of the alerts the change removes: "
            + ", ".join(f"{n} {status}" for status, n in sorted(verdicts.items()))
        )
    if report.moved:
        click.echo(f"raised at another moment ({len(report.moved)}):")
        for old, new in sorted(report.moved, key=lambda pair: pair[0].raised_at)[:show]:
            delta = new.raised_at - old.raised_at
            click.echo(
                f"  {when(old.raised_at)} {old.rule_id} {shown(old.entity)}: "
                f"{abs(delta):.0f} s {'earlier' if delta < 0 else 'later'} with the change"
            )
    if out is not None:
        added = {id(alert) for alert in report.added}
        removed = {id(alert) for alert in report.removed}
        try:
            with out.open("w", encoding="utf-8") as handle:
                for run, alerts in (("now", report.current), ("with_change", report.candidate)):
                    for alert in alerts:
                        verdict = (
                            "added"
                            if id(alert) in added
                            else "removed"
                            if id(alert) in removed
                            else "same"
                        )
                        row = {"run": run, "change": verdict, **alert.as_json()}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as error:
            fail(f"cannot write {out}: {error.strerror or error}")
        click.echo(f"every alert of both runs: {out}")


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


main.add_command(alerts)
main.add_command(console)
main.add_command(notify)
main.add_command(actions)
main.add_command(blocklist)
