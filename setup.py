"""The one compiled helper (engine/_fastio.c); everything else is in pyproject.toml.

Optional: where it cannot be built (no C compiler, not Linux) the receiver uses
its plain-Python path and says so at start.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "engine._fastio",
            ["engine/_fastio.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
