"""River's running statistics, as the models use them, without River's `river.stats`
package __init__: that imports every statistic River has, and with them numpy, SciPy
and narwhals (through river.utils), most of a small replay's imports.

The models keep `EWMean`, `EWVar`, `Quantile` and `RollingQuantile` (River's Rust
implementations, whose modules need `river.stats.base` only), and the forward model's
PageHinkley keeps a `Mean`, whose module imports numpy for `update_many`, which no
model calls: that module gets numpy when it first uses it.

`stats` is River's `river.stats` package, put in `sys.modules` with those modules
loaded and its __init__ not yet run; the first use of any other name (River's other
estimators, `from river import stats; stats.Var`) runs the __init__ then, so the rest
of River works as it always has. The classes are River's own (same module, same name):
snapshots pickle and load them as before.
"""

from __future__ import annotations

import builtins
import importlib.util
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

from models.river_modules import run_spec

PACKAGE = "river.stats"
# The statistics the models use, by the module that defines them.
LOADED = {
    "EWMean": "ewmean",
    "EWVar": "ewvar",
    "Quantile": "quantile",
    "RollingQuantile": "quantile",
    "Mean": "mean",
}
# Modules of the package loaded with numpy imported when first used.
NUMPY_ON_USE = ("mean",)

_whole = threading.RLock()


class NumpyOnUse(ModuleType):
    """Stands for numpy in a module that names it only inside functions: the first
    attribute asked for imports numpy (once) and answers from it."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)


def _import_numpy_on_use(name: str, *args: Any, **kwargs: Any) -> Any:
    if name == "numpy" and "numpy" not in sys.modules:
        return NumpyOnUse()
    return builtins.__import__(name, *args, **kwargs)


def _load(package: ModuleType, leaf: str) -> None:
    name = f"{PACKAGE}.{leaf}"
    if name in sys.modules:
        return
    if leaf not in NUMPY_ON_USE:
        importlib.import_module(name)
        return
    spec = importlib.util.find_spec(name)
    assert spec is not None
    # Its own builtins (exec uses a module's __builtins__ where it has one): its
    # `import numpy` only, and nothing outside the module, sees the stand-in.
    own = {**vars(builtins), "__import__": _import_numpy_on_use}
    setattr(package, leaf, run_spec(spec, {"__builtins__": own}))


def _package() -> ModuleType:
    with _whole:
        present = sys.modules.get(PACKAGE)
        if present is not None:
            return present
        import river

        spec = importlib.util.find_spec(PACKAGE)
        assert spec is not None and spec.loader is not None
        loader = spec.loader
        package = importlib.util.module_from_spec(spec)
        running: list[bool] = []

        def whole_package(name: str) -> Any:
            """A name the models did not load: River's __init__ runs now (once)."""
            with _whole:
                if running:  # asked for by the __init__ itself: not there yet
                    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
                if package.__dict__.get("__getattr__") is whole_package:
                    running.append(True)
                    try:
                        loader.exec_module(package)
                    finally:
                        running.clear()
                    del package.__dict__["__getattr__"]
            return package.__dict__[name] if name in package.__dict__ else getattr(package, name)

        package.__dict__["__getattr__"] = whole_package
        sys.modules[PACKAGE] = package
        river.stats = package  # as an import would set it
        try:
            for leaf in ("base", *dict.fromkeys(LOADED.values())):
                _load(package, leaf)
        except BaseException:
            del sys.modules[PACKAGE]
            del river.stats
            raise
        for attribute, leaf in LOADED.items():
            setattr(package, attribute, getattr(getattr(package, leaf), attribute))
        return package


if TYPE_CHECKING:
    from river import stats
else:
    stats = _package()

__all__ = ["stats"]
