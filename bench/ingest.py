"""Ingest benchmark: `callsentry serve` against a bare uvloop echo, under the same load.

(a) baseline: a uvloop UDP server that answers `call_id,serial` and stores nothing;
(b) callsentry serve with its durable store (journal fsync per group commit, lake flush).
With `--relay`: (a) serve, (b) serve relaying every report to three UDP consumers and
publishing it to NATS JetStream (a nats-server from the dev extra, on loopback).

The load generator runs in its own process: distinct reports, a window of
outstanding ones, at full speed and at paced rates. It reports answered
reports/s and answer latency; the figure that matters is the ratio b/a. While
the echo runs paced, a probe measures the data dir's disk alone (8 KiB
fdatasync'd every 2 ms, as the journal does): no durable answer can be faster
than it, so a slow p99 with a slow disk beside it is the disk's.

    .venv/bin/python bench/ingest.py [--reports 200000] [--rounds 5] [--window 1000]
    .venv/bin/python bench/ingest.py --relay [--paced 5000]
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


ECHO = """
import asyncio, socket, sys, uvloop
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        call_id, serial, _ = data.split(b",", 2)
        self.transport.sendto(call_id + b"," + serial, addr)
async def main(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", port))
    await asyncio.get_running_loop().create_datagram_endpoint(Echo, sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main(int(sys.argv[1])))
"""


def start_echo(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    process.stdout.readline()
    return process


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_engine(
    port: int, data_dir: Path, extra: Sequence[str] = (), log_name: str = "engine.log"
) -> subprocess.Popen[bytes]:
    log_path = data_dir.parent / log_name
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(data_dir),
                "--metrics",
                "127.0.0.1:0",
                "--log-level",
                "info",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    # Load starts once the engine is whole: the lake writer's start (imports,
    # rules, models) takes seconds of CPU that are not ingest.
    deadline = time.monotonic() + 60
    while "lake writer running" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(log_path.read_text())
        time.sleep(0.05)
    return process


def load(
    port: int,
    reports: int,
    window: int,
    rate: float,
    prefix: str,
    out: mp.Queue,  # type: ignore[type-arg]
    keep_times: bool = False,
) -> None:
    """Send `reports` distinct reports keeping at most `window` unanswered; pace at `rate`/s.
    `keep_times`: say when each report was first sent (by call_id), for the relay's lag."""
    payloads = [
        f"{prefix}-{n}@10.0.0.5,1,OK,8613800000001,4420719460000,,12,Main menu".encode()
        for n in range(reports)
    ]
    expected = [p.split(b",", 2) for p in payloads]
    answers = [a + b"," + b for a, b, _ in expected]
    sent_at: dict[bytes, float] = {}
    first_sent: dict[bytes, float] = {}
    latencies: list[float] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    sent = 0
    clock = time.perf_counter
    start = clock()
    last_answer = start
    while sent < reports or sent_at:
        now = clock()
        room = window - len(sent_at)
        if rate > 0:
            room = min(room, int((now - start) * rate) - sent)
        room = min(room, reports - sent)
        for _ in range(max(0, room)):
            try:
                sock.send(payloads[sent])
            except BlockingIOError:
                break
            sent_at[answers[sent]] = clock()
            if keep_times:
                first_sent[expected[sent][0]] = sent_at[answers[sent]]
            sent += 1
        ready, _, _ = select.select([sock], [], [], 0.0005 if rate > 0 else 0.05)
        if ready:
            while True:
                try:
                    data = sock.recv(256)
                except BlockingIOError:
                    break
                at = sent_at.pop(data, None)
                if at is not None:
                    now = clock()
                    latencies.append(now - at)
                    last_answer = now
        if clock() - last_answer > 3.0:
            break  # what is still outstanding was lost
    elapsed = (last_answer if latencies else clock()) - start
    sock.close()
    latencies.sort()

    def pct(share: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1000
            if latencies
            else float("nan")
        )

    out.put(
        {
            "sent": sent,
            "answered": len(latencies),
            "lost": len(sent_at),
            "elapsed_s": elapsed,
            "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
            **({"first_sent": first_sent} if keep_times else {}),
        }
    )


def run_load(
    port: int, reports: int, window: int, rate: float, prefix: str, keep_times: bool = False
) -> dict[str, Any]:
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    process = mp.Process(target=load, args=(port, reports, window, rate, prefix, queue, keep_times))
    process.start()
    result = queue.get(timeout=600)
    process.join()
    return dict(result)


def disk_probe(directory: Path, stop: Any, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """The data dir's disk alone, as the journal uses it: 8 KiB written into a file
    of zeros made ahead (so no size change) and fdatasync'd every 2 ms, until `stop`
    is set. Its latencies are the floor under any durable answer's."""
    path = directory / "disk-probe"
    region = 4 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    latencies: list[float] = []
    try:
        os.write(fd, bytes(region))
        os.fsync(fd)
        block, offset = b"\x01" * 8192, 0
        while not stop.is_set():
            started = time.perf_counter()
            os.pwrite(fd, block, offset)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
            offset = (offset + len(block)) % region
            stop.wait(0.002)
    finally:
        os.close(fd)
        path.unlink()
    latencies.sort()
    out.put(
        {
            "syncs": len(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(0.99 * len(latencies))] * 1000,
            "max_ms": latencies[-1] * 1000,
        }
    )


def with_disk_probe(
    directory: Path, run: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], dict[str, float]]:
    """`run()`, with the disk probe going on meanwhile; (its result, the probe's)."""
    stop, queue = mp.Event(), mp.Queue()  # type: ignore[var-annotated]
    probe = mp.Process(target=disk_probe, args=(directory, stop, queue))
    probe.start()
    try:
        result = run()
    finally:
        stop.set()
    probed = dict(queue.get(timeout=60))
    probe.join()
    return result, probed


def engine_stats(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "stopped:" in line]
    return lines[-1].split("stopped: ", 1)[1] if lines else "?"


def consumers(
    count: int,
    lag_prefix: bytes,
    ports_out: Any,
    got: Any,
    stop: Any,
    out: Any,
) -> None:
    """`count` UDP consumers on loopback, answering `call_id,serial` as an existing
    consumer of the switch's reports must; for reports whose call_id starts with
    `lag_prefix`, when each first arrived (perf_counter, the same clock as the load's).
    At idle priority, as the relay: these stand for systems on other machines, whose
    CPU is not the receiver's to share."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    ports_out.put([sock.getsockname()[1] for sock in socks])
    first: list[dict[bytes, float]] = [{} for _ in socks]
    clock = time.perf_counter
    while not stop.is_set():
        ready, _, _ = select.select(socks, [], [], 0.05)
        for sock in ready:
            index = socks.index(sock)
            arrived = first[index]
            while True:
                try:
                    data, sender = sock.recvfrom(4096)
                except BlockingIOError:
                    break
                call_id, serial, _ = data.split(b",", 2)
                sock.sendto(call_id + b"," + serial, sender)
                if call_id.startswith(lag_prefix) and call_id not in arrived:
                    arrived[call_id] = clock()
                    got[index] += 1
    out.put(first)


def nats_consumer(url: str, lag_prefix: bytes, got: Any, stop: Any, out: Any) -> None:
    """A NATS subscriber on every report subject: when each report whose call_id starts
    with `lag_prefix` first arrived (perf_counter). Idle priority, as the consumers."""
    import asyncio

    for task in os.listdir("/proc/self/task"):
        os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
    arrived: dict[bytes, float] = {}
    clock = time.perf_counter
    prefix = lag_prefix.decode()

    async def run() -> None:
        import nats

        async def quiet(error: Exception) -> None:
            pass  # the server stops at the end of the bench, maybe before this does

        nc = await nats.connect(url, error_cb=quiet)

        async def take(msg: Any) -> None:
            call_id = json.loads(msg.data)["call_id"]
            if call_id.startswith(prefix):
                key = call_id.encode()
                if key not in arrived:
                    arrived[key] = clock()
                    got[0] += 1

        await nc.subscribe("callsentry.reports.>", cb=take)
        await nc.flush()
        got[1] = 1  # subscribed
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    asyncio.run(run())
    out.put(arrived)


def stream_times(url: str, lag_prefix: bytes, since: float) -> dict[bytes, float]:
    """When JetStream stored each report whose call_id starts with `lag_prefix` (its
    stream timestamp, on the perf_counter clock): the publication's own lag, apart from
    how fast a subscriber on this busy machine takes it. Read after the measurement,
    from the messages stored after `since` (wall clock)."""
    import asyncio

    offset = time.time() - time.perf_counter()
    prefix = lag_prefix.decode()

    async def read() -> dict[bytes, float]:
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        nc = await nats.connect(url)
        stored: dict[bytes, float] = {}
        try:
            from datetime import UTC, datetime

            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.fromtimestamp(since, tz=UTC),
            )
            sub = await nc.jetstream().pull_subscribe(
                "callsentry.reports.>", stream="CALLSENTRY", config=config
            )
            while True:
                try:
                    batch = await sub.fetch(1000, timeout=2)
                except (TimeoutError, NatsTimeout):
                    break
                for msg in batch:
                    call_id = json.loads(msg.data)["call_id"]
                    if call_id.startswith(prefix):
                        key = call_id.encode()
                        at = msg.metadata.timestamp.timestamp() - offset
                        stored[key] = min(at, stored.get(key, at))
        finally:
            await nc.close()
        return stored

    return asyncio.run(read())


def relay_caught_up(data_dir: Path, timeout_s: float) -> float | None:
    """Seconds until every relay target's cursor reached what is stored (None: not within
    `timeout_s`)."""
    from engine.relay.state import load_state, state_path

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = load_state(state_path(data_dir))
        if (
            state is not None
            and state.saved_at > time.time() - 1
            and all(t.counters.lag_reports == 0 for t in state.targets.values())
        ):
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def relay_main(args: argparse.Namespace) -> int:
    """`--relay`: serve without relaying (a) against serve relaying every report to
    three UDP consumers and publishing it to NATS JetStream (b), alternating full-speed
    runs; then the relay's lag at a paced rate: from a report's first send to its first
    arrival at each consumer (and at a NATS subscriber)."""
    work = Path(tempfile.mkdtemp(prefix="callsentry-bench-relay-"))
    plain_dir, relay_dir = work / "plain", work / "relaying"
    plain_dir.mkdir()
    relay_dir.mkdir()
    targets = 3
    lag_prefix = b"lag-"
    ports_q, got, stop, out = mp.Queue(), mp.Array("q", targets), mp.Event(), mp.Queue()  # type: ignore[var-annotated]
    consumer = mp.Process(target=consumers, args=(targets, lag_prefix, ports_q, got, stop, out))
    consumer.start()
    ports = ports_q.get(timeout=30)
    from engine.simulator.natsserver import NatsServer

    nats_server = NatsServer(work / "nats").start()
    nats_got, nats_out = mp.Array("q", 2), mp.Queue()  # type: ignore[var-annotated]
    nats_sub = mp.Process(
        target=nats_consumer, args=(nats_server.url, lag_prefix, nats_got, stop, nats_out)
    )
    nats_sub.start()
    config = work / "relay.toml"
    config.write_text(
        "".join(f'[[relay.udp]]\ntarget = "127.0.0.1:{port}"\n' for port in ports)
        + f'[relay.nats]\nurls = ["{nats_server.url}"]\n'
        + f'[relay]\npriority = "{args.relay_priority}"\n'
    )
    plain_port, relay_port = free_port(), free_port()
    results: dict[str, dict[str, Any]] = {}
    ratios: list[float] = []
    lags: dict[int, list[float]] = {}
    missing: dict[int, int] = {}
    catch_up_s: float | None = None
    plain = start_engine(plain_port, plain_dir, log_name="plain.log")
    relaying = start_engine(
        relay_port, relay_dir, ["--config", str(config)], log_name="relaying.log"
    )
    try:
        for n in range(1, args.rounds + 1):
            a = run_load(plain_port, args.reports, args.window, 0.0, f"a{n}")
            b = run_load(relay_port, args.reports, args.window, 0.0, f"b{n}")
            results[f"a serve, full #{n}"] = a
            results[f"b serve relaying, full #{n}"] = b
            ratios.append(b["rate"] / a["rate"])
        # The relay works with the CPU the receiver leaves: after the full-speed
        # rounds it has their reports to send; the lag is measured once it has.
        catch_up_s = relay_caught_up(relay_dir, 900)
        for rate in args.paced:
            reports = int(rate * args.paced_seconds)
            results[f"a serve, paced {rate:g}/s"] = run_load(
                plain_port, reports, args.window, rate, f"pa-{rate:g}"
            )
            before = list(got)
            paced_from = time.time() - 1.0
            run = run_load(relay_port, reports, args.window, rate, f"lag-{rate:g}", True)
            results[f"b serve relaying, paced {rate:g}/s"] = run
            deadline = time.monotonic() + 120
            while any(got[i] - before[i] < reports for i in range(targets)) or (
                nats_got[0] < reports
            ):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            sent = run.pop("first_sent")
            stop.set()
            arrived = out.get(timeout=60)
            consumer.join()
            arrived.append(nats_out.get(timeout=60))
            nats_sub.join()
            arrived.append(stream_times(nats_server.url, lag_prefix, paced_from))
            for index in range(targets + 2):
                delays = sorted(
                    arrived[index][key] - at for key, at in sent.items() if key in arrived[index]
                )
                lags[index] = delays
                missing[index] = len(sent) - len(delays)
            break  # the consumers stop with the first paced rate's lag
    finally:
        stop.set()
        for process in (plain, relaying):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=300)
        counters = {name: engine_stats(work / f"{name}.log") for name in ("plain", "relaying")}
        from engine.apps.relay import status_lines

        status = status_lines(relay_dir, time.time())
        if consumer.is_alive():
            consumer.kill()
        if nats_sub.is_alive():
            nats_sub.kill()
        nats_server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'run':32} {'answered/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>6}")
    for name, r in results.items():
        print(
            f"{name:32} {r['rate']:11.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['max_ms']:8.1f} {r['lost']:6.0f}"
        )
    ratio = statistics.median(ratios)
    print()
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"ratio b/a at full speed: {ratio:.2f}, median of rounds {shown} (goal >= 0.90)")
    print(
        "relay caught up with the full-speed rounds "
        + (f"{catch_up_s:.0f} s after them" if catch_up_s is not None else "NOT within 900 s")
    )

    def ms(delays: list[float], share: float) -> float:
        return delays[min(len(delays) - 1, int(share * len(delays)))] * 1000 if delays else 0.0

    for index, delays in lags.items():
        name = (
            f"target {index + 1}"
            if index < targets
            else "NATS subscriber"
            if index == targets
            else "NATS stream (stored)"
        )
        print(
            f"relay lag at {args.paced[0]:g}/s, {name}: p50 {ms(delays, 0.5):.1f} ms, "
            f"p99 {ms(delays, 0.99):.1f} ms, max {max(delays, default=0) * 1000:.1f} ms, "
            f"{missing[index]} not arrived (goal: under 1 s)"
        )
    for line in status:
        print(f"  {line}")
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "ingest-relay.json").write_text(
        json.dumps(
            {
                "results": results,
                "ratios": ratios,
                "ratio": ratio,
                "catch_up_s": catch_up_s,
                "lag_ms": {
                    (
                        str(i + 1)
                        if i < targets
                        else "nats_subscriber"
                        if i == targets
                        else "nats_stored"
                    ): {
                        "p50": ms(d, 0.5),
                        "p99": ms(d, 0.99),
                        "max": max(d, default=0) * 1000,
                        "missing": missing[i],
                    }
                    for i, d in lags.items()
                },
                "counters": counters,
            },
            indent=2,
        )
    )
    print(f"engine counters: {counters}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reports", type=int, default=200_000, help="reports per full-speed run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="full-speed rounds, echo and serve alternating; the ratio is their median",
    )
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--paced", type=float, nargs="*", default=[5000.0, 20000.0])
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--relay",
        action="store_true",
        help="serve against serve relaying to three UDP consumers, and the relay's lag "
        "at the first --paced rate (default 5000/s)",
    )
    parser.add_argument(
        "--relay-priority",
        choices=["idle", "low"],
        default="idle",
        help="relay.priority of (b) with --relay (default idle, as shipped)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.reports < 1:
        parser.error("--rounds and --reports must be at least 1")
    if args.relay:
        if not args.paced:
            parser.error("--relay measures the lag at the first --paced rate: give one")
        return relay_main(args)

    results: dict[str, dict[str, float]] = {}
    disks: dict[float, dict[str, float]] = {}
    ratios: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="callsentry-bench-"))
    echo_port, engine_port = free_port(), free_port()
    data_dir = work / "data"
    data_dir.mkdir()
    echo = start_echo(echo_port)
    engine = start_engine(engine_port, data_dir)
    try:
        # Both servers stay up and the runs alternate: this machine's speed drifts by
        # tens of percent from one minute to the next, and one pair of runs can land
        # on either side of it. Each round's reports are new to the engine.
        for n in range(1, args.rounds + 1):
            echo_run = run_load(echo_port, args.reports, args.window, 0.0, f"a{n}")
            serve_run = run_load(engine_port, args.reports, args.window, 0.0, f"b{n}")
            results[f"a echo, full #{n}"] = echo_run
            results[f"b serve, full #{n}"] = serve_run
            ratios.append(serve_run["rate"] / echo_run["rate"])
        for rate in args.paced:
            label, reports = f"paced {rate:g}/s", int(rate * args.paced_seconds)
            # The echo touches no disk: the probe measures the data dir's disk in the
            # same minute without adding its flushes to the engine's.
            results[f"a echo, {label}"], disks[rate] = with_disk_probe(
                data_dir.parent,
                partial(run_load, echo_port, reports, args.window, rate, f"a-{rate:g}"),
            )
            results[f"b serve, {label}"] = run_load(
                engine_port, reports, args.window, rate, f"b-{rate:g}"
            )
        # What the receiver holds after the load (the dedup keys of every report
        # taken, for an hour): its own memory, not the lake writer's.
        engine_rss = resident_bytes(engine.pid)
    finally:
        echo.kill()
        echo.wait()
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=120)
        counters = engine_stats(work / "engine.log")
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'run':28} {'answered/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>6}")
    for name, r in results.items():
        print(
            f"{name:28} {r['rate']:11.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['max_ms']:8.1f} {r['lost']:6.0f}"
        )
    ratio = statistics.median(ratios)
    print()
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"ratio b/a at full speed: {ratio:.2f}, median of rounds {shown} (goal >= 0.70)")
    for rate in args.paced:
        p99 = results[f"b serve, paced {rate:g}/s"]["p99_ms"]
        disk = disks[rate]
        print(
            f"serve p99 answer latency at {rate:g}/s: {p99:.1f} ms (goal <= 25 ms at 5000/s); "
            f"the disk alone meanwhile: fdatasync p99 {disk['p99_ms']:.1f} ms, "
            f"max {disk['max_ms']:.1f} ms"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "ingest.json").write_text(
        json.dumps(
            {
                "results": results,
                "ratios": ratios,
                "ratio": ratio,
                "engine_rss": engine_rss,
                "disk_probe": {f"{rate:g}": disk for rate, disk in disks.items()},
            },
            indent=2,
        )
    )
    stored = dict(part.split("=", 1) for part in counters.split() if "=" in part).get("stored")
    print(f"receiver resident memory after {stored or '?'} reports: {engine_rss / 2**20:,.0f} MiB")
    print(f"details: {out / 'ingest.json'}; engine counters: {counters}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
