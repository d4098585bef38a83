"""River's modules the models use, loaded without their packages' __init__.

River's package __init__s import everything in them: `river.anomaly`'s brings its
Gaussian scorer and with it `river.proba` and SciPy's statistics, `river.tree`'s and
`river.preprocessing`'s bring SciPy's statistics too, `river.drift`'s brings KSWIN
(SciPy again). That is most of a second of CPU in every process whose models fill
their first window, for modules (HalfSpaceTrees, MinMaxScaler, PageHinkley) that need
none of it. `module(name)` loads one module from its file under its own name; a later
`import river.anomaly` (or any other import of the package) finds it in sys.modules
and uses it, so every class is River's own, the same object whichever way it was
reached: pickles name it as before and load it in any process.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import river

_loading = threading.Lock()


def module(name: str) -> ModuleType:
    """River's module `name` (`river.anomaly.hst`), loaded from its file when it is not
    loaded yet. Its own imports must not need its package's __init__ (or must name
    modules loaded here first)."""
    found = sys.modules.get(name)
    if found is not None:
        return found
    with _loading:
        found = sys.modules.get(name)
        if found is not None:
            return found
        parts = name.split(".")
        if parts[0] != "river" or len(parts) < 2:
            raise ValueError(f"{name!r} is no module of River")
        path = Path(river.__file__).parent.joinpath(*parts[1:-1], parts[-1] + ".py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        return run_spec(spec)


def run_spec(spec: ModuleSpec, names: dict[str, Any] | None = None) -> ModuleType:
    """The module `spec` finds, run as an import runs it: in sys.modules under its name
    while it runs (its own imports of itself find it), and out again if it fails (not
    bound on its package: a caller that wants it there sets it).
    `names`: set in the module's namespace before it runs."""
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    loaded.__dict__.update(names or {})
    sys.modules[spec.name] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return loaded


# HalfSpaceTrees' module, and what it imports from river.tree (padded, which imports
# base), loaded before it so that neither runs river.tree's __init__.
TREES = "river.anomaly.hst"
TREES_NEEDS = ("river.tree.base", "river.tree.padded")
SCALER = "river.preprocessing.scale"
