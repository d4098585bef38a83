"""Two builds of callsentry against each other: whole `callsentry replay` processes of
each, alternating on the same event file, default settings (the shipped rules and
models of each build), the median of `--rounds` runs each.

"No slower than before" goals (issues 22 and 25) are judged this way: this machine's
speed drifts by tens of percent from one minute to the next, so runs of one build
after all of the other's would measure the drift. Each build is a checkout with its
own `.venv` (`make setup` there: compiled as shipped), e.g. an older commit in a git
worktree:

    git worktree add /tmp/old <commit> && (cd /tmp/old && make setup)
    .venv/bin/python bench/builds.py --old /tmp/old [--new .] [--rounds 5]
        [--calls-per-hour 15000] [--hours H] [--scenario data/scenarios/fraud-mix.yaml]

The event file is generated once by the new build's simulator (`--calls-per-hour`
over the scenario's span, or its first `--hours`) and replayed by both, each run into
a new data dir. Prints each run, both medians, and new/old as events/s; CPU seconds
of each process tree (the replay and its detection process) beside the wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.durations import parse_duration  # noqa: E402


def _python(build: Path) -> Path:
    python = build / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{build} has no .venv: run `make setup` there first")
    return python


def byte_compile(build: Path) -> None:
    """The build's modules compiled to bytecode, as `make setup` leaves them: a module
    edited since (its bytecode stale) would otherwise be compiled again at every run
    where PYTHONDONTWRITEBYTECODE is set, and its start-up measured with it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    argv = [str(_python(build)), "-m", "compileall", "-q", "engine", "models"]
    done = subprocess.run(argv, cwd=build, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compiling {build}'s bytecode failed:\n{done.stdout}{done.stderr}")


def _events(
    build: Path, scenario: Path, calls_per_hour: float, hours: float | None, out: Path
) -> int:
    """Writes the scenario's events (CSV) into `out`; returns how many reports."""
    spec = yaml.safe_load(scenario.read_text(encoding="utf-8"))
    spec.setdefault("benign", {})["calls_per_hour"] = calls_per_hour
    if hours is not None:
        # Incidents the shorter span would not reach are left out.
        spec["duration"] = f"{round(hours * 60)}m"
        spec["incidents"] = [
            incident
            for incident in spec.get("incidents", [])
            if parse_duration(incident.get("at", 0)) < hours * 3600
        ]
    overrides = out / "scenario.yaml"
    overrides.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    subprocess.run(
        [str(_python(build)), "-m", "engine", "simulate", "--scenario", str(overrides),
         "--to-file", str(out / "files")],
        cwd=build, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    events = out / "files" / "events.csv"
    with events.open("rb") as handle:
        return sum(1 for _ in handle) - 1


def timed_run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> tuple[float, float]:
    """Run `argv` to its end: (wall seconds, CPU seconds of the process and its
    children); exits naming `what` with the end of its output when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _replay(build: Path, events: Path, data_dir: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children)."""
    env = dict(os.environ)
    argv = [str(_python(build)), "-m", "engine", "replay", str(events), "--data-dir", str(data_dir)]
    return timed_run(argv, build, env, f"replay by {build}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", type=Path, required=True, help="the older build's checkout")
    parser.add_argument("--new", type=Path, default=ROOT, help="the newer build (default: here)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls-per-hour", type=float, default=15_000)
    parser.add_argument("--hours", type=float, default=None, help="default: the scenario's")
    parser.add_argument(
        "--scenario", type=Path, default=ROOT / "data" / "scenarios" / "fraud-mix.yaml"
    )
    args = parser.parse_args()
    if args.rounds < 1 or (args.hours is not None and args.hours <= 0) or args.calls_per_hour <= 0:
        parser.error("--rounds, --hours and --calls-per-hour must be positive")
    old, new = args.old.resolve(), args.new.resolve()
    for build in (old, new):
        byte_compile(build)
    work = Path(tempfile.mkdtemp(prefix="callsentry-builds-"))
    try:
        reports = _events(new, args.scenario.resolve(), args.calls_per_hour, args.hours, work)
        events = work / "files" / "events.csv"
        print(f"{reports:,} reports; old = {old}, new = {new}; load {os.getloadavg()[0]:.1f}")
        rates: dict[str, list[float]] = {"old": [], "new": []}
        cpus: dict[str, list[float]] = {"old": [], "new": []}
        for n in range(args.rounds):
            # Which build goes first alternates too: the second run of a pair meets a
            # warmer page cache.
            order = [("old", old), ("new", new)] if n % 2 == 0 else [("new", new), ("old", old)]
            for name, build in order:
                data_dir = work / f"{name}-{n}"
                wall, cpu = _replay(build, events, data_dir)
                shutil.rmtree(data_dir, ignore_errors=True)
                rates[name].append(reports / wall)
                cpus[name].append(cpu)
                print(f"  round {n + 1} {name}: {reports / wall:,.0f} events/s, "
                      f"{wall:.2f} s wall, {cpu:.2f} CPU-s", flush=True)  # fmt: skip
        old_rate, new_rate = statistics.median(rates["old"]), statistics.median(rates["new"])
        print(
            f"median old {old_rate:,.0f} events/s ({statistics.median(cpus['old']):.2f} CPU-s), "
            f"new {new_rate:,.0f} events/s ({statistics.median(cpus['new']):.2f} CPU-s): "
            f"new/old {new_rate / old_rate:.3f}   goal >= 1.0 (no slower); "
            f"load {os.getloadavg()[0]:.1f} at the end"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
