"""What this install is: its version, and which of its compiled parts run. Light on
purpose (no settings, no metrics, no store): `callsentry version` imports only this,
and the settings import it for `shipped_rules` alone, so what the other two need
(the package metadata, the compiled parts' check) loads when they are called."""

from __future__ import annotations

import os
from pathlib import Path


def build_info() -> dict[str, str]:
    import importlib.metadata
    import platform

    from engine.detect import compiled_modules, stale_reason

    try:
        version = importlib.metadata.version("callsentry")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    compiled = "no" if not compiled_modules() else "stale" if stale_reason() else "yes"
    return {"version": version, "python": platform.python_version(), "compiled": compiled}


def uncompiled_parts() -> list[str]:
    """The compiled parts this install runs as Python instead, each with why and what it
    costs ([] when all are in use)."""
    from engine.detect import COMPILED, compiled_modules, stale_reason
    from engine.ingest import native

    missing = []
    stale = stale_reason()
    compiled = compiled_modules()
    asked = os.environ.get("CALLSENTRY_DETECTION_AS_PYTHON", "") not in ("", "0")
    if asked or stale is not None or len(compiled) < len(COMPILED):
        why = (
            "CALLSENTRY_DETECTION_AS_PYTHON is set"
            if asked
            else stale or "not compiled by mypyc in this install"
        )
        missing.append(f"detection runs as Python ({why}): about half as fast")
    helpers = [name for name in native.HELPERS if native.load(name) is None]
    if helpers:
        missing.append(
            f"C helpers {', '.join(helpers)} not built: their Python equivalents run "
            "(the receiver about a quarter slower at full load)"
        )
    return missing


def shipped_rules() -> Path:
    """The rules shipped with this release. An installed package holds them as
    `engine/shipped_rules/` (setup.py copies the project's `rules/` there); a source
    checkout (an editable install) has them as its own `rules/`."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "shipped_rules"
    return installed if installed.is_dir() else package.parent / "rules"
