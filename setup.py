"""The compiled parts; everything else is in pyproject.toml.

- engine/ingest/_fastio.c: the receiver's batched socket and journal calls (Linux).
- engine/ingest/_seen.c: the dedup keys of stored reports as a compact fingerprint set.
- engine/ingest/_rows.c: event files' rows made as tuples from their columns.
- the detection's hot path and the caller model's per-caller state
  (engine.detect.COMPILED), compiled by mypyc from the same Python source when mypyc
  is installed in the environment that builds (`make setup` installs once, then
  builds again without isolation, with the venv's mypy).

All are optional: without a C compiler, off Linux, or without mypyc, the engine runs
the same code as Python (slower) and says so, here at the build and in `serve`'s
start-up log. The build also puts the project's `rules/` into the package as its
shipped rules (engine/shipped_rules). Records of the compiled sources'
SHA-256 let engine/detect/__init__.py and engine/ingest/native.py refuse compiled code
its source has outgrown.
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# As engine/detect/__init__.py: the sources, from the project's root.
COMPILED = (
    "engine/detect/windows.py",
    "engine/detect/calls.py",
    "engine/detect/fields.py",
    "engine/detect/aggregates.py",
    "engine/detect/evaluate.py",
    "engine/detect/pipeline.py",
    "engine/detect/conduct.py",
    "models/caller_state.py",
    "models/menu_traffic.py",
)
RECORD = "engine/detect/_compiled.sha256"
# The shipped rules go into the package (engine.apps.settings.shipped_rules finds them):
# an installed engine started from any folder runs them without a setting.
SHIPPED_RULES = "engine/shipped_rules"
HELPERS_RECORD = "_c_helpers.sha256"  # as engine/ingest/native.py
_MYPYC: list[list[Extension]] = []
_DIGESTS: dict[str, str] = {}


class BuildWithDetection(build_ext):
    def finalize_options(self) -> None:
        # Here, not in setup(): mypyc type-checks and writes C when asked, which takes a
        # minute, and only a build needs it (not the metadata steps of an install).
        self.detection = self.detection_extensions()
        self.distribution.ext_modules = [*(self.distribution.ext_modules or []), *self.detection]
        super().finalize_options()

    def run(self) -> None:
        # A module that fails to build (optional) must not leave last build's file to be
        # taken for this one's; every module is built from its source as it is now.
        for extension in self.extensions:
            Path(self.get_ext_fullpath(extension.name)).unlink(missing_ok=True)
        helpers = {
            extension.name: hashlib.sha256(Path(extension.sources[0]).read_bytes()).hexdigest()
            for extension in self.extensions
            if extension not in self.detection
        }
        super().run()
        self.record(bool(self.detection))
        self.record_helpers(helpers)
        missing = [
            e.name for e in self.extensions if not Path(self.get_ext_fullpath(e.name)).exists()
        ]
        if not self.detection:
            missing.insert(0, "detection (mypyc)")
        if missing:
            # Said here, where a build log shows it, and again in serve's start-up log.
            print(
                "callsentry builds without some compiled parts, which run as Python "
                f"(slower): {', '.join(missing)}",
                file=sys.stderr,
            )

    def detection_extensions(self) -> list[Extension]:
        # An editable install makes build_ext more than once: mypyc runs once.
        if not _MYPYC:
            _MYPYC.append(self.mypycify())
        return _MYPYC[0]

    def mypycify(self) -> list[Extension]:
        if os.environ.get("CALLSENTRY_COMPILE", "1") == "0":
            print(
                "CALLSENTRY_COMPILE=0: detection is not compiled, it runs as Python",
                file=sys.stderr,
            )
            return []
        try:
            from mypyc.build import mypycify
        except ImportError:
            print("mypyc is not installed here: detection runs as Python", file=sys.stderr)
            return []
        # The sources as mypyc reads them (an edit during the build must not be
        # recorded as compiled).
        for source in COMPILED:
            _DIGESTS[source] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        extensions: list[Extension] = mypycify(
            list(COMPILED),
            opt_level="3",
            group_name="engine.detect._native",
        )
        for extension in extensions:
            # Like _fastio: no compiler here means Python, not a failed install.
            extension.optional = True
        return extensions

    def record(self, compiled: bool) -> None:
        """Write which sources were compiled, only when every module was built; otherwise
        remove the record (compiled files of an earlier build are then not used)."""
        # The record's place from the build's root, as a module's compiled file's is.
        root = Path(self.get_ext_fullpath("engine.detect.windows")).parent.parent.parent
        target = root / RECORD
        built = compiled and all(
            Path(self.get_ext_fullpath(module_name(source))).exists() for source in COMPILED
        )
        if not built:
            target.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            "".join(f"{digest}  {source}\n" for source, digest in _DIGESTS.items()),
            encoding="ascii",
        )

    def record_helpers(self, digests: dict[str, str]) -> None:
        """Write the digest of each C helper's source (taken before its build began) for
        the helpers that were built; one that failed has no line, so no build is used."""
        lines = [
            f"{digest}  {name.rpartition('.')[2]}.c\n"
            for name, digest in digests.items()
            if Path(self.get_ext_fullpath(name)).exists()
        ]
        target = Path(self.get_ext_fullpath("engine.ingest._seen")).parent / HELPERS_RECORD
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines), encoding="ascii")


class BuildWithRules(build_py):
    """The package's Python files, and the project's `rules/` folder as its shipped rules."""

    def run(self) -> None:
        super().run()
        source = Path("rules")
        if not source.is_dir():
            raise SystemExit("setup.py: rules/ is missing: the package ships it")
        target = Path(self.build_lib) / SHIPPED_RULES
        if target.exists():
            shutil.rmtree(target)
        # YAML and READMEs only: no editor backups or caches in the package.
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix in (".yaml", ".yml", ".md"):
                copy = target / path.relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        target = Path(self.build_lib) / SHIPPED_RULES
        copied = [str(p) for p in target.rglob("*") if p.is_file()] if target.exists() else []
        return [*super().get_outputs(include_bytecode), *copied]


def module_name(source: str) -> str:
    return source.removesuffix(".py").replace("/", ".")


def c_helper(name: str) -> Extension:
    # Optional: no compiler means the engine's Python equivalent, not a failed install.
    return Extension(
        f"engine.ingest.{name}",
        [f"engine/ingest/{name}.c"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        optional=True,
    )


# The dedup keys' compact set and the row maker are portable C; the receiver's system
# calls are Linux's.
extensions = [c_helper("_seen"), c_helper("_rows")]
if sys.platform.startswith("linux"):
    extensions.append(c_helper("_fastio"))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildWithDetection, "build_py": BuildWithRules},
)
