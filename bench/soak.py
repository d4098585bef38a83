"""The soak: `make soak`. Faults a production engine meets, at length, with the figures.

    .venv/bin/python bench/soak.py [--kills 20] [--loss-duration 40m] [--fuzz/--no-fuzz]
                                   [--codec 1000000] [--files 100000]

1. kill -9 at random moments under steady load, `--kills` times: every answered report
   is stored, none twice (answered lost 0, stored twice 0).
2. 30 % loss each way (the simulator's --request-loss/--answer-loss, whose retries also
   duplicate and reorder what arrives): every answered report stored exactly once.
3. A real small file system (tmpfs, as root) filled and freed under load: answers stop
   while it cannot store, nothing answered is lost, and the engine resumes by itself.
   Skipped, and said so, without root.
4. A real file system made read-only under load (ext4 on a loop device, as root, its
   error behaviour remount-ro, an error triggered through sysfs: the kernel's own
   emergency read-only, the one way a file system goes read-only while the engine
   holds its journal open for writing). Answers stop and say so; the file system is
   then repaired (e2fsck) and mounted again, the engine started on it, and every
   answered report must be stored. (Such a file system cannot be made writable
   again under a running process, so "resumes" here is a restart.)
5. Offered load well above capacity (four senders, no window, no retries): the
   receiver's memory stays bounded, it sheds what it cannot store by not answering,
   every answered report is stored, and it answers normally once the flood stops.
6. Ten million distinct callers and callees (bench/memory.py): the receiver and the
   lake writer within their bounds, the snapshot's share within 20 %.
7. The fuzz targets for their long budgets (bench/fuzz.py).
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
    """Start once more and stop cleanly so the lake holds everything; its events.

    After the overload part the lake writer starts with the backlog its last run left
    (about two million reports); it ignores SIGTERM and serve exits only once it has
    stored them, which took more than 300 s on a loaded machine."""
    process = start_serve(data_dir, port)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=1800)
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


def _mount_ext4(work: Path, name: str, size_mb: int) -> tuple[Path, Path] | str:
    """An ext4 file system on a loop device that an error makes read-only; (mount
    point, image), or why not."""
    if os.geteuid() != 0:
        return "skipped: mounting a file system needs root"
    image, mount = work / f"{name}.img", work / name
    mount.mkdir()
    with image.open("wb") as out:
        out.truncate(size_mb << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    if made.returncode != 0:
        return f"skipped: mkfs.ext4 failed ({made.stderr.decode().strip()})"
    done = subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)], capture_output=True
    )
    if done.returncode != 0:
        return f"skipped: this machine does not let a loop device be mounted ({done.stderr!r})"
    return mount, image


def read_only(work: Path) -> dict[str, int] | str:
    mounted = _mount_ext4(work, "ext4", 256)
    if isinstance(mounted, str):
        return mounted
    mount, image = mounted
    try:
        device = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(mount)], capture_output=True, text=True
        ).stdout.strip()
        # The mount is the data dir: the engine's log goes beside it, off the file system.
        data_dir = mount
        port = free_port()
        env = {"CALLSENTRY_STORE__PREALLOCATE_JOURNAL": "false"}
        process = start_serve(data_dir, port, env)
        load = Load(port, "ro")
        load.start()
        _wait(load.has_answered(2000), 60)
        # The kernel's emergency read-only: what a disk error does to the mount.
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("1")
        time.sleep(2)
        stalled_from = len(load.answered)
        time.sleep(3)
        answered_while_read_only = len(load.answered) - stalled_from
        load.stop()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log = (data_dir.parent / "serve.log").read_text(errors="replace")
        said = sum("Read-only file system" in line for line in log.splitlines())
        traceback = log.count("Traceback")
        # Until the lake writer, the receiver's child, has let its files go too.
        _wait(
            lambda: subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0,
            60,
        )
        subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        stored = _finish(data_dir, port)
        return {
            "answered": len(load.answered),
            "answered_while_read_only": answered_while_read_only,
            "log_lines_saying_read_only": said,
            "tracebacks": traceback,
            "answered_lost": len(load.answered - set(stored)),
            "stored_twice": len(stored) - len(set(stored)),
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _blast(port: int, prefix: str, seconds: float, answers: str) -> None:
    """Distinct reports as fast as the socket takes them, no window, no retries; the
    call ids answered go to the file `answers`."""
    import select
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    answered: set[bytes] = set()
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sock.send(b"%s-%d,1,OK,86%011d,,,7,menu" % (prefix.encode(), sent, sent))
            sent += 1
        if select.select([sock], [], [], 0)[0]:
            while True:
                try:
                    answered.add(sock.recv(200).rsplit(b",", 1)[0])
                except (BlockingIOError, ConnectionRefusedError):
                    break
    end = time.monotonic() + 3.0  # the last answers
    while time.monotonic() < end:
        if select.select([sock], [], [], 0.1)[0]:
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                answered.add(sock.recv(200).rsplit(b",", 1)[0])
    Path(answers).write_bytes(b"\n".join([b"sent %d" % sent, *answered]))


def overload(work: Path, seconds: float = 30.0) -> dict[str, int]:
    import multiprocessing as mp

    from bench.memory import Sampler

    data_dir = work / "overload" / "data"
    data_dir.parent.mkdir(parents=True)
    port = free_port()
    process = start_serve(data_dir, port)
    sampler = Sampler(process.pid)
    sampler.start()
    files = [str(data_dir.parent / f"answers-{n}") for n in range(4)]
    senders = [mp.Process(target=_blast, args=(port, f"o{n}", seconds, files[n])) for n in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    lines = [Path(f).read_bytes().split(b"\n") for f in files]
    offered = sum(int(first.split()[1]) for first, *_ in lines)
    answered = {a.decode() for _, *rest in lines for a in rest if a}
    # Then ordinary traffic: answered as usual once the flood has passed.
    after = Load(port, "after")
    after.start()
    recovered = _wait(after.has_answered(2000), 120)
    after.stop()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=600)
    sampler.stop.set()
    sampler.join()
    log = (data_dir.parent / "serve.log").read_text(errors="replace")
    dropped = 0
    for line in log.splitlines():
        if "stopped:" in line and "dropped_overload=" in line:
            dropped = int(line.split("dropped_overload=")[1].split()[0])
    stored = set(_finish(data_dir, port))
    return {
        "offered": offered,
        "answered": len(answered),
        "dropped_overload": dropped,
        "receiver_peak_mib": sampler.peaks["receiver"] >> 20,
        "writer_peak_mib": sampler.peaks["writer"] >> 20,
        "answered_lost": len(answered - stored),
        "answers_after_the_flood": int(recovered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--loss-duration", default="40m", help="of scenario time (12m at least)")
    parser.add_argument("--fuzz", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--codec", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--calls", type=int, default=10_000_000, help="of the memory part")
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
        ro = read_only(work)
        print(f"read-only file system: {ro}")
        if isinstance(ro, dict):
            failed |= ro["answered_lost"] > 0 or ro["stored_twice"] > 0 or ro["tracebacks"] > 0
            failed |= ro["answered_while_read_only"] > 0
        flood = overload(work)
        print(f"offered load above capacity: {flood}")
        failed |= flood["answered_lost"] > 0 or not flood["answers_after_the_flood"]
        failed |= flood["receiver_peak_mib"] > 400
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.calls:,} distinct callers and callees (bench/memory.py):", flush=True)
    memory = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--calls", str(args.calls)]
    )
    failed |= memory.returncode != 0
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
    print(f"load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
