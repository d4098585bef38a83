"""The fuzz targets (tests/fuzz_targets.py) for a long budget: `make soak` runs this.

    .venv/bin/python bench/fuzz.py [--engine atheris|hypothesis] [--codec 1000000]
                                   [--files 100000] [--only NAME]

With atheris (the default; coverage-guided, libFuzzer's engine), each target runs in a
process of its own over raw bytes, seeded with the project's own files (datagrams made
from the sample events, the shipped rules, lists, scenarios and settings), and any
escape is a crash libFuzzer reports with the input that caused it. With hypothesis,
the targets' own strategies draw structured inputs (slower per input). Prints each
target's executions and escapes; exits 1 when anything escaped.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BYTE_TARGETS = ("codec", "key-reader")


def _seeds(name: str, folder: Path) -> None:
    """A few valid inputs to start from, written into `folder`."""
    events = (ROOT / "data" / "samples" / "events.csv").read_text(encoding="utf-8").splitlines()
    seeds: list[bytes] = []
    if name in BYTE_TARGETS:
        seeds = [",".join(line.split(",")[1:]).encode() for line in events[1:40]]
    elif name == "csv":
        seeds = ["\n".join(events[:30]).encode()]
    elif name == "jsonl":
        header = events[0].split(",")
        rows = [dict(zip(header, line.split(",", 8), strict=False)) for line in events[1:20]]
        import json

        seeds = ["\n".join(json.dumps(row) for row in rows).encode()]
    elif name == "parquet":
        import polars as pl

        buffer = io.BytesIO()
        pl.read_csv(io.StringIO("\n".join(events[:30])), infer_schema=False).write_parquet(buffer)
        seeds = [buffer.getvalue()]
    elif name == "rule-yaml":
        seeds = [path.read_bytes() for path in sorted((ROOT / "rules").glob("*.yaml"))]
    elif name == "list-yaml":
        seeds = [path.read_bytes() for path in sorted((ROOT / "rules" / "lists").glob("*.yaml"))]
    elif name == "scenario-yaml":
        seeds = [path.read_bytes() for path in sorted((ROOT / "data" / "scenarios").glob("*"))]
    elif name in ("settings", "notify-channel"):
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        seeds = [block.encode() for block in re.findall(r"```toml\n(.*?)```", readme, re.S)]
    for number, seed in enumerate(seeds):
        (folder / f"seed-{number}").write_bytes(seed)


def _atheris_child(name: str, runs: int, corpus: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["engine", "models", "tests"]):
        from tests.fuzz_targets import TARGETS
    target = next(t for t in TARGETS if t.name == name)

    def one(data: bytes) -> None:
        target.run(data)

    max_len = 2300 if name in BYTE_TARGETS else 4096
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", "-print_final_stats=1", corpus],
        one,
    )
    atheris.Fuzz()


def run_atheris(name: str, budget: int) -> tuple[int, str | None, float]:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as corpus:
        _seeds(name, Path(corpus))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--atheris-child", name, "--runs", str(budget), corpus],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        seconds = time.perf_counter() - started
    found = re.findall(r"Done (\d+) runs", done.stderr)
    executions = int(found[-1]) if found else 0
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return executions, "\n  ".join(lines[-25:]), seconds
    return executions, None, seconds


def run_hypothesis(name: str, budget: int) -> tuple[int, str | None, float]:
    from hypothesis import HealthCheck, given, settings

    from tests.fuzz_targets import TARGETS

    target = next(t for t in TARGETS if t.name == name)
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="atheris")
    parser.add_argument("--codec", type=int, default=1_000_000, help="codec and key reader")
    parser.add_argument("--files", type=int, default=100_000, help="file and YAML targets")
    parser.add_argument("--only", default="", help="one target by name")
    parser.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("corpus", nargs="?", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.atheris_child:
        _atheris_child(args.atheris_child, args.runs, args.corpus)
        return 0
    from tests.fuzz_targets import TARGETS

    run = run_atheris if args.engine == "atheris" else run_hypothesis
    escapes = 0
    print(f"fuzz ({args.engine})")
    print(f"{'target':16} {'executions':>12} {'escapes':>8} {'seconds':>9}")
    for target in TARGETS:
        if args.only and target.name != args.only:
            continue
        budget = args.codec if target.name in BYTE_TARGETS else args.files
        executions, escape, seconds = run(target.name, budget)
        print(f"{target.name:16} {executions:12,} {int(escape is not None):8} {seconds:9.0f}")
        if escape is not None:
            escapes += 1
            print(f"  {escape}")
        sys.stdout.flush()
    return 1 if escapes else 0


if __name__ == "__main__":
    raise SystemExit(main())
