"""What every `callsentry` command shares: errors as one clear sentence on stderr and an
exit code (0 fine, 1 the work ran but something was rejected or failed, 2 bad usage or
config), the common options, settings and logging. Command modules import only this
and click at import time, so `--help` stays light."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from engine.core.runtime import gc_for_start
from engine.core.text import shown, terminal_table

# Settings only for types: pydantic's models load when a command reads its settings.
if TYPE_CHECKING:
    from engine.apps.settings import Settings

log = logging.getLogger("callsentry")


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange refusing nan and inf: every comparison with nan is false, so
    a range alone lets it through (`simulate --retry-interval nan` retried for ever)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def missing_files(paths: Iterable[Path]) -> list[str]:
    """The paths no file is at. One that cannot be looked at for another reason (a name
    too long, a folder not to be read) is not listed: its reader says why."""
    missing = []
    for path in paths:
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            missing.append(str(path))
        except OSError:
            pass
    return missing


def fail(message: str, code: int = 1) -> NoReturn:
    # Through shown(): a message may quote a file name, a YAML key or a value, and an
    # escape sequence in one must not reach the terminal as one.
    click.echo(f"callsentry: {shown(message)}", err=True)
    sys.exit(code)


def os_error_text(error: OSError) -> str:
    """`path: reason` without Python's `[Errno 98]`."""
    if not error.strerror:
        return str(error)
    return f"{error.filename}: {error.strerror}" if error.filename else error.strerror


def fail_with_problems(error: Exception, message: str, code: int) -> NoReturn:
    """Each problem (file:line: key: reason) on its own line, then the verdict."""
    problems = getattr(error, "problems", [str(error)])
    for problem in problems:
        click.echo(shown(problem), err=True)
    fail(message.replace("{count}", str(len(problems))), code)


def fail_rules(error: Exception) -> NoReturn:
    fail_with_problems(error, "the rules are invalid ({count} problem(s)); nothing was run", 2)


def existing_data_dir(settings: Settings, *, with_lake: bool = False) -> Path:
    """The settings' data dir, or the command's one-line failure when it does not exist
    (or, `with_lake`, has no lake: a mistyped --data-dir, a checkout's data/, where a
    command that writes would leave stray files an engine never reads)."""
    data = settings.store.data_dir
    if not data.is_dir():
        fail(f"data dir {data} does not exist (is it callsentry's data dir?)")
    if with_lake and not (data / "lake").is_dir():
        fail(f"{data} has no lake (is it callsentry's data dir? serve or replay makes one)")
    return data


def reviewer_or_fail(reviewer: str | None) -> str:
    """--reviewer, or the login name when it is not given; a blank one is refused."""
    import getpass

    who = getpass.getuser() if reviewer is None else reviewer.strip()
    if not who:
        fail("--reviewer: give the reviewer's name", 2)
    return who


def settings_or_fail(config: Path | None, overrides: dict[str, Any]) -> Settings:
    from engine.apps.settings import ConfigError, load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as error:
        problems = str(error).splitlines()
        if len(problems) == 1:
            fail(f"configuration error: {problems[0]}", 2)
        for problem in problems:
            click.echo(shown(problem), err=True)
        fail(f"configuration error ({len(problems)} problems); nothing was run", 2)


# The `callsentry` process's exit status once its command is over (`command_ended`).
_exit_status: list[int] = []


def end_at_once_when_done() -> None:
    """Once the command is over, end the process without the interpreter's teardown,
    which frees every object of every module loaded (polars, pydantic, River...) one
    by one: about 60 ms after a small replay, a seventh of it. Registered before the
    command runs, this exit handler runs after the interpreter has waited for the
    threads still running and after every handler registered since (multiprocessing's
    among them); of those registered before (only logging's), it does the work
    itself. What it skips loses nothing: the commands close what they open (no
    engine code leaves a file or a connection to the teardown), and the logs and the
    standard streams are flushed here."""
    atexit.register(_end_at_once)


def command_ended(code: object) -> None:
    """The command ended with `code`, as `sys.exit(code)` says it (None: 0; a text is
    said on stderr, and is 1)."""
    _exit_status.append(0 if code is None else code if isinstance(code, int) else 1)


def _end_at_once() -> None:
    if not _exit_status:
        return  # the command did not end (a traceback): the interpreter ends as usual
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A reader gone (`| head`) or a stream closed: nothing to keep.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(_exit_status[-1])


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The scheduler logs every job run at INFO; that is noise in an engine log.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


config_option = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML settings file (CALLSENTRY_SECTION__KEY variables and flags override it).",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the journal, the lake and callsentry.duckdb live (default: data).",
)
log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)


class CommandLine(click.Group):
    """The `callsentry` group: whatever goes wrong reaches the user as one line
    `callsentry: ...` and an exit code, never a traceback.

    Usage errors (an unknown option, a value of the wrong type) name the command and
    where its help is. An exception no command expected still ends in one line naming
    its type; CALLSENTRY_TRACEBACK=1 shows the traceback, for a bug report."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # The command's thresholds for its process; whoever called this in-process (a
        # test's runner) gets its own back.
        with gc_for_start():
            return self._main(*args, **kwargs)

    def _main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            # `callsentry` or `callsentry rules` alone: the help is what was asked for.
            click.echo(error.ctx.get_help() if error.ctx is not None else error.message)
            sys.exit(0)
        except click.UsageError as error:
            where = command_words(error.ctx)
            fail(
                f"{where}{': ' if where else ''}{one_sentence(error.format_message()).rstrip('.')} "
                f"(see 'callsentry {where}{' ' if where else ''}--help')",
                error.exit_code,
            )
        except click.ClickException as error:
            fail(one_sentence(error.format_message()), error.exit_code)
        except click.Abort:
            fail("interrupted", 130)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            # The reader of our output went away (`| head`): nothing left to say to it.
            sys.exit(1)
        except Exception as error:
            if os.environ.get("CALLSENTRY_TRACEBACK"):
                raise
            fail(f"{UNEXPECTED} {type(error).__name__}: {one_sentence(str(error))}", 1)
        sys.exit(result if isinstance(result, int) else 0)


# The prefix of an error no command caught (tests/test_cli_errors.py asserts that none
# of the failures it provokes reaches it).
UNEXPECTED = "unexpected error (a bug; CALLSENTRY_TRACEBACK=1 shows where):"


def command_words(ctx: click.Context | None) -> str:
    """`alerts list` for the context of `callsentry alerts list` (however it was started)."""
    words: list[str] = []
    while ctx is not None and ctx.parent is not None:
        words.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(words)


def one_sentence(message: str) -> str:
    """A message on one line: a line that goes on (`Choose from:`, `open,`) joins the next
    with a space, separate lines with `; `."""
    text = ""
    for line in (line.strip() for line in message.strip().splitlines()):
        if line:
            text += (" " if text.endswith((":", ",")) else "; " if text else "") + line
    return text


def data_dir_or_fail(data_dir: Path | None, config: Path | None, *, writes: bool = False) -> Path:
    """The data dir the options or settings name. `writes`: the command may write there
    (the actions' outbox, the console's accounts), so a folder serve or replay has not
    made a lake in (a mistyped --data-dir, a checkout's data/) is refused: an engine
    would never see what was written."""
    settings = settings_or_fail(config, {"store": {"data_dir": str(data_dir)}} if data_dir else {})
    return existing_data_dir(settings, with_lake=writes)


def utc_time(value: float | None) -> str:
    """An epoch time as `YYYY-MM-DD HH:MM:SS` in UTC, `-` for none."""
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def utc_iso(value: float | None) -> str | None:
    """An epoch time in ISO 8601, UTC (for JSON), None for none."""
    return None if value is None else datetime.fromtimestamp(value, tz=UTC).isoformat()


def echo_table(rows: Sequence[Sequence[str]], titles: Sequence[str]) -> None:
    """Rows under their titles, as a table on the terminal."""
    for line in terminal_table([[str(cell) for cell in row] for row in rows], titles):
        click.echo(line)
