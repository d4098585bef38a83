"""The soak: `make soak`. Faults a production engine meets, at length, with the figures.

    .venv/bin/python bench/soak.py [--kills 20] [--loss-duration 40m] [--fuzz/--no-fuzz]
                                   [--codec 1000000] [--files 100000]

1. kill -9 at random moments under steady load, `--kills` times: every answered report
   is stored, none twice (answered lost 0, stored twice 0).
2. 30 % loss each way (the simulator's --request-loss/--answer-loss, whose retries also
   duplicate and reorder what arrives): every answered report stored exactly once.
3. A real small file system (tmpfs, as root) filled and freed under load: answers stop
   while it cannot store, nothing answered is lost, and the engine resumes by itself.
   Skipped, and said so, without root. (A file system cannot be remounted read-only
   while the engine holds its journal open for writing, so read-only is not soaked.)
4. The fuzz targets for their long budgets (bench/fuzz.py).
Prints each part's figures and a summary; exits 1 if any part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_crash import Load, free_port, start_serve, stored_call_ids  # noqa: E402


def _wait(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _finish(data_dir: Path, port: int) -> list[str]:
    """Start once more and stop cleanly so the lake holds everything; its events."""
    process = start_serve(data_dir, port)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    return stored_call_ids(data_dir)


def kills(rounds: int, work: Path, rng: random.Random) -> dict[str, int]:
    data_dir = work / "kills" / "data"
    data_dir.parent.mkdir(parents=True)
    port = free_port()
    answered: set[str] = set()
    for number in range(rounds):
        process = start_serve(data_dir, port)
        load = Load(port, f"k{number}")
        load.start()
        # A random moment: after some answers, at a random fraction of a second more.
        _wait(load.has_answered(rng.randint(50, 4000)), 60)
        time.sleep(rng.random() * 0.5)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        load.stop()
        answered |= load.answered
    stored = _finish(data_dir, port)
    return {
        "kills": rounds,
        "answered": len(answered),
        "answered_lost": len(answered - set(stored)),
        "stored_twice": len(stored) - len(set(stored)),
    }


def loss(duration: str, work: Path) -> dict[str, int]:
    data_dir = work / "loss" / "data"
    data_dir.parent.mkdir(parents=True)
    port = free_port()
    process = start_serve(data_dir, port)
    try:
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "engine",
                "simulate",
                "--scenario",
                str(ROOT / "data" / "scenarios" / "sample.yaml"),
                "--duration",
                duration,
                "--send",
                "--port",
                str(port),
                "--request-loss",
                "0.3",
                "--answer-loss",
                "0.3",
                "--retry-interval",
                "0.2",
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    stored = stored_call_ids(data_dir)
    print("  " + "\n  ".join((sent.stdout + sent.stderr).strip().splitlines()[-6:]))
    # Every report has a serial per state: count (call_id, serial) rows, not calls.
    import duckdb

    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        row = con.execute(
            "SELECT count(*), count(DISTINCT (call_id, serial)) FROM events"
        ).fetchone()
    rows, distinct = row if row is not None else (0, 0)
    return {"stored": rows, "stored_twice": rows - distinct, "calls": len(set(stored))}


def full_disk(work: Path) -> dict[str, int] | str:
    if os.geteuid() != 0:
        return "skipped: mounting a file system needs root"
    mount = work / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)])
    if done.returncode != 0:
        return "skipped: this machine does not let a tmpfs be mounted"
    try:
        data_dir = mount / "data"
        port = free_port()
        env = {"CALLSENTRY_STORE__PREALLOCATE_JOURNAL": "false"}
        process = start_serve(data_dir, port, env)
        load = Load(port, "disk")
        load.start()
        _wait(load.has_answered(2000), 60)
        # Fill what is left; answers must stop, then come back once space is freed.
        filler = mount / "filler"
        with filler.open("wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        time.sleep(3)
        stalled_from = len(load.answered)
        time.sleep(3)
        answered_while_full = len(load.answered) - stalled_from
        filler.unlink()
        resumed = _wait(load.has_answered(len(load.answered) + 2000), 60)
        load.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
        stored = _finish(data_dir, port)
        return {
            "answered": len(load.answered),
            "answered_while_full": answered_while_full,
            "resumed_after_freeing": int(resumed),
            "answered_lost": len(load.answered - set(stored)),
            "stored_twice": len(stored) - len(set(stored)),
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--loss-duration", default="40m", help="of scenario time (12m at least)")
    parser.add_argument("--fuzz", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--codec", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    failed = False
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="callsentry-soak-"))
    try:
        print(f"soak (seed {seed})")
        result = kills(args.kills, work, rng)
        print(f"kill -9 under load: {result}")
        failed |= result["answered_lost"] > 0 or result["stored_twice"] > 0
        result = loss(args.loss_duration, work)
        print(f"30 % loss each way: {result}")
        failed |= result["stored_twice"] > 0
        disk = full_disk(work)
        print(f"full file system: {disk}")
        if isinstance(disk, dict):
            failed |= disk["answered_lost"] > 0 or disk["stored_twice"] > 0
            failed |= disk["answered_while_full"] > 0 or not disk["resumed_after_freeing"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.fuzz:
        fuzz = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "fuzz.py"),
                "--codec",
                str(args.codec),
                "--files",
                str(args.files),
            ]
        )
        failed |= fuzz.returncode != 0
    print(f"soak {'FAILED' if failed else 'passed'} in {(time.monotonic() - started) / 60:.0f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
