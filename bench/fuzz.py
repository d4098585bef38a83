"""The fuzz targets (tests/fuzz_targets.py) for a long budget: `make soak` runs this.

    .venv/bin/python bench/fuzz.py [--codec 1000000] [--files 100000] [--only NAME]

Prints each target's executions and escapes; exits 1 when anything escaped (the
failing input is printed by hypothesis, smallest first).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.fuzz_targets import TARGETS, Target  # noqa: E402


def run(target: Target, budget: int) -> tuple[int, str | None, float]:
    executions = 0

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def one(value: Any) -> None:
        nonlocal executions
        executions += 1
        target.run(value)

    started = time.perf_counter()
    try:
        one()
    except Exception as error:  # an escape: hypothesis re-raised the smallest case
        return executions, f"{type(error).__name__}: {error}", time.perf_counter() - started
    return executions, None, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", type=int, default=1_000_000, help="codec and key reader")
    parser.add_argument("--files", type=int, default=100_000, help="file and YAML targets")
    parser.add_argument("--only", default="", help="one target by name")
    args = parser.parse_args()
    escapes = 0
    print(f"{'target':16} {'executions':>12} {'escapes':>8} {'seconds':>9}")
    for target in TARGETS:
        if args.only and target.name != args.only:
            continue
        budget = args.codec if target.name in ("codec", "key-reader") else args.files
        executions, escape, seconds = run(target, budget)
        print(f"{target.name:16} {executions:12,} {int(escape is not None):8} {seconds:9.0f}")
        if escape is not None:
            escapes += 1
            print(f"  {escape}")
        sys.stdout.flush()
    return 1 if escapes else 0


if __name__ == "__main__":
    raise SystemExit(main())
