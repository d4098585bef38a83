"""Long replays (issue 29): whole `callsentry replay` processes, default settings, models on,
over files drawn from a month of traffic (bench/month.yaml: 1.5 million callers).

  (a) events/s replaying the first million reports, start-up included: the median
      of `--rounds` runs, each into a new data dir;
  (b) the peak resident memory of the replay (its process and its detection
      process together, sampled every 0.1 s, and the larger of the two alone) for
      the first 3 million reports, and with `--month` for all of them (about 30
      million): the same population, ten times the reports;
  (c) with `--backtest`, `rules backtest --days 30 --warmup 1d` over the month
      once it is stored (the replay of (b) with `--month`).

The month's file is written once (`callsentry simulate --scenario bench/month.yaml
--to-file bench/out/month --format parquet`, several minutes) and kept for later runs.

    .venv/bin/python bench/stream.py [--rounds 3] [--month] [--backtest]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import children, status  # noqa: E402

OUT = ROOT / "bench" / "out"
MONTH = OUT / "month" / "events.parquet"
MiB = 2**20
GiB = 2**30


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


class TreePeak(threading.Thread):
    """Peak resident memory of a process and its descendants, summed and alone."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.total = 0
        self.single = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            pids = [self.pid, *descendants(self.pid)]
            sizes = [status(pid) for pid in pids]
            self.total = max(self.total, sum(s.get("VmRSS", 0) for s in sizes))
            self.single = max(self.single, *(s.get("VmHWM", 0) for s in sizes))


def run_replay(path: Path, data_dir: Path) -> tuple[float, int, int, str]:
    """(seconds, peak tree RSS, peak single-process RSS, last lines of output)."""
    env = dict(os.environ)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "replay", str(path), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    sampler = TreePeak(process.pid)
    sampler.start()
    output, _ = process.communicate()
    elapsed = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"replay of {path} failed:\n{output[-3000:]}")
    tail = "\n".join(output.strip().splitlines()[:2])
    return elapsed, sampler.total, sampler.single, tail


def month_file() -> Path:
    if not MONTH.exists():
        print("writing the month (bench/month.yaml) once: several minutes", flush=True)
        subprocess.run(
            [sys.executable, "-m", "engine", "simulate", "--scenario", "bench/month.yaml",
             "--to-file", str(MONTH.parent), "--format", "parquet"],
            cwd=ROOT,
            check=True,
        )  # fmt: skip
    return MONTH


def head_file(source: Path, rows: int, target: Path) -> tuple[Path, int, int]:
    """The first `rows` reports of `source`: (file, reports, distinct callers)."""
    if not target.exists():
        frame = pl.scan_parquet(source).head(rows).collect()
        frame.write_parquet(target, row_group_size=100_000)
    counts = pl.scan_parquet(target).select(pl.len(), pl.col("caller").n_unique()).collect()
    return target, int(counts.item(0, 0)), int(counts.item(0, 1))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--month", action="store_true", help="also replay all the month")
    parser.add_argument("--backtest", action="store_true", help="also backtest the month")
    parser.add_argument(
        "--file", type=Path, default=None, help="a month's Parquet file written already"
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    month = args.file if args.file is not None else month_file()
    results: dict[str, object] = {"load_before": load()}
    work = Path(tempfile.mkdtemp(prefix="callsentry-bench-stream-"))
    try:
        million, reports, callers = head_file(month, 1_000_000, work / "month-1m.parquet")
        rates = []
        for run in range(args.rounds):
            elapsed, _, _, _ = run_replay(million, work / f"million-{run}")
            rates.append(reports / elapsed)
            subprocess.run(["rm", "-rf", str(work / f"million-{run}")], check=True)
        results["million"] = {"reports": reports, "callers": callers, "events_per_s": rates}
        print(
            f"(a) replay of {reports:,} reports ({callers:,} callers), start-up included: "
            f"median {statistics.median(rates):,.0f} events/s of {len(rates)} runs "
            f"({', '.join(f'{rate:,.0f}' for rate in rates)})   goal >= 100,000",
            flush=True,
        )
        sizes = [(3_000_000, work / "month-3m.parquet")]
        if args.month:
            sizes.append((10**9, month))
        peaks = {}
        for rows, target in sizes:
            path, reports, callers = head_file(month, rows, target)
            data_dir = work / f"peak-{rows}"
            elapsed, total, single, tail = run_replay(path, data_dir)
            peaks[reports] = total
            results[f"peak_{reports}"] = {
                "reports": reports,
                "callers": callers,
                "seconds": elapsed,
                "tree_peak_bytes": total,
                "largest_process_peak_bytes": single,
                "summary": tail,
            }
            print(
                f"(b) replay of {reports:,} reports ({callers:,} callers): peak "
                f"{total / GiB:.2f} GiB (processes together; the larger alone "
                f"{single / GiB:.2f} GiB) in {elapsed:,.0f} s ({reports / elapsed:,.0f} "
                "events/s)   goal <= 1.5 GiB for 30 million, within 10 % of it for 3 million",
                flush=True,
            )
            if target != month:
                subprocess.run(["rm", "-rf", str(data_dir)], check=True)
        if len(peaks) == 2:
            small, large = sorted(peaks)
            print(f"    3 million's peak is {peaks[small] / peaks[large]:.0%} of the month's")
        else:
            print("    the month's peak: unmeasured in this run (--month)")
        if args.backtest and args.month:
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "engine", "rules", "backtest", "--days", "30",
                 "--warmup", "1d", "--data-dir", str(work / f"peak-{10**9}")],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
            results["backtest_seconds"] = elapsed
            print(
                f"(c) rules backtest --days 30 --warmup 1d: {elapsed / 60:.1f} min "
                f"(exit {done.returncode})   goal <= 15 min"
            )
        else:
            print("(c) backtest of the month: unmeasured in this run (--month --backtest)")
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)
    results["load_after"] = load()
    print(f"load average (1, 5, 15 min) before: {results['load_before']}, after: {load()}")
    (OUT / "stream.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
