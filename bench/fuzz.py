"""The fuzz targets (tests/fuzz_targets.py) for a long budget: `make soak` runs this.

    .venv/bin/python bench/fuzz.py [--engine atheris|hypothesis] [--codec 1000000]
                                   [--files 100000] [--only NAME] [--jobs 1]
                                   [--logs DIR] [--json FILE] [--max-seconds S]

With atheris (the default; coverage-guided, libFuzzer's engine), each target runs in a
process of its own over raw bytes, seeded with the project's own files (datagrams made
from the sample events, the shipped rules, lists, scenarios and settings), and any
escape is a crash libFuzzer reports with the input that caused it; `--jobs` targets
run at a time (each is one CPU-bound process), and with `--logs` each target's own
output (libFuzzer's, the crash and its input) is kept in DIR/NAME.log (and a crash's
input beside it); `--max-seconds` stops a target after that long, short of its budget
(reported so: it is for a machine too loaded to run the budgets in the time there
is). Each target's own CPU time is printed beside its wall time. With
hypothesis, the targets' own strategies draw structured inputs (slower per input).
Prints each target's executions and escapes as it ends (`--json`: also to a file);
exits 1 when anything escaped or a target fell short of its budget.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

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
        seeds = [p.read_bytes() for p in sorted((ROOT / "data" / "scenarios").rglob("*.yaml"))]
    elif name in ("settings", "notify-channel"):
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        seeds = [block.encode() for block in re.findall(r"```toml\n(.*?)```", readme, re.S)]
    for number, seed in enumerate(seeds):
        (folder / f"seed-{number}").write_bytes(seed)


def _takes_bytes(run: Callable[..., None]) -> bool:
    """Whether a target's input is raw bytes (a file, a datagram) by its annotation."""
    parameters = list(inspect.signature(run).parameters.values())
    return bool(parameters) and parameters[0].annotation in (bytes, "bytes")


def _atheris_child(name: str, runs: int, corpus: str, seconds: int, artifacts: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["engine", "models", "tests"]):
        from tests.fuzz_targets import TARGETS
    target = next(t for t in TARGETS if t.name == name)
    one: Callable[[bytes], object] = target.run
    if not _takes_bytes(target.run):
        # A target of structured values (a form's pairs, an alert's fields): libFuzzer's
        # bytes choose a value of its strategy (hypothesis' hook for outside fuzzers),
        # and an escape is raised as it is.
        from hypothesis import HealthCheck, given, settings

        @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(target.strategy)
        def drawn(value: Any) -> None:
            target.run(value)

        one = drawn.hypothesis.fuzz_one_input  # type: ignore[attr-defined]

    max_len = 2300 if name in BYTE_TARGETS else 4096
    flags = [f"-runs={runs}", f"-max_len={max_len}", "-print_final_stats=1"]
    flags += [f"-max_total_time={seconds}"] if seconds else []
    flags += [f"-artifact_prefix={artifacts}/"] if artifacts else []
    atheris.Setup([sys.argv[0], *flags, corpus], one)
    atheris.Fuzz()


# The targets' own scratch files (an event file, a rules folder per input) on a file
# system in memory where there is one: on this machine's disk, making and deleting a
# small folder took longer than most inputs' reading.
_MEMORY = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class Run(NamedTuple):
    executions: int
    escape: str | None
    seconds: float
    cpu_seconds: float


def run_atheris(name: str, budget: int, logs: Path | None, max_seconds: int) -> Run:
    """One target in a process of its own; libFuzzer's output to logs/NAME.log (and a
    crash's input beside it) when `logs` is given."""
    with (
        tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as corpus,
        tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-", dir=_MEMORY) as scratch,
        tempfile.TemporaryFile() as output,
    ):
        _seeds(name, Path(corpus))
        started = time.perf_counter()
        child = subprocess.Popen(
            [
                *(sys.executable, __file__, "--atheris-child", name, "--runs", str(budget)),
                *("--max-seconds", str(max_seconds), "--artifacts", str(logs or "")),
                corpus,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "TMPDIR": scratch},
        )
        # Its own CPU time (user and system), which a loaded machine does not inflate.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        output.seek(0)
        text = output.read().decode(errors="replace")
    if logs is not None:
        (logs / f"{name}.log").write_text(text)
    found = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    found = found or re.findall(r"Done (\d+) runs", text)
    executions = int(found[-1]) if found else 0
    escape = None
    if child.returncode != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        escape = "\n  ".join(lines[-25:])
    return Run(executions, escape, seconds, usage.ru_utime + usage.ru_stime)


def run_hypothesis(name: str, budget: int, logs: Path | None, max_seconds: int) -> Run:
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

    started, cpu = time.perf_counter(), time.process_time()
    try:
        one()
    except Exception as error:  # an escape: hypothesis re-raised the smallest case
        escape = f"{type(error).__name__}: {error}"
        return Run(executions, escape, time.perf_counter() - started, time.process_time() - cpu)
    return Run(executions, None, time.perf_counter() - started, time.process_time() - cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="atheris")
    parser.add_argument("--codec", type=int, default=1_000_000, help="codec and key reader")
    parser.add_argument("--files", type=int, default=100_000, help="file and YAML targets")
    parser.add_argument("--only", default="", help="one target by name")
    parser.add_argument("--jobs", type=int, default=1, help="atheris targets run at a time")
    parser.add_argument("--logs", default="", help="keep each target's output in DIR/NAME.log")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument(
        "--max-seconds", type=int, default=0, help="stop an atheris target after this long"
    )
    parser.add_argument("--artifacts", default="", help=argparse.SUPPRESS)
    parser.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("corpus", nargs="?", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.atheris_child:
        _atheris_child(args.atheris_child, args.runs, args.corpus, args.max_seconds, args.artifacts)
        return 0
    from tests.fuzz_targets import TARGETS

    logs = Path(args.logs) if args.logs else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    run = run_atheris if args.engine == "atheris" else run_hypothesis
    # Hypothesis runs in this process: one target at a time.
    jobs = max(1, args.jobs) if args.engine == "atheris" else 1
    chosen = [t.name for t in TARGETS if not args.only or t.name == args.only]
    budgets = {name: args.codec if name in BYTE_TARGETS else args.files for name in chosen}
    results: dict[str, dict[str, Any]] = {}
    failed = False
    cap = f", at most {args.max_seconds} s each" if args.max_seconds else ""
    print(f"fuzz ({args.engine}, {jobs} at a time{cap})")
    print(
        f"{'target':16} {'executions':>12} {'escapes':>8} {'seconds':>9} {'cpu s':>7}", flush=True
    )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {
            pool.submit(run, name, budgets[name], logs, args.max_seconds): name for name in chosen
        }
        for future in as_completed(running):
            name = running[future]
            done = future.result()
            # libFuzzer runs exactly its budget unless stopped by --max-seconds;
            # hypothesis may exhaust a small strategy.
            short = args.engine == "atheris" and done.executions < budgets[name]
            failed |= done.escape is not None or short
            results[name] = {
                "executions": done.executions,
                "budget": budgets[name],
                "escapes": int(done.escape is not None),
                "seconds": round(done.seconds),
                "cpu_seconds": round(done.cpu_seconds),
            }
            note = "  (short of its budget)" if short and done.escape is None else ""
            print(
                f"{name:16} {done.executions:12,} {int(done.escape is not None):8} "
                f"{done.seconds:9.0f} {done.cpu_seconds:7.0f}{note}"
            )
            if done.escape is not None:
                print(f"  {done.escape}")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({name: results[name] for name in chosen}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
