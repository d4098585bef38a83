"""No traceback reaches a user: every subcommand, found in the CLI itself (so a command
added later is covered), is run as `python -m engine ...` with a data dir that is
missing, empty, not callsentry's or a file, with files it cannot read, and with bad
arguments. A failure is one line `callsentry: ...` on stderr and a non-zero exit.

Root ignores file permissions, so unreadability is made real in ways that hold for
every user: a directory where a file is expected, a file of garbage, a path under a
regular file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from engine.apps.cli import UNEXPECTED, main
from engine.lake.reviews import list_alerts
from tests.console_data import console_data_dir as make_console_data

ROOT = Path(__file__).resolve().parent.parent

# Text options that must parse, with a value that does not, wherever they appear.
BAD_TEXT = {
    "--since": "last tuesday",
    "--until": "2026-13-45",
    "--tz": "Mars/Olympus_Mons",
    "--status": "dismissed",
    "--relay-nats": "nats://user:secret@127.0.0.1:4222",
    "--expire": "when it suits",
    "--expires": "when it suits",
}

# Per command, what makes it get past "say what to do" to the files it reads. Not a
# list of commands: one missing here is still run, with its required values filled in.
EXTRA = {"simulate": ["--to-file", "{out}"]}


def leaf_commands(
    group: click.Group = main, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                # A group that does its own work too (`console` serves): run as a command.
                yield (*words, name), command
            yield from leaf_commands(command, (*words, name))
        else:
            yield (*words, name), command


@dataclass
class Places:
    """The bad paths the cases use, made once."""

    root: Path

    def __post_init__(self) -> None:
        self.cwd = self.root / "cwd"  # `data` here is missing; `rules` is the project's
        self.cwd.mkdir()
        (self.cwd / "rules").symlink_to(ROOT / "rules")
        self.missing = self.root / "missing" / "deeper"
        self.empty = self.root / "empty"
        self.empty.mkdir()
        # Not callsentry's: someone's files.
        self.foreign = self.root / "foreign"
        self.foreign.mkdir()
        (self.foreign / "holiday.jpg").write_bytes(os.urandom(4096))
        (self.foreign / "notes.txt").write_text("shopping: milk, eggs\n")
        # callsentry's names with the wrong things behind them.
        self.mangled = self.root / "mangled"
        (self.mangled / "lake").mkdir(parents=True)
        for name in ("events", "calls", "alert_reviews"):
            (self.mangled / "lake" / name).write_bytes(os.urandom(512))
        alerts = self.mangled / "lake" / "alerts" / "day=2026-01-01"
        alerts.mkdir(parents=True)
        (alerts / "part-0.parquet").write_bytes(b"PAR1" + os.urandom(1024))
        (self.mangled / "callsentry.duckdb").write_bytes(os.urandom(8192))
        (self.mangled / "journal").write_bytes(os.urandom(512))
        (self.mangled / "state").write_text("not a folder")
        # An outbox that is not one (what `serve` and `alerts deliveries` open).
        self.bad_outbox = self.root / "bad-outbox"
        (self.bad_outbox / "outbox").mkdir(parents=True)
        (self.bad_outbox / "outbox" / "deliveries.sqlite3").write_bytes(os.urandom(4096))
        # The console's accounts file and session secret, garbage.
        (self.mangled / "console").mkdir()
        (self.mangled / "console" / "accounts.json").write_bytes(os.urandom(256))
        (self.mangled / "console" / "session.secret").write_bytes(os.urandom(64))
        (self.mangled / "relay").mkdir()
        (self.mangled / "relay" / "state.json").write_bytes(os.urandom(256))
        self.a_file = self.root / "plain-file"
        self.a_file.write_text("a file, where a folder is expected\n")
        self.under_file = self.a_file / "inside"
        self.garbage = self.root / "garbage.bin"
        self.garbage.write_bytes(b"\x00\xff\xfe garbage \x80\x81" + os.urandom(2048))
        self.a_dir = self.root / "a-folder.csv"
        self.a_dir.mkdir()
        self.out = self.root / "out"

    # Each list holds one of each way to go wrong, no two alike: every run costs an
    # interpreter start, and some commands a lake writer's.
    def data_dirs(self) -> list[Path]:
        # A file is refused by the option itself; a path under one gets to the command.
        return [
            self.missing,
            self.empty,
            self.foreign,
            self.mangled,
            self.bad_outbox,
            self.a_file,
            self.under_file,
        ]

    def files(self) -> list[Path]:
        return [self.missing, self.a_dir, self.garbage, self.under_file]

    def folders(self) -> list[Path]:
        return [self.missing, self.a_file, self.foreign]


def _filler(param: click.Parameter, places: Places) -> str:
    """A value for a required parameter."""
    if isinstance(param.type, click.Choice):
        return str(param.type.choices[0])
    if isinstance(param.type, click.Path):
        return str(places.garbage)
    return "x"


def _option(param: click.Parameter) -> str:
    assert isinstance(param, click.Option)
    return max(param.opts, key=len)


def cases(
    words: tuple[str, ...], command: click.Command, places: Places, busy: str
) -> Iterator[tuple[str, list[str]]]:
    """(what is wrong, argv) for one command: its baseline with one thing made bad."""
    name = " ".join(words)
    base: list[str] = [arg.format(out=places.out) for arg in EXTRA.get(name, [])]
    if any(p.name == "listen" for p in command.params):
        # Serving commands would otherwise serve for ever: the address they are given
        # is taken, so each run ends, after the data dir and the rules were opened.
        base += ["--listen", busy]
    arguments: list[str] = []
    for param in command.params:
        if param.required and isinstance(param, click.Argument):
            arguments.append(_filler(param, places))
        elif param.required:
            base += [_option(param), _filler(param, places)]

    def run(*changed: str, args: list[str] | None = None) -> list[str]:
        return [*words, *(arguments if args is None else args), *base, *changed]

    yield "defaults (no data dir here)", run()
    yield "an unknown option", run("--no-such-option")
    for param in command.params:
        if isinstance(param, click.Argument):
            if isinstance(param.type, click.Path):
                wanted = places.folders() if not param.type.dir_okay else places.files()
                if param.type.dir_okay and param.type.file_okay:
                    wanted = [*places.files(), places.a_file]
                for path in wanted:
                    args = [str(path) if a == _filler(param, places) else a for a in arguments]
                    if not param.required:
                        args = [*arguments, str(path)]
                    yield f"{param.name} {path.name}", run(args=args)
            continue
        if not isinstance(param, click.Option) or param.is_flag or param.hidden:
            continue
        option = _option(param)
        if param.name == "data_dir":
            for path in places.data_dirs():
                yield f"data dir {path.name}", run(option, str(path))
        elif isinstance(param.type, click.Path):
            expected = places.folders() if not param.type.file_okay else places.files()
            for path in expected:
                yield f"{option} {path.name}", run(option, str(path))
        elif isinstance(param.type, click.Choice):
            yield f"{option} not a choice", run(option, "no-such-choice")
        elif isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
            yield f"{option} not a number", run(option, "many")
        elif param.name in ("listen", "metrics", "host", "relay_udp", "relay_allow"):
            yield f"{option} not an address", run(option, "nowhere:port")
        elif option in BAD_TEXT:
            yield f"{option} {BAD_TEXT[option]!r}", run(option, BAD_TEXT[option])


def _a_bad_value(why: str) -> bool:
    """Whether a case of `cases` gives an option a value it cannot take."""
    return (
        why == "an unknown option"
        or why.endswith(("not a number", "not a choice", "not an address"))
        or any(why == f"{option} {text!r}" for option, text in BAD_TEXT.items())
    )


@dataclass
class Outcome:
    argv: list[str]
    why: str
    code: int
    stdout: str
    stderr: str


def _run(argv: list[str], why: str, cwd: Path) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("CALLSENTRY_")}
    done = subprocess.run(
        [sys.executable, "-m", "engine", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(argv, why, done.returncode, done.stdout, done.stderr)


def test_the_commands_are_found_in_the_cli() -> None:
    names = {" ".join(words) for words, _ in leaf_commands()}
    # A few that exist today: the walk goes into groups.
    assert {"serve", "replay", "alerts list", "rules backtest", "config check"} <= names
    assert {"console", "console adduser", "console token create"} <= names


def groups(group: click.Group = main, words: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield words
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group) and not command.invoke_without_command:
            yield from groups(command, (*words, name))


def test_a_group_alone_prints_its_help(tmp_path: Path) -> None:
    for words in groups():
        outcome = _run(list(words), "no subcommand", tmp_path)
        assert outcome.code == 0, outcome.stderr
        assert outcome.stdout.startswith("Usage: ") and "Commands:" in outcome.stdout
        assert outcome.stderr == ""


# Every case starts an interpreter (about 340 with the actions' and the blocklist's
# commands): on two cores shared with other work that can take past the suite's 300 s.
@pytest.mark.timeout(900)
def test_no_subcommand_prints_a_traceback(tmp_path: Path) -> None:
    places = Places(tmp_path)
    # The address is taken for UDP and TCP alike (`console` serves over TCP).
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken_tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken,
    ):
        taken_tcp.bind(("127.0.0.1", 0))
        taken_tcp.listen(1)
        taken.bind(("127.0.0.1", taken_tcp.getsockname()[1]))
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        runs = [
            (argv, why)
            for words, command in leaf_commands()
            for why, argv in cases(words, command, places, busy)
        ]
        with ThreadPoolExecutor(max_workers=3) as pool:
            outcomes = list(pool.map(lambda run: _run(run[0], run[1], places.cwd), runs))
    problems = []
    failures = 0
    for outcome in outcomes:
        said = outcome.stdout + outcome.stderr
        lines = outcome.stderr.strip().splitlines()
        verdict = [line for line in lines if line.startswith("callsentry: ")]
        shown = f"callsentry {' '.join(outcome.argv)}  [{outcome.why}]"
        if "Traceback" in said:
            problems.append(f"{shown}: traceback:\n{said}")
        elif outcome.code != 0 and (len(verdict) != 1 or lines[-1] != verdict[0]):
            problems.append(f"{shown}: exit {outcome.code} without one last line:\n{said}")
        elif any(UNEXPECTED in line for line in verdict):
            problems.append(f"{shown}: not caught by the command: {verdict[0]}")
        elif _a_bad_value(outcome.why) and outcome.code != 2:
            # A value that cannot be taken is exit code 2 whatever else is wrong, as
            # click's own refusals: a service manager does not restart on it.
            problems.append(f"{shown}: exit {outcome.code} for a bad value, not 2: {said}")
        failures += outcome.code != 0
    assert not problems, "\n\n".join(problems)
    # Most of these runs are failures: the test provokes them, and checks each one.
    assert failures > len(outcomes) * 0.8, f"only {failures} of {len(outcomes)} runs failed"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["alerts", "list"], "callsentry: data dir data does not exist"),
        (
            ["alerts", "list", "--since", "2026-12-02", "--until", "2026-12-01"],
            "callsentry: the span is empty: --until must be later than --since",
        ),
        (["alerts", "list", "--limit", "x"], "callsentry: alerts list: Invalid value"),
        (["nosuch"], "callsentry: No such command 'nosuch'"),
        (
            ["alerts", "list", "--status", "nope"],
            "callsentry: alerts list: Invalid value for --status: unknown status 'nope'",
        ),
        (
            ["alerts", "list", "--level", "severe"],
            "callsentry: alerts list: Invalid value for '--level': 'severe' is not one of",
        ),
        (
            ["alerts", "list", "--since", "then"],
            "callsentry: alerts list: Invalid value for --since: 'then' is neither",
        ),
        (
            ["alerts", "deliveries", "--tz", "Nowhere/Else"],
            "callsentry: alerts deliveries: Invalid value for --tz: 'Nowhere/Else'",
        ),
        (["alerts", "deliveries"], "callsentry: data dir data does not exist"),
        (["actions", "list"], "callsentry: data dir data does not exist"),
        (
            ["actions", "show", "x"],
            "callsentry: actions show: Invalid value for 'REQUEST_ID': 'x' is not a request "
            "number (the ID column of `actions list`: 1, 2, ...)",
        ),
        (
            ["actions", "approve", "0", "--reviewer", "ana"],
            "callsentry: actions approve: Invalid value for 'REQUEST_ID': '0' is not a "
            "request number",
        ),
        (
            ["actions", "approve", "1", "--reviewer", "ana"],
            "callsentry: data dir data does not exist",
        ),
        (["actions", "approve", "1"], "callsentry: actions approve: Missing option '--reviewer'"),
        (
            ["blocklist", "add", "+88213", "--type", "forward", "--reviewer", "a", "--expire", "x"],
            "callsentry: --expire: 'x' is not a duration",
        ),
        (
            ["alerts", "except", "0f2c", "--reason", "a PBX"],
            "callsentry: data has no alerts yet",
        ),
        (
            ["alerts", "except", "0f2c", "--reason", "a PBX", "--expires", "soon"],
            "callsentry: --expires 'soon': not a duration",
        ),
        (["alerts", "except", "0f2c"], "callsentry: alerts except: Missing option '--reason'"),
        (
            ["alerts", "except", "0f2c", "--reason", "x" * 9_001],
            "callsentry: --reason has 9,001 characters; at most 9,000",
        ),
        (
            ["alerts", "except", "0f2c", "--reason", "a PBX", "--expires", "99999999d"],
            "callsentry: --expires '99999999d': '99999999d' is longer than 3650 days",
        ),
        (
            ["blocklist", "add", " ", "--type", "forward", "--reviewer", "a"],
            "callsentry: ENTITY is empty: give a number or menu id",
        ),
        (
            ["rules", "exceptions", "--rules", "/no/such/rules"],
            "callsentry: /no/such/rules: no such rules folder",
        ),
        (
            ["rules", "validate", "--config", "/no/such.toml"],
            "callsentry: configuration error: /no/such.toml: cannot read config file",
        ),
        (
            ["blocklist", "export", "--format", "xml"],
            "callsentry: blocklist export: Invalid value for '--format'",
        ),
        # A negative count listed all but the last alerts, then "... and 3 more" of two.
        (
            ["replay", "events.csv", "--show", "-1"],
            "callsentry: replay: Invalid value for '--show': -1 is not in the range x>=0",
        ),
        # NaN, inf or a span past the years a timestamp holds went on to DuckDB:
        # "unexpected error ... ConversionException: Epoch seconds out of range".
        # Refused before the data is opened (the data dir here does not exist).
        (
            ["rules", "backtest", "--since", "2026-12-02", "--until", "2026-12-01"],
            "callsentry: the span is empty: --until must be later than --since",
        ),
        (
            ["alerts", "review", "0f2c", "--status", "fp", "--note", "n", "--reviewer", " "],
            "callsentry: --reviewer: give the reviewer's name",
        ),
        (
            ["rules", "backtest", "--days", "nan"],
            "callsentry: --days nan: must be more than 0 and at most 3650",
        ),
        (
            ["rules", "backtest", "--days", "1e12"],
            "callsentry: --days 1e+12: must be more than 0 and at most 3650",
        ),
        (
            ["rules", "backtest", "--show", "-1"],
            "callsentry: rules backtest: Invalid value for '--show': -1 is not in the range",
        ),
        # Every comparison with nan is false, so a range let it through: a retry
        # interval of nan retried for ever, a speed or rate of nan was taken silently.
        (
            ["simulate", "--events", "e.csv", "--send", "--retry-interval", "nan"],
            "callsentry: simulate: Invalid value for '--retry-interval': 'nan' is not a "
            "finite number",
        ),
        (
            ["simulate", "--events", "e.csv", "--send", "--speed", "inf"],
            "callsentry: simulate: Invalid value for '--speed': 'inf' is not a finite number",
        ),
        (
            ["simulate", "--consume", "--for", "NaN"],
            "callsentry: simulate: Invalid value for '--for': 'NaN' is not a finite number",
        ),
    ],
)
def test_an_error_is_one_line_naming_the_problem(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    outcome = _run(argv, "", tmp_path)
    assert outcome.code != 0
    assert outcome.stderr.startswith(expected), outcome.stderr
    assert outcome.stderr.count("\n") == 1, outcome.stderr


def test_a_block_into_a_folder_with_no_lake_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    # A checkout's data/ (samples and scenarios) or a mistyped --data-dir: an engine
    # serving another data dir would never see the entry.
    (tmp_path / "data").mkdir()
    argv = ["blocklist", "add", "+88213000123", "--type", "forward", "--reviewer", "ana"]
    outcome = _run(argv, "", tmp_path)
    assert outcome.code == 1
    assert (
        outcome.stderr
        == "callsentry: data has no lake (is it callsentry's data dir? serve or replay makes one)\n"
    )
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "[detection]\nrules_dir = '/no/such/rules'",
            "/no/such/rules: no such rule file or folder",
        ),
        ("[detection]\nfeed_silence_s = -5", "detection.feed_silence_s (from "),
        ("[detection]\nfeed_hours = ['25:00-26:00']", "detection.feed_hours (from "),
        ("[detection]\nfeed_hours = 'all day'", "detection.feed_hours (from "),
        ("[detection]\nfeed_timezone = 'Mars/Olympus'", "'Mars/Olympus' is not a time zone"),
        ("[detection]\ntimezone = 'Mars/Olympus'", "detection.timezone (from "),
        ("[detection]\ntimezone = 8", "detection.timezone (from "),
        ("[detection]\nfeed_severity = 'dire'", "detection.feed_severity (from "),
        ("[detection]\ndefault_region = 'cn'", "'cn' is not a region the numbering plans know"),
        ("[detection]\ndefault_region = 7", "detection.default_region (from "),
        ("[detection]\ndial_prefixes = ['17951', '9x']", "'9x' is no dial prefix"),
        ("[detection]\ninternational_prefixes = ''", "detection.international_prefixes (from "),
        ("[detection]\nnumber_cache_size = 5", "detection.number_cache_size (from "),
        ("[metrics]\nlisten = 'loopback'", "metrics.listen (from "),
        ("[metrics]\nlisten = '{taken}'", "cannot serve metrics on {taken}"),
    ],
)
def test_a_bad_service_setting_is_one_line_naming_it(
    tmp_path: Path, setting: str, expected: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = tmp_path / "callsentry.toml"
        config.write_text(setting.format(taken=address) + "\n")
        argv = ["serve", "--config", str(config), "--listen", "127.0.0.1:0"]
        argv += ["--data-dir", str(tmp_path / "data")]
        outcome = _run(argv, setting, tmp_path)
    assert "Traceback" not in outcome.stderr
    assert outcome.code == 2 or "cannot serve metrics" in expected, outcome.stderr
    assert outcome.code != 0
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("callsentry: "), outcome.stderr
    assert expected.format(taken=address) in outcome.stderr, outcome.stderr


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            '[receiver.switches]\neast = "10.0.0.5"',
            "receiver (from {config}): switches.east: 10.0.0.5 is not within receiver.allow",
        ),
        (
            '[receiver.switches]\n"a/b" = "127.0.0.1"',
            "receiver.switches (from {config}): switch name 'a/b': ",
        ),
        (
            '[receiver.switches]\neast = ["nowhere"]',
            "receiver.switches (from {config}): 'nowhere' is not an IP address",
        ),
        ('[receiver]\ncheck_senders = "127.0.0.1"', "receiver.check_senders (from {config}): "),
        ('[receiver]\nswitches = ["east"]', "receiver.switches (from {config}): "),
    ],
)
def test_bad_switch_and_check_settings_are_one_line_before_anything_runs(
    tmp_path: Path, settings: str, expected: str
) -> None:
    config = tmp_path / "callsentry.toml"
    config.write_text(settings + "\n")
    for argv in (
        ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")],
        ["config", "check", "--config", str(config)],
    ):
        outcome = _run(argv, "", tmp_path)
        assert outcome.code == 2, outcome
        named = "callsentry: configuration error: " + expected.format(config=config)
        assert outcome.stderr.startswith(named), outcome.stderr
        assert outcome.stderr.count("\n") == 1 and "Traceback" not in outcome.stderr
    assert not (tmp_path / "data").exists(), "refused before the data dir was made"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            '[[notify.channels]]\nname = "mail"\nurl = "nope://x"',
            "notify.channels.0 (from {config}): channel 'mail': url (nope://...) is not a URL "
            "Apprise can use",
        ),
        (
            '[[notify.channels]]\nname = "chat"\nurl = "slack://${NO_SUCH_TOKEN}"',
            "notify.channels.0 (from {config}): channel 'chat': environment variable "
            "NO_SUCH_TOKEN (named as ${{NO_SUCH_TOKEN}}) is not set",
        ),
        (
            '[[notify.channels]]\nname = "siem"\nsyslog = "udp://10.0.0.9"\nfacility = "x"',
            "notify.channels.0.facility (from {config}): 'x' is not a syslog facility",
        ),
        (
            '[[notify.channels]]\nname = "siem"\nsyslog = "10.0.0.9:514"',
            "notify.channels.0 (from {config}): channel 'siem': syslog '10.0.0.9:514' is not",
        ),
        ('[notify]\nchannels = "mail"', "notify.channels (from {config}): "),
        ('[console]\npublic_url = "ftp://x"', "console.public_url (from {config}): 'ftp://x'"),
    ],
)
def test_bad_notification_settings_are_one_line_before_anything_runs(
    tmp_path: Path, settings: str, expected: str
) -> None:
    test_bad_switch_and_check_settings_are_one_line_before_anything_runs(
        tmp_path, settings, expected
    )


def test_check_without_send_says_so(tmp_path: Path) -> None:
    scenario = str(ROOT / "data" / "scenarios" / "sample.yaml")
    argv = ["simulate", "--scenario", scenario, "--to-file", str(tmp_path / "out"), "--check"]
    outcome = _run(argv, "", tmp_path)
    assert outcome.code == 2
    assert outcome.stderr == "callsentry: --check marks the reports sent; it needs --send\n"


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        (
            {"  min_z: 4": "  min_z: many", "  fast: 10m": "  fast: 0s\n  fastest: 1m"},
            ("ramp.min_z", "ramp.fast", "ramp.fastest"),
        ),
        ({"step: 1m": "step: 5s"}, ("step must be at least 10s",)),
    ],
)
def test_a_bad_forward_model_file_is_listed_at_its_lines_without_a_traceback(
    tmp_path: Path, change: dict[str, str], keys: tuple[str, ...]
) -> None:
    import shutil

    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    path = rules / "models" / "forward-ramp.yaml"
    text = path.read_text(encoding="utf-8")
    for old, new in change.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    for argv in (["rules", "validate", str(rules)], ["rules", "test", str(rules)]):
        outcome = _run(argv, "a bad forward model", tmp_path)
        # Problems found, as a linter says them (README): 1, not 2.
        assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.stderr
        lines = outcome.stderr.splitlines()
        assert lines[-1].startswith("callsentry: "), outcome.stderr
        located = " ".join(line for line in lines if line.startswith(f"{path}:"))
        for key in keys:
            assert key in located, outcome.stderr


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("behaviour: {answered_share: {below_peers: -1}}", "behaviour.answered_share.below_peers"),
        ("behaviour: {seen_s: {above_usual: 2}}", "seen_s is bounded by lt or gt only"),
        ("behaviour: {answered: {lt: 0.2}}", "behaviour.answered"),
        ("behaviour: 7", "behaviour"),
    ],
)
@pytest.mark.parametrize("command", [["rules", "validate"], ["rules", "test"]])
def test_a_bad_behaviour_is_one_line_with_its_file_and_line(
    tmp_path: Path, behaviour: str, expected: str, command: list[str]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        "id: r\ntitle: t\nseverity: high\n"
        "aggregate: {type: count, group_by: caller, window: 10m}\n"
        'condition: {op: ">=", threshold: 3}\n' + behaviour + "\n"
    )
    outcome = _run([*command, str(rules)], "bad behaviour", tmp_path)
    assert outcome.code != 0 and "Traceback" not in outcome.stderr
    assert f"{rules / 'r.yaml'}:6" in outcome.stderr and expected in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("send", [[], ["--send"]])
@pytest.mark.parametrize("place", ["under a file", "events file a folder"])
def test_simulate_into_a_folder_it_cannot_write_says_which_in_one_line(
    tmp_path: Path, place: str, send: list[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("a file, where a folder is expected\n")
    if place == "under a file":
        out, blocked = a_file / "out", a_file / "out"
        why = "Not a directory"
    else:
        out = tmp_path / "out"
        blocked = out / "events.csv"
        blocked.mkdir(parents=True)
        why = "Is a directory"
    scenario = str(ROOT / "data" / "scenarios" / "sample.yaml")
    # Written before anything is sent: no receiver is needed to fail.
    argv = ["simulate", "--scenario", scenario, "--to-file", str(out), *send]
    outcome = _run(argv, place, tmp_path)
    # A folder that lets it down, not what was asked: 1, as replay's and backtest's.
    assert outcome.code == 1, outcome
    assert outcome.stderr == f"callsentry: --to-file {out}: cannot write {blocked}: {why}\n"


@pytest.mark.parametrize("command", [["replay", "events.csv"], ["alerts", "list"]])
def test_a_data_dir_inside_another_is_refused_and_nothing_is_written(
    tmp_path: Path, command: list[str]
) -> None:
    # A --data-dir one folder too deep (a table folder of the lake): replay made a data
    # dir of its own among the lake's files, and exited 0.
    data_dir = tmp_path / "data"
    (data_dir / "lake" / "events").mkdir(parents=True)
    (data_dir / "callsentry.duckdb").write_bytes(b"")
    (tmp_path / "events.csv").write_text(
        "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
        "2026-12-05T10:00:00Z,nest-1,1,RINGING,8613800000001,4001,,1,Main\n"
    )
    inner = data_dir / "lake" / "events"
    outcome = _run([*command, "--data-dir", str(inner)], "nested", tmp_path)
    assert outcome.code == 2, outcome
    assert outcome.stderr == (
        f"callsentry: configuration error: store.data_dir (from a flag): {inner} is "
        f"inside the data dir {data_dir}: give {data_dir} itself, or a folder of its own\n"
    )
    assert list(inner.iterdir()) == []


def test_simulate_in_an_encoding_that_cannot_hold_a_report_sends_nothing(
    tmp_path: Path,
) -> None:
    events = tmp_path / "events.csv"
    events.write_text(
        "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
        "2026-12-05T10:00:00Z,enc-1,1,RINGING,8613800000001,4001,,1,Main\n"
        "2026-12-05T10:00:01Z,enc-1,2,OK,8613800000001,4001,,1,主菜单\n",
        encoding="utf-8",
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = str(receiver.getsockname()[1])
        argv = ["simulate", "--events", str(events), "--send", "--port", port]
        outcome = _run([*argv, "--encoding", "latin-1", "--retries", "0"], "latin-1", tmp_path)
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(2048)  # not even the first report, which latin-1 holds
    assert outcome.code == 2, outcome
    assert outcome.stderr == (
        "callsentry: --encoding latin-1 cannot encode '主菜单' in the report enc-1,2; "
        "nothing was sent (utf-8 holds any text)\n"
    )


def test_simulate_with_a_bad_range_says_where_in_one_line(tmp_path: Path) -> None:
    scenario = tmp_path / "ranged.yaml"
    scenario.write_text(
        "name: ranged\nduration: 1h\nincidents:\n"
        "  - {id: a, family: wangiri, calls: {between: [80, 15]}}\n",
        encoding="utf-8",
    )
    argv = ["simulate", "--scenario", str(scenario), "--to-file", str(tmp_path / "out")]
    outcome = _run(argv, "a range whose low end is above its high end", tmp_path)
    assert outcome.code == 2, outcome
    assert outcome.stderr == (
        f"callsentry: {scenario}:4: incidents.0.calls: between [80, 15]: "
        "the low end is above the high end\n"
    )
    assert "Traceback" not in outcome.stdout + outcome.stderr


# How the `callsentry` process ends once its command is over: after the threads it
# left running and the exit handlers registered since (multiprocessing's), with its exit
# code and all it wrote, but without the interpreter's teardown (the object below is
# never freed).
ENDS_AT_ONCE = """
import atexit, sys, threading, time
from pathlib import Path
from engine.apps.commandline import command_ended, end_at_once_when_done

end_at_once_when_done()
folder = Path(sys.argv[1])

class FreedAtTeardown:
    def __del__(self) -> None:
        (folder / "torn down").write_text("")

KEPT = FreedAtTeardown()

def late() -> None:
    time.sleep(0.3)
    (folder / "thread").write_text("")

threading.Thread(target=late).start()
atexit.register(lambda: (folder / "handler").write_text(""))
print("said", end="")
code = int(sys.argv[2]) if len(sys.argv) > 2 else "a reason"
command_ended(code)
sys.exit(code)
"""


@pytest.mark.parametrize("code", ["3", None])
def test_the_process_ends_once_its_threads_and_exit_handlers_are_done(
    tmp_path: Path, code: str | None
) -> None:
    args = [sys.executable, "-c", ENDS_AT_ONCE, str(tmp_path), *([code] if code else [])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout == "said"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["handler", "thread"]
    if code is None:
        # As sys.exit says a reason: on stderr, exit code 1.
        assert (result.returncode, result.stderr) == (1, "a reason\n")
    else:
        assert (result.returncode, result.stderr) == (3, "")


def test_a_file_name_or_key_with_an_escape_sequence_reaches_no_terminal_as_one(
    tmp_path: Path,
) -> None:
    # Values were escaped, but a rule file's name and an unknown key were printed raw:
    # on a terminal, `\x1b[2J` cleared the screen of whoever ran `rules validate`.
    folder = tmp_path / "rules\x1b[31m"
    folder.mkdir()
    # In YAML, an escape is written as one in a double-quoted string.
    (folder / "evil\x1b[31mname.yaml").write_text('id: x\n"col\\x1b[2Jour": 1\n')
    scenario = tmp_path / "s.yaml"
    sample = (ROOT / "data" / "scenarios" / "sample.yaml").read_text()
    name = next(line for line in sample.splitlines() if line.startswith("name:"))
    scenario.write_text(sample.replace(name, 'name: "s2\\x1b[31m"'))
    tested = tmp_path / "tested"
    shutil.copytree(ROOT / "rules" / "lists", tested / "lists")
    rule = (ROOT / "rules" / "short-calls-caller.yaml").read_text()
    (tested / "r.yaml").write_text(
        rule.replace(
            "  - name: thirty short calls", '  - name: "thirty\\x1b[31m short calls'
        ).replace("in two and a half minutes\n", 'in two and a half minutes"\n', 1)
    )
    for argv in (
        ["rules", "test", str(tested)],
        ["rules", "validate", str(folder)],
        ["simulate", "--scenario", str(scenario), "--to-file", str(tmp_path / "out\x1b[1m")],
    ):
        outcome = _run(argv, "", tmp_path)
        said = outcome.stdout + outcome.stderr
        assert "\x1b" not in said, said
        assert "\\x1b[31m" in said, said


def test_simulate_says_1_for_a_file_or_address_and_takes_ipv6_in_brackets(
    tmp_path: Path,
) -> None:
    # It exited 2 for a missing file or a port in use, where replay and serve say 1.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        for argv, said in (
            (["--scenario", str(tmp_path / "nope.yaml"), "--to-file", str(tmp_path / "o")],
             "nope.yaml: cannot read: No such file or directory"),
            (["--events", str(tmp_path / "nope.csv"), "--send"], "nope.csv: No such file"),
            (["--consume", "--port", port, "--for", "1"],
             f"cannot listen on 127.0.0.1:{port}: Address already in use"),
        ):  # fmt: skip
            outcome = _run(["simulate", *argv], "", tmp_path)
            assert (outcome.code, said in outcome.stderr) == (1, True), outcome
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::1", 0))
        free = str(probe.getsockname()[1])
    # As the README writes an IPv6 address for --listen: it was "Name or service not known".
    outcome = _run(
        ["simulate", "--consume", "--host", "[::1]", "--port", free, "--for", "0.2"], "", tmp_path
    )
    assert outcome.code == 0, outcome
    assert f"consuming reports on udp ::1:{free}" in outcome.stdout


def test_a_blank_note_or_invalid_rules_for_an_exception_are_exit_2(tmp_path: Path) -> None:
    # A blank --note exited 1 beside a blank --reviewer's 2; `alerts except` on an invalid
    # rules folder exited 1 where replay and backtest say 2.
    blank = _run(["alerts", "review", "0f2c", "--status", "fp", "--note", " "], "", tmp_path)
    assert (blank.code, blank.stderr) == (
        2,
        "callsentry: a review needs a note saying what was checked\n",
    )
    data = make_console_data(tmp_path / "c")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("id: bad\nseverity: huge\n")
    alert_id = list_alerts(data, "all", 1)[0]["alert_id"]
    argv = ["alerts", "except", alert_id, "--reason", "a PBX", "--rules", str(rules),
            "--data-dir", str(data)]  # fmt: skip
    refused = _run(argv, "", tmp_path)
    assert refused.code == 2, refused
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"callsentry: the rules in {rules} are invalid")
    )
