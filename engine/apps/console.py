"""`callsentry console`: the security team's web console (engine/console), its users and
its API tokens. Imports only click, commandline and engine.core at import time; the web
stack loads when the console starts."""

from __future__ import annotations

import getpass
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.apps.commandline import (
    config_option,
    data_dir_option,
    data_dir_or_fail,
    existing_data_dir,
    fail,
    fail_with_problems,
    log_level_option,
    settings_or_fail,
    setup_logging,
)
from engine.core.addresses import parse_hostport
from engine.core.runtime import tune_gc_for_service
from engine.core.text import shown, terminal_table

if TYPE_CHECKING:
    from engine.apps.settings import Settings
    from engine.console.tariffs import TariffList

log = logging.getLogger("callsentry")

DEFAULT_LISTEN = "127.0.0.1:8080"


def _data_dir(data_dir: Path | None, config: Path | None) -> Path:
    # `console --data-dir X adduser NAME` means X too, as `console adduser NAME --data-dir X`.
    given = click.get_current_context().find_object(dict) or {}
    data_dir = data_dir or given.get("data_dir")
    config = config or given.get("config")
    return data_dir_or_fail(data_dir, config, writes=True)  # no stray accounts file elsewhere


@click.group(invoke_without_command=True)
@data_dir_option
@config_option
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to serve on (loopback by default: put a TLS proxy in front for others).",
)
@click.option(
    "--secure-cookies",
    is_flag=True,
    help="Send the session cookie over HTTPS only (behind a TLS proxy).",
)
@click.option(
    "--refresh-s",
    type=click.IntRange(min=1, max=3600),
    default=15,
    show_default=True,
    help="How often an open queue page asks for new alerts (seconds).",
)
@click.option(
    "--tariffs",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Tariff list (YAML: currency, rates per E.164 prefix; rules/tariffs/tariffs.yaml "
    "is an example): the queue can then be sorted by estimated exposure. "
    "Default: the setting console.tariffs.",
)
@log_level_option
@click.pass_context
def console(
    ctx: click.Context,
    data_dir: Path | None,
    config: Path | None,
    listen: str,
    secure_cookies: bool,
    refresh_s: int,
    tariffs: Path | None,
    log_level: str,
) -> None:
    """The web console: the alert queue, alerts with their evidence and traffic, entities,
    rules, reviews; and its JSON API under /api/. Without a subcommand it serves."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"data_dir": data_dir, "config": config}
        return
    try:
        host, port = parse_hostport(listen)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--listen") from None
    overrides: dict[str, Any] = {"store": {"data_dir": str(data_dir)}} if data_dir else {}
    if tariffs is not None:
        overrides["console"] = {"tariffs": str(tariffs)}
    settings = settings_or_fail(config, overrides)
    priced = _tariff_list(settings)
    data = existing_data_dir(settings)
    setup_logging(log_level)

    import socket

    import uvicorn

    from engine.console.accounts import Accounts, AccountsFileError, accounts_path, session_secret
    from engine.console.lakeview import LakeView, LakeViewError, RuleBook
    from engine.console.web import Console, create_app

    try:
        view = LakeView(data)
        if priced is not None:
            view.price_with(priced, settings.detection.number_plan(), warm=True)
            log.info(
                "console: exposure priced by %s (%d destinations, in %s)",
                priced.path,
                len(priced.tariffs),
                priced.currency,
            )
    except LakeViewError as error:
        fail(str(error))
    try:
        accounts = Accounts.load(accounts_path(data))
        secret = session_secret(data)
    except AccountsFileError as error:
        fail(str(error))
    if not accounts.users:
        click.echo(
            f"callsentry: no console users yet: add one with "
            f"'callsentry console adduser NAME --data-dir {data}'",
            err=True,
        )
    app = create_app(
        Console(
            data,
            view,
            RuleBook.read(settings.detection.rules_folder),
            poll_s=refresh_s,
            on_reviews=review_publisher(settings),
        ),
        secret,
        secure_cookies=secure_cookies,
    )
    # Bound here, so a taken address is one clear line rather than uvicorn's exit.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        fail(f"cannot listen on {listen}: {error.strerror or error}")
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    log.info("console on http://%s:%d/ (data dir %s)", shown_host, bound[1], data)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level.lower(), access_log=False, server_header=False)
    )
    tune_gc_for_service()
    try:
        server.run(sockets=[sock])
    finally:
        view.close()


def _tariff_list(settings: Settings) -> TariffList | None:
    """The configured tariff list, or None; a bad file is one clear error per problem."""
    if settings.console.tariffs is None:
        return None
    from engine.console.tariffs import load_tariffs
    from engine.core.yamlfile import YamlFileError

    try:
        tariffs = load_tariffs(settings.console.tariffs)
    except YamlFileError as error:
        fail_with_problems(error, "the tariff list is invalid ({count} problem(s))", 2)
    return tariffs


def _password(confirm: bool = True) -> str:
    """The password from the terminal (asked twice), or the first line of stdin when it
    is not a terminal (for scripts: `printf '%s\\n' "$PW" | callsentry console adduser`)."""
    if sys.stdin is None or not sys.stdin.isatty():
        line = sys.stdin.readline() if sys.stdin is not None else ""
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Again: ") != first:
        fail("the two passwords differ; nothing was changed")
    return first


@console.command("adduser")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["reviewer", "viewer"]),
    default="reviewer",
    show_default=True,
    help="reviewer: may record reviews and assign; viewer: reads only.",
)
@data_dir_option
@config_option
def adduser(name: str, role: str, data_dir: Path | None, config: Path | None) -> None:
    """Add a console user, or give an existing one a new role and password (which signs
    their sessions out). The password is read from the terminal, or from stdin."""
    from engine.console.accounts import Accounts, AccountsFileError, accounts_path, valid_name

    try:
        valid_name(name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="NAME") from None
    data = _data_dir(data_dir, config)
    try:
        accounts = Accounts.load(accounts_path(data))
    except AccountsFileError as error:
        fail(str(error))
    password = _password()
    if not password:
        fail("no password given; nothing was changed")
    existed = name in accounts.users
    try:
        accounts.set_user(name, role, password)
        accounts.save()
    except ValueError as error:
        fail(f"{error}; nothing was changed")
    except AccountsFileError as error:
        fail(str(error))
    click.echo(f"{'updated' if existed else 'added'} {role} {name} in {accounts.path}")


@console.group("token")
def token() -> None:
    """API tokens for scripts (Authorization: Bearer <token>)."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["reviewer", "viewer"]),
    default="viewer",
    show_default=True,
    help="reviewer: may record reviews; viewer: reads only.",
)
@data_dir_option
@config_option
def token_create(name: str, role: str, data_dir: Path | None, config: Path | None) -> None:
    """Make a token (replacing one of the same name) and print it once: only its hash is
    kept, so a lost token is replaced, never recovered."""
    from engine.console.accounts import Accounts, AccountsFileError, accounts_path, valid_name

    try:
        valid_name(name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="NAME") from None
    data = _data_dir(data_dir, config)
    try:
        accounts = Accounts.load(accounts_path(data))
        secret = accounts.create_token(name, role)
        accounts.save()
    except AccountsFileError as error:
        fail(str(error))
    click.echo(secret)
    click.echo(f"({role} token {name}: shown once, stored hashed in {accounts.path})", err=True)


def _change_accounts(
    data_dir: Path | None, config: Path | None, change: Callable[[Any], None]
) -> Any:
    """Load the accounts, `change` them and save: a ValueError from `change` is the
    command's one-line failure, and nothing is written."""
    from engine.console.accounts import Accounts, AccountsFileError, accounts_path

    data = _data_dir(data_dir, config)
    try:
        accounts = Accounts.load(accounts_path(data))
        change(accounts)
        accounts.save()
    except ValueError as error:
        fail(f"{error}; nothing was changed")
    except AccountsFileError as error:
        fail(str(error))
    return accounts


def _list_accounts(data_dir: Path | None, config: Path | None, kind: str) -> None:
    from engine.console.accounts import Accounts, AccountsFileError, accounts_path

    data = _data_dir(data_dir, config)
    try:
        accounts = Accounts.load(accounts_path(data))
    except AccountsFileError as error:
        fail(str(error))
    entries = accounts.users if kind == "users" else accounts.tokens
    if not entries:
        click.echo(f"no {kind} in {accounts.path}")
        return
    rows = [(a.name, a.role, a.created_at) for a in sorted(entries.values(), key=lambda a: a.name)]
    for line in terminal_table(rows, ("NAME", "ROLE", "CREATED")):
        click.echo(line)


@console.command("users")
@data_dir_option
@config_option
def users(data_dir: Path | None, config: Path | None) -> None:
    """The console's users: name, role and when each was added (no password is shown)."""
    _list_accounts(data_dir, config, "users")


@console.command("deluser")
@click.argument("name")
@data_dir_option
@config_option
def deluser(name: str, data_dir: Path | None, config: Path | None) -> None:
    """Remove a console user: their sessions end at their next request."""
    accounts = _change_accounts(data_dir, config, lambda a: a.remove_user(name))
    click.echo(f"removed user {shown(name)} from {accounts.path}")


@token.command("list")
@data_dir_option
@config_option
def token_list(data_dir: Path | None, config: Path | None) -> None:
    """The API tokens: name, role and when each was made (a token is never shown again)."""
    _list_accounts(data_dir, config, "tokens")


@token.command("revoke")
@click.argument("name")
@data_dir_option
@config_option
def token_revoke(name: str, data_dir: Path | None, config: Path | None) -> None:
    """Revoke an API token: a request that carries it is refused from now on."""
    accounts = _change_accounts(data_dir, config, lambda a: a.revoke_token(name))
    click.echo(f"revoked token {shown(name)} in {accounts.path}")


def review_publisher(
    settings: Settings,
) -> Callable[[list[tuple[str, str]], str, str, str], None] | None:
    """With `[relay.nats]` on, the console's verdicts are queued for NATS like those of
    `alerts review`; a verdict that cannot be queued is still recorded, and logged."""
    if not settings.relay.nats.enabled:
        return None
    from engine.alerts.outbox import OutboxError
    from engine.apps.relay import queue_reviews

    def publish(recorded: list[tuple[str, str]], status: str, note: str, reviewer: str) -> None:
        try:
            queue_reviews(settings, recorded, status, note, reviewer)
        except OutboxError as error:
            log.error("console: a review is recorded, but not queued for NATS: %s", error)

    return publish
