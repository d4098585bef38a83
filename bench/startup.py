"""Start-up of the small commands, two builds against each other: whole processes of
each build's `callsentry` (its `.venv/bin/callsentry`), alternating, `--rounds` runs of
each command, the median (and minimum) of wall and CPU seconds (user + sys of the
process and its children).

    .venv/bin/python bench/startup.py --old /tmp/old [--new .] [--rounds 10]

The commands: a replay of the first 100 rows of data/samples/events.csv into a new
data dir each run, the same replay into a data dir that already holds them (the first
replay untimed), `--help`, `version`, `config check` and `rules validate`. Each
build is a checkout with its own `.venv` (`make setup` there: compiled, as users run
it); each build's modules are byte-compiled first, as `make setup` leaves them.
Figures mean something on a quiet machine only: it prints the load average before
and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from builds import byte_compile, timed_run  # noqa: E402

SAMPLE = ROOT / "data" / "samples" / "events.csv"
REPLAY = ["replay", "{events}", "--data-dir", "{data_dir}"]
COMMANDS: dict[str, list[str]] = {
    "replay 100 rows": REPLAY,
    "the same replay again": REPLAY,
    "--help": ["--help"],
    "version": ["version"],
    "config check": ["config", "check"],
    "rules validate": ["rules", "validate"],
}


def _callsentry(build: Path) -> Path:
    program = build / ".venv" / "bin" / "callsentry"
    if not program.exists():
        raise SystemExit(f"{build} has no .venv/bin/callsentry: run `make setup` there first")
    return program


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", type=Path, required=True, help="the older build's checkout")
    parser.add_argument("--new", type=Path, default=ROOT, help="the newer build (default: here)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--only", action="append", choices=sorted(COMMANDS), help="these commands only"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    builds = {"old": args.old.resolve(), "new": args.new.resolve()}
    for build in builds.values():
        byte_compile(build)
    work = Path(tempfile.mkdtemp(prefix="callsentry-startup-"))
    env = dict(os.environ)
    try:
        events = work / "events.csv"
        with SAMPLE.open(encoding="utf-8") as handle:
            events.write_text("".join(handle.readline() for _ in range(101)), encoding="utf-8")
        print(f"old = {builds['old']}, new = {builds['new']}; load {os.getloadavg()[0]:.2f}")
        for title in args.only or list(COMMANDS):
            walls: dict[str, list[float]] = {"old": [], "new": []}
            cpus: dict[str, list[float]] = {"old": [], "new": []}
            for n in range(args.rounds):
                # Which build goes first alternates: the second of a pair meets a warmer cache.
                order = ["old", "new"] if n % 2 == 0 else ["new", "old"]
                for name in order:
                    data_dir = work / f"{name}-{n}"
                    argv = [str(_callsentry(builds[name]))] + [
                        part.format(events=events, data_dir=data_dir) for part in COMMANDS[title]
                    ]
                    if title == "the same replay again":
                        timed_run(argv, builds[name], env, f"{title} by {name}")
                    wall, cpu = timed_run(argv, builds[name], env, f"{title} by {name}")
                    shutil.rmtree(data_dir, ignore_errors=True)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            line = [f"{title}:"]
            for name in ("old", "new"):
                line.append(
                    f"{name} wall {statistics.median(walls[name]):.3f} ({min(walls[name]):.3f}) "
                    f"CPU {statistics.median(cpus[name]):.3f} ({min(cpus[name]):.3f});"
                )
            print(" ".join(line), flush=True)
        load = os.getloadavg()[0]
        print(f"median (minimum) of {args.rounds} runs each; load {load:.2f} at the end")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
