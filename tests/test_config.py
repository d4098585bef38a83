from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.apps.settings import ConfigError, load_settings
from engine.core.addresses import parse_hostport


def test_defaults_listen_on_8000_and_accept_loopback_only() -> None:
    settings = load_settings(environ={})
    assert settings.receiver.listen == ["0.0.0.0:8000"]
    assert settings.receiver.allow == ["127.0.0.0/8", "::1/128"]
    assert settings.codec.encodings == ["utf-8", "gbk"]


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "callsentry.toml"
    path.write_text(
        '[store]\ndata_dir = "/srv/a"\nflush_interval_s = 3\n[codec]\nseparator = "|"\n'
    )
    settings = load_settings(
        path,
        overrides={"store": {"data_dir": "/srv/c"}},
        environ={"CALLSENTRY_STORE__FLUSH_INTERVAL_S": "4", "CALLSENTRY_STORE__DATA_DIR": "/srv/b"},
    )
    assert str(settings.store.data_dir) == "/srv/c"
    assert settings.store.flush_interval_s == 4
    assert settings.codec.separator == "|"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            "[store]\nflush_interval_s = 0\n",
            {},
            "store.flush_interval_s (from {path}): Input should be greater than 0",
        ),
        (
            "[store]\nflush_intervals = 1\n",
            {},
            "store.flush_intervals (from {path}): unknown setting",
        ),
        (
            "[receiver]\nallow = ['10.0.0.300/8']\n",
            {},
            "receiver.allow (from {path}): '10.0.0.300/8' is not an IP address",
        ),
        ("[receiver]\nlisten = ['::1:80']\n", {}, "write an IPv6 address in brackets"),
        ("[codec]\nencodings = ['utf-8', 'klingon']\n", {}, "unknown encoding 'klingon'"),
        ("[codec]\nseparator = ':'\n", {}, "codec.separator (from {path}): Input should be ','"),
        (
            "",
            {"CALLSENTRY_STORE__FSYNC": "maybe"},
            "store.fsync (from environment variable CALLSENTRY_STORE__FSYNC)",
        ),
        ("[store\n", {}, "{path}: Expected ']'"),
        # A file where the data dir should be (here the settings file itself): said as
        # such, not as the outbox or the journal that cannot be made under it.
        (
            "",
            {"CALLSENTRY_STORE__DATA_DIR": "'{path}'"},
            "store.data_dir (from environment variable CALLSENTRY_STORE__DATA_DIR): "
            "{path} is a file, not a folder",
        ),
        # Basic auth in the URL was never sent (the request went to a host named
        # 'ops:s3cret@127.0.0.1', "Name or service not known"), and config check
        # printed the password.
        (
            "[detection]\nwebhook_url = 'http://ops:s3cret@127.0.0.1:9000/alerts'\n",
            {},
            "detection.webhook_url (from {path}): a webhook URL carries no user or password",
        ),
        (
            "[store]\ndata_dir = '{path}/data'\n",
            {},
            "store.data_dir (from {path}): {path}/data is under a file, not in a folder",
        ),
    ],
)
def test_errors_name_the_key_where_it_came_from_and_why(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("{path}", str(path)))
    environ = {name: value.format(path=path) for name, value in environ.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ)
    assert message.format(path=path) in str(caught.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read config file"):
        load_settings(Path("nope.toml"), environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.0.0.0:8000", ("0.0.0.0", 8000)), ("[::]:9", ("::", 9)), (":7", ("0.0.0.0", 7))],
)
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_cli_config_check_and_bad_flags(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "engine", "config", "check"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "configuration OK" in ok.stderr
    assert 'listen = ["0.0.0.0:8000"]' in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--listen",
            "nowhere",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "receiver.listen (from a flag): 'nowhere' has no port" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_config_check_does_not_print_the_webhook_token() -> None:
    env = {**os.environ, "CALLSENTRY_DETECTION__WEBHOOK_TOKEN": '"very-secret"'}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "config", "check"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert 'webhook_token = "(set, not shown)"' in done.stdout
    assert "very-secret" not in done.stdout + done.stderr


def test_config_check_prints_toml_that_reads_back_as_the_same_settings(tmp_path: Path) -> None:
    # Tables and lists of tables were printed as JSON objects (`channels = [{"name": ...`),
    # which TOML does not read: a printed configuration could not be kept as a file.
    from engine.apps.settingstext import settings_lines

    config = tmp_path / "callsentry.toml"
    config.write_text(
        '[receiver]\nlisten = ["127.0.0.1:7000", "[::1]:7000"]\n'
        '[[relay.udp]]\ntarget = "127.0.0.1:9001"\nname = "billing"\n'
        '[[relay.udp]]\ntarget = "127.0.0.1:9002"\nseparator = "|"\n'
        '[relay.nats]\nurls = ["nats://127.0.0.1:4222"]\nwindow = 500\n'
        '[detection]\nmodels_enabled = false\nfeed_hours = ["08:00-18:00"]\n'
        'dial_prefixes = ["17951"]\n'
        '[[notify.channels]]\nname = "soc"\nurl = "json://127.0.0.1:9/hook"\n'
        'severities = ["high", "critical"]\nrules = ["short-calls-*"]\n'
        '[[notify.channels]]\nname = "siem"\nsyslog = "udp://127.0.0.1:514"\n'
    )
    settings = load_settings(config, environ={})
    printed = tmp_path / "printed.toml"
    printed.write_text("\n".join(settings_lines(settings, {})) + "\n")
    again = load_settings(printed, environ={})

    def comparable(s: object) -> dict[str, object]:
        assert hasattr(s, "model_dump")
        data: dict[str, object] = s.model_dump(mode="json")
        # A channel's URL is printed as Apprise's masked form of it, and its limit as
        # the one in effect (unset: 20 for a URL, 0 for syslog): compared apart.
        data["notify"] = [
            {k: v for k, v in c.items() if k not in ("url", "rate_limit")}
            for c in data["notify"]["channels"]  # type: ignore[index]
        ]
        return data

    assert comparable(again) == comparable(settings)
    assert [c.limit for c in again.notify.channels] == [c.limit for c in settings.notify.channels]
    assert again.notify.channels[0].url.startswith("json://127.0.0.1:9/hook")
    assert again.relay.nats.urls == ["nats://127.0.0.1:4222"] and again.relay.nats.window == 500
    assert [t.target for t in again.relay.udp] == ["127.0.0.1:9001", "127.0.0.1:9002"]
