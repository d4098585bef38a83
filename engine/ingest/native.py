"""The C helpers of ingest (`_fastio`, `_seen`, `_rows`), used only as built from their
sources as they are now.

Each helper is optional: where it is not built (no C compiler, `_fastio` off Linux),
the Python beside its import site does the same, slower. setup.py records the SHA-256
of each helper's .c source it built (`RECORD`, beside the built files). A helper whose
source no longer has its recorded digest (an edit without `make setup`), or that has
no record, is not loaded: the Python runs instead, and one warning names the source
and says to run `make setup`, rather than the old build running silently. Where the
.c sources are not installed (a wheel), there is no source to have changed: the
build is what was shipped.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

HELPERS = ("_fastio", "_seen", "_rows")
RECORD = "_c_helpers.sha256"

_FOLDER = Path(__file__).resolve().parent
log = logging.getLogger(__name__)

_loaded: dict[str, ModuleType | None] = {}
_recorded: dict[str, str] | None = None


def recorded_digests(folder: Path = _FOLDER) -> dict[str, str]:
    """The record's digest of each source, by file name ({} when it cannot be read)."""
    try:
        lines = (folder / RECORD).read_text(encoding="ascii").splitlines()
        return {name: digest for digest, name in (line.split() for line in lines if line.strip())}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def stale_reason(
    name: str, folder: Path = _FOLDER, recorded: dict[str, str] | None = None
) -> str | None:
    """Why helper `name`'s build must not be used, or None (fit, or no source to check)."""
    source = folder / f"{name}.c"
    try:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"{source.name} cannot be read ({error.strerror})"
    expected = (recorded_digests(folder) if recorded is None else recorded).get(source.name)
    if expected is None:
        return f"no record ({RECORD}) of building {source.name}"
    if expected != digest:
        return f"{source.name} changed since it was built"
    return None


def load(name: str) -> ModuleType | None:
    """Helper `name` (one of `HELPERS`) if built from its source as it is now, else None.

    Checked once per process; a refused build is named in one warning."""
    if name not in HELPERS:
        raise ValueError(f"{name!r} is not one of the C helpers {HELPERS}")
    if name in _loaded:
        return _loaded[name]
    module: ModuleType | None = None
    fullname = f"{__package__}.{name}"
    if importlib.util.find_spec(fullname) is not None:
        global _recorded
        if _recorded is None:
            _recorded = recorded_digests()
        # Checked before loading: a stale build's code never runs, not even its init.
        reason = stale_reason(name, recorded=_recorded)
        if reason is None:
            try:
                module = importlib.import_module(fullname)
            except ImportError as error:  # built for another Python, say
                reason = f"its build cannot be loaded ({error})"
        if reason is not None:
            log.warning(
                "C helper %s not used: %s; running its Python equivalent (slower) until "
                "`make setup` builds it again",
                name,
                reason,
            )
    _loaded[name] = module
    return module
