"""`callsentry rules`: validate the YAML rules, run their inline tests, and backtest a
change against the stored events before it goes live."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from engine.apps.commandline import (
    config_option,
    data_dir_option,
    fail,
    fail_rules,
    fail_with_problems,
    log_level_option,
    settings_or_fail,
    setup_logging,
)
from engine.core.text import shown

if TYPE_CHECKING:
    from engine.detect.exceptionfiles import EntityException

log = logging.getLogger("callsentry")


@click.group()
def rules() -> None:
    """The YAML detection rules: validate, test and backtest them before they go live."""


# `rules validate` and `rules test` load the rules to check them and run inline
# tests on fresh copies: no traffic to bound, so the bound on keys does not matter.
RULE_TEST_MAX_KEYS = 10_000

# The longest span --days gives: ten years, the bound of every duration a rule or an
# option takes (engine.core.durations). Past it (or inf, or NaN) the span's start is
# no time a timestamp holds.
MAX_BACKTEST_DAYS = 3650

rules_path_argument = click.argument(
    "path", required=False, default=None, type=click.Path(path_type=Path)
)


def _rules_in_use(path: Path | None, config: Path | None) -> Path:
    """PATH as given, else the rule folder `serve --config CONFIG` would run:
    detection.rules_dir from the settings (the file, CALLSENTRY_DETECTION__RULES_DIR),
    else the shipped rules."""
    return path if path is not None else settings_or_fail(config, {}).detection.rules_folder


@rules.command("validate")
@rules_path_argument
@config_option
def rules_validate(path: Path | None, config: Path | None) -> None:
    """Check every rule file, list and model file under PATH (default: the rules in use);
    list every problem as file:line."""
    path = _rules_in_use(path, config)
    from engine.alerts.actionspec import actions_dir, load_actions
    from engine.apps.detectors import check_detectors
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
        f"{shown(str(path))}: {len(modes)} rules valid ({modes.count('alert')} alerting, "
        f"{modes.count('shadow')} shadow), {len(loaded.rules.lists)} lists, "
        f"{total} models ({enabled} enabled), {len(actions.actions)} actions "
        f"({len(actions.enabled)} enabled)"
    )


@rules.command("test")
@rules_path_argument
@config_option
def rules_test(path: Path | None, config: Path | None) -> None:
    """Run each rule's inline tests through the pipeline in event time (default: the
    rules in use)."""
    path = _rules_in_use(path, config)
    from engine.apps.detectors import check_detectors, load_detectors
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
        click.echo(shown(f"{mark} {result.rule_id}: {result.test}"))
        if not result.passed:
            click.echo(f"       expected alerts per entity: {result.expected or 'none'}")
            click.echo(f"       actual alerts per entity:   {result.actual or 'none'}")
            if result.expected_levels:
                click.echo(f"       expected levels: {result.expected_levels}")
                click.echo(f"       actual levels:   {result.actual_levels or 'none'}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)


@rules.command("exceptions")
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The rules folder (default: detection.rules_dir, the rules in use).",
)
@config_option
def rules_exceptions(rules_dir: Path | None, config: Path | None) -> None:
    """The exception files (rules/exceptions/): those in force now, then the expired ones,
    each with its rule or model, entity, expiry, reason and who made it."""
    import time

    from engine.core.yamlfile import YamlFileError
    from engine.detect.exceptionfiles import EntityException, exceptions_dir, read_exception_files

    folder = _rules_in_use(rules_dir, config)
    if not folder.is_dir():
        fail(f"{folder}: no such rules folder")
    problems: list[str] = []
    # As written: whether each names a rule or model that exists is `rules validate`'s.
    taken = [
        EntityException.of(spec, document)
        for spec, document in read_exception_files(exceptions_dir(folder), problems)
    ]
    now = time.time()
    for title, chosen in (
        ("in force", [e for e in taken if e.holds_at(now)]),
        ("expired", [e for e in taken if not e.holds_at(now)]),
    ):
        click.echo(f"{title} ({len(chosen)}):")
        for exception in sorted(chosen, key=lambda e: (e.source, e.until, e.entity)):
            click.echo(_exception_line(exception))
    if problems:
        fail_with_problems(YamlFileError(problems), f"{{count}} problem(s) in {folder}", 1)


def _exception_line(exception: EntityException) -> str:
    from engine.detect.exceptionfiles import expiry_text

    return (
        f"  {exception.detector} {exception.source}: {exception.entity_type} "
        f"{shown(exception.entity)} until {expiry_text(exception.until)}; "
        f"{shown(exception.reason)} ({shown(exception.created_by)}"
        + (f", alert {shown(exception.alert_id)}" if exception.alert_id else "")
        + f"; {shown(exception.where)})"
    )


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
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Added and removed alerts to list.",
)
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
    # What the options say is checked before the data is opened: a value that cannot
    # be taken is exit code 2 (as a bad value click itself refuses), whatever the data.
    try:
        if not 0 < days <= MAX_BACKTEST_DAYS:  # NaN too: every comparison with it is false
            raise BacktestError(
                f"--days {days:g}: must be more than 0 and at most {MAX_BACKTEST_DAYS}"
            )
        given_end = parse_time(until, "--until") if until else None
        given_start = parse_time(since, "--since") if since else None
        if given_start is not None and given_end is not None and given_start >= given_end:
            raise BacktestError("the span is empty: --until must be later than --since")
        try:
            # A bare number is seconds, as in the rules' YAML.
            numeric = warmup.strip().replace(".", "", 1).isdigit()
            warmup_s = parse_duration(float(warmup) if numeric else warmup)
        except ValueError as error:
            raise BacktestError(f"--warmup: {error}") from None
    except BacktestError as error:
        fail(str(error), 2)
    try:
        # The last stored report is in the span, not on its open end.
        end = given_end if given_end is not None else stored_span(settings.store.data_dir)[1] + 1e-6
        start = given_start if given_start is not None else end - days * 86_400
        if given_start is not None and given_end is None and start >= end:
            # backtest() says an empty span in the options' terms; this one has no --until.
            raise BacktestError(
                f"the span is empty: --since {since} is after the last stored report "
                f"({datetime.fromtimestamp(end, UTC):%Y-%m-%d %H:%M:%S} UTC)"
            )
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
        f"backtest of {shown(str(path))} against {shown(str(against))} on "
        f"{report.events:,} stored events, "
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
            excepted = report.excepted.get(alert.alert_id) if title == "removed" else None
            click.echo(
                f"  {when(alert.raised_at)} [{alert.severity}] {alert.rule_id}: "
                f"{shown(alert.summary)}"
                + (f"  (reviewed: {verdict})" if verdict else "")
                + (f"  (excepted: {shown(excepted.where)})" if excepted else "")
            )
        if len(listed) > show:
            click.echo(f"  ... and {len(listed) - show} more (--out FILE lists them all)")
    if report.removed:
        verdicts = report.removed_by_verdict()
        click.echo(
            "of the alerts the change removes: "
            + ", ".join(f"{n} {status}" for status, n in sorted(verdicts.items()))
        )
        if report.excepted:
            click.echo(
                f"{len(report.excepted)} of them held back by the change's exception files "
                "(rules/exceptions/)"
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
