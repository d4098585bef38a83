"""The soak: `make soak`. Faults a production engine meets, at length, with the figures.

    .venv/bin/python bench/soak.py [--kills 20] [--loss-duration 40m] [--fuzz/--no-fuzz]
                                   [--codec 1000000] [--files 100000] [--fuzz-jobs 2]
                                   [--fuzz-seconds S]
                                   [--calls 10000000]

1. kill -9 at random moments under steady load, `--kills` times: every answered report
   is stored, none twice (answered lost 0, stored twice 0).
2. 30 % loss each way (the switch stand-in's request and answer loss, whose retries also
   duplicate and reorder what arrives): every report it saw answered stored, none
   twice (answered lost 0, stored twice 0).
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
   Run with `store.max_lake_backlog` at 200,000 rather than its two million: the
   flood then reaches the backlog's hold sooner and leaves a tenth of the lake
   writer's work to drain at the stop and at the last start (the part's time was
   that draining). What the part checks does not depend on the bound's size: the
   receiver's memory (its dedup keys, bounded by `store.max_dedup_keys`, and
   reports pending a commit, by `store.max_pending_reports`; the backlog itself is
   on disk), shedding by not answering (by the pending bound and, sooner here, by
   the backlog's hold), every answered report stored, answers after the flood.
6. Ten million distinct callers and callees (bench/memory.py, one report a call: an
   OK whose Bye never comes, so the call tracker is held at `max_open_calls`): the
   receiver and the lake writer within their bounds, the snapshot's share within
   20 %, the tracker's evictions counted. Default settings but one: the lake
   writer runs at `store.lake_writer_priority = "low"` (nice 10) rather than in the
   idle class, which the fuzz targets share here; its memory does not depend on it,
   its rate (this part's length) does.
7. The fuzz targets for their long budgets (bench/fuzz.py): started in the background
   at the soak's start, beside parts 1-6 (each target is one process; parts 1-4 wait
   mostly on sockets and disks), `--fuzz-jobs` targets at a time, in the idle class
   (SCHED_IDLE: CPU the engine under test does not want), and collected at its end;
   each target's own output is kept in the logs folder the soak names.
   `--fuzz-seconds` stops each target after that long: a target stopped short of its
   budget is reported so and fails the soak (the goal not met).
Prints each part's figures and wall time as it ends, then the goal figures beside the
goals (issue 23) and the total wall time; exits 1 if any part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fuzz import BYTE_TARGETS  # noqa: E402
from tests.test_crash import Load, free_port, start_serve, stored_call_ids  # noqa: E402

T = TypeVar("T")


def _wait(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _finish(data_dir: Path, port: int, env: dict[str, str] | None = None) -> list[str]:
    """Start once more and stop cleanly so the lake holds everything; its events.

    After the overload part the lake writer starts with the backlog its last run left
    (up to `store.max_lake_backlog` reports); it ignores SIGTERM and serve exits only
    once it has stored them."""
    process = start_serve(data_dir, port, env)
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
    """The sample scenario sent by the switch stand-in at 30 % loss each way (its
    retries duplicate and reorder what arrives): every report it saw answered is
    stored, none twice. Reports it gave up on (no answer to any of its seven copies,
    as such loss makes a few) may be stored or not."""
    import asyncio

    from engine.core.durations import parse_duration
    from engine.ingest.codec import Vos3000TextCodec
    from engine.simulator.scenario import generate, load_scenario
    from engine.simulator.switch import SwitchSettings, SwitchStandIn

    spec = load_scenario(ROOT / "data" / "scenarios" / "sample.yaml")
    spec = spec.lasting(parse_duration(duration))
    events = generate(spec).events
    data_dir = work / "loss" / "data"
    data_dir.parent.mkdir(parents=True)
    port = free_port()
    process = start_serve(data_dir, port)
    try:
        switch = SwitchStandIn(
            Vos3000TextCodec(),
            SwitchSettings(port=port, request_loss=0.3, answer_loss=0.3, retry_interval_s=0.2),
        )
        summary = asyncio.run(switch.send(events))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    print("  " + "\n  ".join(summary.lines()))
    # Every report has a serial per state: (call_id, serial) rows, not calls.
    import duckdb

    with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT call_id, serial FROM events").fetchall()
    stored = {(call_id, int(serial)) for call_id, serial in rows}
    answered = {event.key for event in events} - set(summary.given_up_keys)
    return {
        "sent": summary.reports,
        "answered": len(answered),
        "given_up": summary.given_up,
        "stored": len(rows),
        "answered_lost": len(answered - stored),
        "stored_twice": len(rows) - len(stored),
    }


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


# Part 5's lake backlog bound (see the docstring): a tenth of the default.
OVERLOAD_MAX_LAKE_BACKLOG = 200_000


def overload(work: Path, seconds: float = 30.0) -> dict[str, int]:
    import multiprocessing as mp

    from bench.memory import Sampler

    data_dir = work / "overload" / "data"
    data_dir.parent.mkdir(parents=True)
    port = free_port()
    env = {"CALLSENTRY_STORE__MAX_LAKE_BACKLOG": str(OVERLOAD_MAX_LAKE_BACKLOG)}
    process = start_serve(data_dir, port, env)
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
    holds = sum("reports behind (store.max_lake_backlog" in line for line in log.splitlines())
    stored = set(_finish(data_dir, port, env))
    return {
        "offered": offered,
        "answered": len(answered),
        "unanswered": offered - len(answered),
        "backlog_holds": holds,
        "receiver_peak_mib": sampler.peaks["receiver"] >> 20,
        "writer_peak_mib": sampler.peaks["writer"] >> 20,
        "answered_lost": len(answered - stored),
        "answers_after_the_flood": int(recovered),
    }


def _stamp() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Parts:
    """Each part's wall time, and the load average as it ended."""

    def __init__(self) -> None:
        self.minutes: dict[str, float] = {}
        self.loads: dict[str, str] = {}

    def run(self, name: str, part: Callable[[], T]) -> T:
        print(f"{_stamp()} {name} ...", flush=True)
        started = time.monotonic()
        result = part()
        self.minutes[name] = (time.monotonic() - started) / 60
        self.loads[name] = _load()
        print(
            f"{_stamp()} {name} ({self.minutes[name]:.1f} min, load {self.loads[name]}): {result}",
            flush=True,
        )
        return result


def _idle_class() -> None:
    """This process and its children run only on CPU nothing else wants (SCHED_IDLE,
    the lake writer's own class by default), or at nice 19 where there is no such class."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def _start_fuzz(args: argparse.Namespace, logs: Path) -> subprocess.Popen[bytes]:
    """bench/fuzz.py in the background, its summary to logs/fuzz.txt and fuzz.json,
    each target's own output to logs/fuzz/NAME.log; in the idle class, so that the
    engine the other parts run is never slowed by it (see the docstring, 7)."""
    with (logs / "fuzz.txt").open("wb") as out:
        return subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "bench" / "fuzz.py")),
                *("--codec", str(args.codec), "--files", str(args.files)),
                *("--jobs", str(args.fuzz_jobs), "--logs", str(logs / "fuzz")),
                *("--json", str(logs / "fuzz.json")),
                *(("--max-seconds", str(args.fuzz_seconds)) if args.fuzz_seconds else ()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=_idle_class,
        )


def _goals(
    args: argparse.Namespace,
    killed: dict[str, int] | None,
    memory: dict[str, int] | None,
    fuzzed: dict[str, dict[str, int]] | None,
    total_min: float,
    failed: bool,
) -> list[tuple[str, str, str, bool]]:
    """(goal, figure, bound, met) for each of issue 23's goals this soak measures."""
    rows: list[tuple[str, str, str, bool]] = []
    if killed is not None:
        rows.append(
            (
                "kill -9 under load",
                f"{killed['kills']} kills, {killed['answered']:,} answered, "
                f"{killed['answered_lost']} lost, {killed['stored_twice']} twice",
                ">= 20 kills, 0 lost, 0 twice",
                killed["kills"] >= 20
                and not killed["answered_lost"]
                and not killed["stored_twice"],
            )
        )
    if fuzzed is not None:
        for name, got in fuzzed.items():
            goal = 1_000_000 if name in BYTE_TARGETS else 100_000
            rows.append(
                (
                    f"fuzz {name}",
                    f"{got['executions']:,} executions, {got['escapes']} escapes "
                    f"({got['seconds']:,} s, {got['cpu_seconds']:,} s CPU)",
                    f">= {goal:,}, 0 escapes",
                    got["executions"] >= goal and not got["escapes"],
                )
            )
    elif args.fuzz:
        rows.append(("fuzz", "no figures (bench/fuzz.py wrote none)", "", False))
    if memory is not None:
        calls = f"{args.calls:,} callers"
        rows += [
            (
                "distinct callers and callees",
                f"{args.calls:,} calls, one report each",
                ">= 10,000,000",
                args.calls >= 10_000_000,
            ),
            (
                f"{calls}: receiver",
                f"{memory['receiver_peak_mib']:,} MiB",
                "<= 400 MiB",
                memory["receiver_peak_mib"] <= 400,
            ),
            (
                f"{calls}: lake writer",
                f"{memory['writer_peak_mib']:,} MiB ({memory['evicted_calls']:,} calls evicted)",
                "<= 1,536 MiB",
                memory["writer_peak_mib"] <= 1536,
            ),
            (
                f"{calls}: snapshot",
                f"+{memory['snapshot_adds_pct']} % ({memory['snapshot_mib']:,} MiB)",
                "<= +20 %",
                memory["snapshot_adds_pct"] <= 20,
            ),
            (
                f"{calls}: stored",
                f"{memory['stored']:,} of {memory['answered']:,}, {memory['stored_twice']} twice",
                "all, 0 twice",
                memory["stored"] == memory["answered"] and not memory["stored_twice"],
            ),
        ]
    else:
        rows.append(("distinct callers and callees", "no figures (bench/memory.py)", "", False))
    # Within the hour counts only for a soak that did all it should and passed.
    rows.append(
        ("make soak wall time", f"{total_min:.0f} min", "<= 60 min", total_min <= 60 and not failed)
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--loss-duration", default="40m", help="of scenario time (12m at least)")
    parser.add_argument("--fuzz", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--codec", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--fuzz-jobs", type=int, default=2, help="fuzz targets at a time")
    parser.add_argument(
        "--fuzz-seconds",
        type=int,
        default=0,
        help="stop each fuzz target after this long (short of its budget: the goal not met)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--calls", type=int, default=10_000_000, help="of the memory part")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    failed = False
    started, started_at = time.monotonic(), time.time()
    parts = Parts()
    # Kept after the soak: the fuzz targets' output and the memory part's figures.
    logs = Path(tempfile.mkdtemp(prefix="callsentry-soak-logs-"))
    work = Path(tempfile.mkdtemp(prefix="callsentry-soak-"))
    print(f"{_stamp()} soak (seed {seed}), load {_load()}; logs in {logs}", flush=True)
    fuzz = _start_fuzz(args, logs) if args.fuzz else None
    killed: dict[str, int] | None = None
    try:
        killed = parts.run("kill -9 under load", lambda: kills(args.kills, work, rng))
        failed |= killed["answered_lost"] > 0 or killed["stored_twice"] > 0
        lost = parts.run("30 % loss each way", lambda: loss(args.loss_duration, work))
        failed |= lost["answered_lost"] > 0 or lost["stored_twice"] > 0
        disk = parts.run("full file system", lambda: full_disk(work))
        if isinstance(disk, dict):
            failed |= disk["answered_lost"] > 0 or disk["stored_twice"] > 0
            failed |= disk["answered_while_full"] > 0 or not disk["resumed_after_freeing"]
        ro = parts.run("read-only file system", lambda: read_only(work))
        if isinstance(ro, dict):
            failed |= ro["answered_lost"] > 0 or ro["stored_twice"] > 0 or ro["tracebacks"] > 0
            failed |= ro["answered_while_read_only"] > 0
        flood = parts.run("offered load above capacity", lambda: overload(work))
        failed |= flood["answered_lost"] > 0 or not flood["answers_after_the_flood"]
        failed |= flood["receiver_peak_mib"] > 400
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ten_million() -> dict[str, int]:
        # The lake writer at "low" (nice 10) rather than its default idle class, which
        # the fuzz targets share: idle beside them, it would get a third of the spare
        # CPU and the part would be the fuzzers' length (see the docstring, 6).
        done = subprocess.run(
            [
                *(sys.executable, str(ROOT / "bench" / "memory.py")),
                *("--calls", str(args.calls), "--json", str(logs / "memory.json")),
            ],
            env={**os.environ, "CALLSENTRY_STORE__LAKE_WRITER_PRIORITY": "low"},
        )
        return {"bench/memory.py exit status": done.returncode}

    said = parts.run(f"{args.calls:,} distinct callers and callees", ten_million)
    failed |= said["bench/memory.py exit status"] != 0
    memory_file = logs / "memory.json"
    memory = json.loads(memory_file.read_text()) if memory_file.exists() else None
    fuzzed = None
    if fuzz is not None:
        print(f"{_stamp()} waiting for the fuzz targets ...", flush=True)
        fuzz.wait()
        # bench/fuzz.py writes its figures as it ends, often well before the rest.
        fuzz_file = logs / "fuzz.json"
        ended = fuzz_file.stat().st_mtime if fuzz_file.exists() else time.time()
        parts.minutes["fuzz targets (beside the rest)"] = (ended - started_at) / 60
        parts.loads["fuzz targets (beside the rest)"] = _load()
        print(f"{_stamp()} fuzz targets ended:")
        print((logs / "fuzz.txt").read_text(errors="replace"), flush=True)
        failed |= fuzz.returncode != 0
        fuzzed = json.loads(fuzz_file.read_text()) if fuzz_file.exists() else None
    total = (time.monotonic() - started) / 60
    print(f"\n{'part':44} {'minutes':>8}  load at its end")
    for name, minutes in parts.minutes.items():
        print(f"{name:44} {minutes:8.1f}  {parts.loads[name]}")
    print(f"\n{'goal (issue 23)':36} {'figure':56} {'bound':30} met")
    for goal, figure, bound, met in _goals(args, killed, memory, fuzzed, total, failed):
        print(f"{goal:36} {figure:56} {bound:30} {'yes' if met else 'NO'}")
    print(f"\nsoak {'FAILED' if failed else 'passed'} in {total:.1f} min (seed {seed})")
    print(f"load average at the end: {_load()}; logs kept in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
