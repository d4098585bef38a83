"""Who may use the console: people (argon2-hashed passwords) and API tokens (stored as
their SHA-256), each with a role, in one file of the data dir, `console/accounts.json`:

    {"version": 1,
     "users":  {"ana": {"role": "reviewer", "password": "$argon2id$v=19$...",
                        "created_at": "2026-12-05T10:00:00+00:00"}},
     "tokens": {"nightly-export": {"role": "viewer", "sha256": "<64 hex digits>",
                                   "created_at": "2026-12-05T10:00:00+00:00"}}}

A token is 32 random bytes, shown once when it is made: a hash of a secret that long
cannot be reversed, and SHA-256 keeps each API request cheap (argon2 is for the
passwords people choose). The file and the session secret beside it are written
0600, atomically. Anything else in the file is an `AccountsFileError` naming the file
and what is wrong, never a traceback.

>>> valid_name("ana.lopez")
'ana.lopez'
>>> valid_name("<b>")
Traceback (most recent call last):
...
ValueError: name '<b>' is not 1-64 letters, digits, '.', '_', '@' or '-'
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROLES = ("reviewer", "viewer")
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Longer than any password a person types, short enough that hashing it stays cheap.
MAX_PASSWORD = 1024
MIN_PASSWORD = 8
TOKEN_PREFIX = "cs_"


class AccountsFileError(Exception):
    """The accounts file cannot be read or written; the message names it and why."""


def folder(data_dir: Path) -> Path:
    return data_dir / "console"


def accounts_path(data_dir: Path) -> Path:
    return folder(data_dir) / "accounts.json"


def secret_path(data_dir: Path) -> Path:
    return folder(data_dir) / "session.secret"


def valid_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"name {name!r} is not 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


def _hasher() -> Any:
    # Imported when a password is hashed or checked: the CLI's other commands never pay.
    from argon2 import PasswordHasher

    return PasswordHasher()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    secret: str  # an argon2 hash (a user) or a SHA-256 hex digest (a token)
    created_at: str

    @property
    def may_review(self) -> bool:
        return self.role == "reviewer"


@dataclass
class Accounts:
    path: Path
    users: dict[str, Account] = field(default_factory=dict)
    tokens: dict[str, Account] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Accounts:
        """The accounts in `path`; none when the file does not exist yet."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as error:
            raise AccountsFileError(f"cannot read {path}: {error.strerror or error}") from None
        return cls.parse(path, data)

    @classmethod
    def parse(cls, path: Path, data: bytes) -> Accounts:
        def bad(reason: str) -> AccountsFileError:
            return AccountsFileError(f"{path}: {reason}")

        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise bad(f"not JSON ({error})") from None
        if not isinstance(document, dict):
            raise bad("not a JSON object with users and tokens")
        unknown = set(document) - {"version", "users", "tokens"}
        if unknown:
            raise bad(f"unknown key {sorted(unknown)[0]!r} (version, users, tokens)")
        if document.get("version") != VERSION:
            raise bad(f"version {document.get('version')!r} is not {VERSION}")
        accounts = cls(path)
        for kind, secret_key, target in (
            ("users", "password", accounts.users),
            ("tokens", "sha256", accounts.tokens),
        ):
            entries = document.get(kind, {})
            if not isinstance(entries, dict):
                raise bad(f"{kind}: not an object of names")
            for name, entry in entries.items():
                where = f"{kind}.{name}"
                try:
                    valid_name(name)
                except ValueError as error:
                    raise bad(f"{where}: {error}") from None
                if not isinstance(entry, dict):
                    raise bad(f"{where}: not an object")
                unknown = set(entry) - {"role", secret_key, "created_at"}
                if unknown:
                    raise bad(f"{where}: unknown key {sorted(unknown)[0]!r}")
                role, secret, created = (
                    entry.get("role"),
                    entry.get(secret_key),
                    entry.get("created_at", ""),
                )
                if role not in ROLES:
                    raise bad(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
                if not isinstance(secret, str) or not (
                    secret.startswith("$argon2") if kind == "users" else _HEX64.match(secret)
                ):
                    expected = "an argon2 hash" if kind == "users" else "64 hex digits"
                    raise bad(f"{where}.{secret_key}: not {expected}")
                if not isinstance(created, str):
                    raise bad(f"{where}.created_at: not a text")
                target[name] = Account(name, role, secret, created)
        return accounts

    def document(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "users": {
                a.name: {"role": a.role, "password": a.secret, "created_at": a.created_at}
                for a in self.users.values()
            },
            "tokens": {
                a.name: {"role": a.role, "sha256": a.secret, "created_at": a.created_at}
                for a in self.tokens.values()
            },
        }

    def save(self) -> None:
        write_private(self.path, (json.dumps(self.document(), indent=2) + "\n").encode())

    def set_user(self, name: str, role: str, password: str) -> None:
        """Add `name`, or give an existing user this role and password."""
        valid_name(name)
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
        if len(password) > MAX_PASSWORD:
            raise ValueError(f"a password of more than {MAX_PASSWORD} characters")
        self.users[name] = Account(name, role, _hasher().hash(password), _now())

    def create_token(self, name: str, role: str) -> str:
        """A new token for `name` (replacing an earlier one of that name); returned
        once, only its digest is kept."""
        valid_name(name)
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.tokens[name] = Account(name, role, token_digest(token), _now())
        return token

    def remove_user(self, name: str) -> None:
        """Remove a user (their sessions end at their next request); ValueError if none."""
        if self.users.pop(name, None) is None:
            raise ValueError(f"no user {name!r} (users: {', '.join(sorted(self.users)) or 'none'})")

    def revoke_token(self, name: str) -> None:
        """Remove a token: a request with it is refused from now on; ValueError if none."""
        if self.tokens.pop(name, None) is None:
            known = ", ".join(sorted(self.tokens)) or "none"
            raise ValueError(f"no token {name!r} (tokens: {known})")

    def check_password(self, name: str, password: str) -> Account | None:
        """The user, when `password` is theirs. An unknown name costs as much time as a
        wrong password, so the answer's time does not tell which names exist."""
        from argon2.exceptions import InvalidHashError, VerificationError

        account = self.users.get(name)
        hasher = _hasher()
        if len(password) > MAX_PASSWORD:
            return None
        try:
            hasher.verify(account.secret if account else _decoy_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        return account

    def check_token(self, token: str) -> Account | None:
        digest = token_digest(token)
        found = None
        for account in self.tokens.values():
            if hmac.compare_digest(account.secret, digest):
                found = account
        return found


_DECOY: list[str] = []


def _decoy_hash() -> str:
    if not _DECOY:
        _DECOY.append(_hasher().hash(secrets.token_hex(16)))
    return _DECOY[0]


def _now() -> str:
    return datetime.now(tz=UTC).replace(microsecond=0).isoformat()


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by its owner only (0600)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    except OSError as error:
        raise AccountsFileError(f"cannot write {path}: {error.strerror or error}") from None


def session_secret(data_dir: Path) -> bytes:
    """The key that signs session cookies: made once, kept in the data dir (0600), so
    sessions survive a restart of the console; deleting the file signs everyone out."""
    path = secret_path(data_dir)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise AccountsFileError(f"cannot read {path}: {reason}") from None
    if len(text) >= 64 and all(c in "0123456789abcdef" for c in text):
        return text.encode()
    if text:
        raise AccountsFileError(f"{path}: not a session secret (delete it to make a new one)")
    secret = secrets.token_hex(32)
    write_private(path, (secret + "\n").encode())
    return secret.encode()
