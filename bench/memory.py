"""Memory under many distinct callers: `serve` with default settings, flooded with calls
whose callers and callees are all different, until `--calls`.

    .venv/bin/python bench/memory.py [--calls 10000000] [--window 2000] [--bye]

Each call is one report, an OK whose Bye never comes: every call stays in progress
until `detection.max_open_calls` (200,000 by default) is reached, and from then on the call
tracker holds that many and finishes the oldest early (counted as evicted). So the
flood holds the tracker at its bound whatever its rate, with as many distinct
callers and callees as calls, for half the reports (and half the lake writer's work)
of an OK and a Bye per call. `--bye` sends the Bye too (two reports a call, each
call finished `settle_s` after it: the tracker then holds only the last seconds'
calls).

The receiver (serve's main process) and the lake writer are sampled every 0.1 s
(VmRSS, and VmHWM: the kernel's own peak). Printed at the end:
- the receiver's peak;
- the lake writer's peak while it took the flood, and its peak with the final
  snapshot written at shutdown (periodic snapshots are off here so that the one
  taken at the end is the only one), and that snapshot's size;
- the evictions detection counted (rule state, calls in progress, model callers);
- answered, and stored (from the lake: every answered report must be there once).
The bounds to hold (README, "Memory"): receiver <= 400 MiB, lake writer <= 1.5 GiB,
the snapshot adding at most 20 % to the lake writer's peak.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as text:
            lines = text.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as text:
            return [int(child) for child in text.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Peaks of the receiver and of its lake writer child, sampled every 0.1 s."""

    def __init__(self, receiver: int) -> None:
        super().__init__(daemon=True)
        self.receiver = receiver
        self.writer = 0
        self.peaks = {"receiver": 0, "writer": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        if not self.writer or not status(self.writer):
            # The lake writer is the receiver's child running Python (the resource
            # tracker of multiprocessing is another child, and small).
            found = [c for c in children(self.receiver) if status(c).get("VmHWM", 0) > 100 * MiB]
            self.writer = found[0] if found else self.writer
        for name, pid in (("receiver", self.receiver), ("writer", self.writer)):
            if pid:
                peak = status(pid).get("VmHWM", 0)
                self.peaks[name] = max(self.peaks[name], peak)


def flood(port: int, calls: int, window: int, bye: bool, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Each call an OK (then a Bye with `bye`), from its own caller to its own callee,
    keeping at most `window` reports unanswered; a report unanswered for 3 s is sent
    again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    outstanding: dict[bytes, tuple[float, bytes]] = {}
    per_call = 2 if bye else 1
    total = per_call * calls
    sent = answered = resent = 0
    started = time.monotonic()
    last_progress = started

    def report(n: int) -> tuple[bytes, bytes]:
        call, second = divmod(n, per_call)
        key = f"mem{call:x}@10.0.0.5,{second + 1}".encode()
        state = b"Bye" if second else b"OK"
        body = b"%s,%s,86%011d,44%011d,,12,Main menu" % (key, state, call, call)
        return key, body

    while answered < total:
        now = time.monotonic()
        while sent < total and len(outstanding) < window:
            key, body = report(sent)
            try:
                sock.send(body)
            except BlockingIOError:
                break
            outstanding[key] = (now, body)
            sent += 1
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            while True:
                try:
                    data = sock.recv(256)
                except BlockingIOError:
                    break
                if outstanding.pop(data, None) is not None:
                    answered += 1
        if now - last_progress > 2.0:
            last_progress = now
            for key, (at, body) in list(outstanding.items()):
                if now - at > 3.0:
                    outstanding[key] = (now, body)
                    resent += 1
                    try:
                        sock.send(body)
                    except BlockingIOError:
                        break
    out.put({"answered": answered, "resent": resent, "seconds": time.monotonic() - started})


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            for line in page.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000_000)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--bye", action="store_true", help="an OK and a Bye a call")
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="callsentry-memory-"))
    data_dir = work / "data"
    port, metrics_port = free_port(), free_port()
    log_path = work / "serve.log"
    env = {
        **os.environ,
        # The one snapshot is the one taken at shutdown (see the docstring).
        "CALLSENTRY_DETECTION__SNAPSHOT_INTERVAL_S": "0",
        "CALLSENTRY_METRICS__LISTEN": f"127.0.0.1:{metrics_port}",
    }
    with log_path.open("wb") as log:
        serve = subprocess.Popen(
            [
                *(sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{port}"),
                *("--data-dir", str(data_dir), "--log-level", "info"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while "lake writer running" not in log_path.read_text():
            if serve.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text())
                return 1
            time.sleep(0.1)
        sampler = Sampler(serve.pid)
        sampler.start()
        queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        sender = mp.Process(target=flood, args=(port, args.calls, args.window, args.bye, queue))
        sender.start()
        sent = queue.get()
        sender.join()
        print(
            f"flood: {sent['answered']:,} reports answered in {sent['seconds']:.0f} s "
            f"({sent['answered'] / sent['seconds']:,.0f}/s), {sent['resent']:,} sent again"
        )
        # The lake writer catches up before its peak without a snapshot is read.
        while metric(metrics_port, "callsentry_lake_backlog_reports") not in (0, None):
            time.sleep(0.5)
        # Calls finish `settle_s` of event time after their Bye (the ticks bring it).
        time.sleep(10.0)
        sampler.sample()
        evicted = {
            name: int(metric(metrics_port, f"callsentry_evicted_{name}_total") or 0)
            for name in ("calls", "keys")
        }
        print(
            f"evicted: {evicted['calls']:,} calls in progress (max_open_calls), "
            f"{evicted['keys']:,} rule entities (max_keys_per_rule)"
        )
        flood_peaks = dict(sampler.peaks)
        # From here the lake writer's own peak is the snapshot's: the kernel's
        # high-water mark is reset (clear_refs 5), and its resident size now noted.
        writer = sampler.writer
        before = status(writer).get("VmRSS", 0)
        with open(f"/proc/{writer}/clear_refs", "w") as clear:
            clear.write("5")
        sampler.peaks["writer"] = 0
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=1800)
        sampler.stop.set()
        sampler.join()
        during = sampler.peaks["writer"]
        snapshot = data_dir / "state" / "detection.snapshot"
        size = snapshot.stat().st_size if snapshot.exists() else 0
        receiver_peak = max(flood_peaks["receiver"], sampler.peaks["receiver"])
        print(f"receiver peak: {receiver_peak / MiB:,.0f} MiB")
        peak = max(flood_peaks["writer"], during)
        print(
            f"lake writer: peak {flood_peaks['writer'] / MiB:,.0f} MiB taking the flood; "
            f"{before / MiB:,.0f} MiB before the final snapshot, {during / MiB:,.0f} MiB at "
            f"most while it was written ({size / MiB:,.0f} MiB): the snapshot adds "
            f"{100 * (peak / max(flood_peaks['writer'], 1) - 1):.0f} % to the peak, and "
            f"{100 * (during / max(before, 1) - 1):.0f} % to what the writer held"
        )
        for line in log_path.read_text().splitlines():
            if "evict" in line or "Traceback" in line or "ERROR" in line:
                print("  " + line)
        import duckdb

        with duckdb.connect(str(data_dir / "callsentry.duckdb"), read_only=True) as con:
            row = con.execute(
                "SELECT count(*), count(DISTINCT (call_id, serial)) FROM events"
            ).fetchone()
        stored, distinct = row if row is not None else (0, 0)
        print(f"stored: {stored:,} ({stored - distinct:,} twice); answered {sent['answered']:,}")
        within = (
            receiver_peak <= 400 * MiB
            and peak <= 1536 * MiB
            and peak <= 1.2 * max(flood_peaks["writer"], 1)
        )
        print(f"bounds (400 MiB, 1.5 GiB, snapshot 20 %): {'held' if within else 'NOT held'}")
        # Past `max_open_calls` calls without a Bye the tracker must have hit its bound.
        from engine.apps.settings import DetectionSettings

        bound = DetectionSettings().max_open_calls
        exercised = args.bye or args.calls <= bound or evicted["calls"] > 0
        if not exercised:
            print("the call tracker's bound was never reached: 0 calls evicted")
        if args.json:
            figures = {
                "answered": sent["answered"],
                "seconds": round(sent["seconds"]),
                "stored": stored,
                "stored_twice": stored - distinct,
                "receiver_peak_mib": receiver_peak // MiB,
                "writer_peak_mib": peak // MiB,
                "writer_flood_peak_mib": flood_peaks["writer"] // MiB,
                "snapshot_adds_pct": round(100 * (peak / max(flood_peaks["writer"], 1) - 1)),
                "snapshot_mib": size // MiB,
                "evicted_calls": evicted["calls"],
                "evicted_keys": evicted["keys"],
            }
            Path(args.json).write_text(json.dumps(figures))
        return 0 if stored == distinct == sent["answered"] and within and exercised else 1
    finally:
        if serve.poll() is None:
            serve.kill()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
