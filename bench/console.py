"""The console's pages on a large lake: 100,000 alerts, 10,000 reviews and 10 million
events (with their calls), as a user's stopwatch sees them.

Builds the lake once in bench/out/console-data (Parquet files per day, as the lake
writer lays them out after compaction), starts `callsentry console` on it as its own
process, signs in over HTTP, and times the queue page (`/`) and alert pages
(`/alerts/{id}`, a different alert each time): the first request of each, then the
p50/p95/max of the next `--requests`; with the shipped example tariff list
(rules/tariffs/tariffs.yaml, unless --no-tariffs) the queue sorted by estimated
exposure (`/?sort=exposure`) too. The issue's goal: p95 <= 200 ms after the first
request. Figures go to bench/README.md ("Console").

    .venv/bin/python bench/console.py [--events 10000000] [--alerts 100000] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2 as httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.console.accounts import Accounts, accounts_path  # noqa: E402
from engine.lake.parquet import (  # noqa: E402
    ALERT_SCHEMA,
    CALL_SCHEMA,
    EVENT_SCHEMA,
    REVIEW_SCHEMA,
    Lake,
    write_atomic,
)

DAYS = 30
START = datetime(2026, 10, 1, tzinfo=UTC)
PASSWORD = "bench-password"
# The callees' dialled prefixes (UK fixed and mobile, Germany, China mobile, Tokelau):
# the shipped rules/tariffs/tariffs.yaml prices all but the last.
DESTINATIONS = ["0044207", "0044770", "004930", "0086138", "00690"]
TARIFFS = ROOT / "rules" / "tariffs" / "tariffs.yaml"


def build(data: Path, events: int, alerts: int, reviews: int, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    lake = Lake(data)
    lake.prepare()
    calls = events // 3
    per_day = calls // DAYS
    callers = 200_000
    span_us = 86_400 * 1_000_000
    for day in range(DAYS):
        first = day * per_day
        n = per_day if day < DAYS - 1 else calls - first
        index = np.arange(first, first + n)
        day_start = START + timedelta(days=day)
        offsets = np.sort(rng.integers(0, span_us - 600_000_000, n))
        started = pl.Series(offsets).cast(pl.Duration("us")) + day_start
        caller_ids = rng.integers(0, callers, n)
        talk = rng.exponential(60.0, n).round(1)
        frame = pl.DataFrame(
            {
                "call_id": pl.Series(index).cast(pl.String).str.pad_start(10, "0"),
                "caller": pl.Series(caller_ids).cast(pl.String).str.pad_start(8, "0"),
                # Dialled as the switch reports them: international forms ("00" then
                # the country code) to a few destinations the tariff list prices, and
                # one in ten calls forwarded to a satellite number.
                "callee": pl.Series(DESTINATIONS)[rng.integers(0, len(DESTINATIONS), n)]
                + pl.Series(rng.integers(0, 100_000, n)).cast(pl.String).str.pad_start(6, "0"),
                "forward": pl.Series(
                    np.where(
                        rng.random(n) < 0.1,
                        np.char.add("00881", rng.integers(0, 10**8, n).astype(str)),
                        "",
                    )
                ),
                "menu_id": pl.Series(rng.integers(1, 9, n)).cast(pl.String),
                "menu_name": pl.Series(["Main"] * n),
                "started_at": started,
                "ringing_at": started,
                "answered_at": started + timedelta(seconds=3),
                "ended_at": started
                + pl.Series((talk * 1_000_000).astype(np.int64) + 3_000_000).cast(
                    pl.Duration("us")
                ),
                "ring_s": pl.Series([3.0] * n),
                "talk_s": pl.Series(talk),
                "outcome": pl.Series(["answered"] * n),
                "ring_code": pl.Series([180] * n, dtype=pl.Int16),
                "reports": pl.Series([3] * n, dtype=pl.Int32),
                "finished_at": started + timedelta(seconds=600),
                "switch": pl.Series([""] * n),
            }
        ).with_columns(("86" + pl.col("caller")).alias("caller"))
        frame = frame.select([pl.col(c).cast(t) for c, t in CALL_SCHEMA.items()])
        folder = f"day={day_start:%Y-%m-%d}"
        write_atomic(frame, lake.root / "calls" / folder / "cmp-calls.parquet")
        states = ["180", "OK", "BYE"]
        event_frames = []
        for k, state in enumerate(states):
            event_frames.append(
                frame.select(
                    (pl.lit(first * 3 + k) + pl.int_range(0, n) * 3).cast(pl.Int64).alias("seq"),
                    (pl.col("started_at") + pl.duration(seconds=3 * k)).alias("ts"),
                    "call_id",
                    pl.lit(k + 1, dtype=pl.Int64).alias("serial"),
                    pl.lit(state).alias("state"),
                    pl.lit(None, dtype=pl.Int16).alias("code"),
                    "caller",
                    "callee",
                    "forward",
                    "menu_id",
                    "menu_name",
                    pl.lit("127.0.0.1:5060").alias("source"),
                    "switch",
                )
            )
        events_frame = pl.concat(event_frames).sort("seq")
        events_frame = events_frame.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])
        write_atomic(events_frame, lake.root / "events" / folder / "cmp-events.parquet")
        # The day's alerts: each on a caller of one of the day's calls, its evidence the
        # 15 calls from there on.
        day_alerts = alerts // DAYS
        picks = rng.integers(0, max(1, n - 15), day_alerts)
        rows = frame.select("call_id", "caller", "started_at")
        ids = rows["call_id"].to_list()
        callers_of = rows["caller"].to_list()
        starts = rows["started_at"].to_list()
        severities = np.array(["low", "medium", "high", "critical"])[
            rng.choice(4, day_alerts, p=[0.3, 0.4, 0.25, 0.05])
        ]
        rules = [f"rule-{i}" for i in range(12)]
        alert_frame = pl.DataFrame(
            {
                "alert_id": [
                    str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | i))
                    for i in range(day_alerts)
                ],
                "rule_id": [rules[int(i)] for i in rng.integers(0, len(rules), day_alerts)],
                "detector": ["rule"] * day_alerts,
                "severity": severities.tolist(),
                "entity_type": ["caller"] * day_alerts,
                "entity": [callers_of[p] for p in picks],
                "window_start": [starts[p] for p in picks],
                "window_end": [starts[p] + timedelta(minutes=3) for p in picks],
                "raised_at": [starts[p] + timedelta(minutes=3) for p in picks],
                "value": [20.0] * day_alerts,
                "threshold": [15.0] * day_alerts,
                "summary": [f"caller {callers_of[p]} made 20 short calls" for p in picks],
                "evidence": [ids[p : p + 15] for p in picks],
                "rule_version": ["bench"] * day_alerts,
            },
            schema=ALERT_SCHEMA,
        )
        write_atomic(alert_frame, lake.root / "alerts" / folder / "cmp-alerts.parquet")
        day_reviews = reviews // DAYS
        chosen = rng.choice(day_alerts, day_reviews, replace=False)
        review_frame = pl.DataFrame(
            {
                "review_id": [str(uuid.uuid4()) for _ in chosen],
                "alert_id": [alert_frame["alert_id"][int(i)] for i in chosen],
                "status": rng.choice(
                    ["false_positive", "confirmed", "closed"], day_reviews
                ).tolist(),
                "note": ["checked"] * day_reviews,
                "reviewer": ["bench"] * day_reviews,
                "reviewed_at": [day_start + timedelta(hours=23)] * day_reviews,
            },
            schema=REVIEW_SCHEMA,
        )
        write_atomic(review_frame, lake.root / "alert_reviews" / folder / "rev-bench.parquet")
        print(f"  day {day + 1}/{DAYS}: {n} calls, {3 * n} events", flush=True)
    accounts = Accounts.load(accounts_path(data))
    accounts.set_user("bench", "viewer", PASSWORD)
    accounts.save()
    (data / "bench.json").write_text(
        json.dumps({"events": events, "alerts": alerts, "reviews": reviews})
    )


def timed(client: httpx.Client, path: str) -> float:
    began = time.perf_counter()
    answer = client.get(path)
    elapsed = time.perf_counter() - began
    if answer.status_code != 200:
        raise SystemExit(f"{path}: {answer.status_code} {answer.text[:300]}")
    return elapsed * 1000


def summary(name: str, first: float, times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    result = {
        "first_ms": first,
        "p50_ms": statistics.median(ordered),
        "p95_ms": p95,
        "max_ms": ordered[-1],
    }
    print(
        f"{name:<12} first {first:7.0f} ms   p50 {result['p50_ms']:6.0f} ms   "
        f"p95 {p95:6.0f} ms   max {ordered[-1]:6.0f} ms   ({len(times)} requests)"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--reviews", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "console-data")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument(
        "--no-tariffs", action="store_true", help="no tariff list: no exposure, no such sort"
    )
    args = parser.parse_args()
    wanted = {
        "events": args.events,
        "alerts": args.alerts,
        "reviews": args.reviews,
        "destinations": len(DESTINATIONS),
    }
    marker = args.data / "bench.json"
    if args.rebuild or not marker.exists() or json.loads(marker.read_text()) != wanted:
        shutil.rmtree(args.data, ignore_errors=True)
        print(f"building the lake in {args.data}: {wanted}")
        began = time.perf_counter()
        build(args.data, args.events, args.alerts, args.reviews)
        print(f"built in {time.perf_counter() - began:.0f} s")
    started = time.perf_counter()
    log = args.data.parent / "console-bench.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "engine", "console", "--data-dir", str(args.data)),
                *("--listen", "127.0.0.1:0"),
                *(("--tariffs", str(TARIFFS)) if not args.no_tariffs else ()),
            ],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            found = re.search(r"console on (http://127\.0\.0\.1:\d+)/", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        assert url, "the console did not listen"
        print(f"console listening {time.perf_counter() - started:.1f} s after start")
        client = httpx.Client(base_url=url, timeout=120)
        page = client.get("/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        client.post(
            "/login",
            data={"username": "bench", "password": PASSWORD, "csrf": csrf.group(1)},
        )
        first_queue = timed(client, "/")
        queue = [timed(client, "/") for _ in range(args.requests)]
        if not args.no_tariffs:
            by_exposure = "/?sort=exposure"
            first_exposure = timed(client, by_exposure)
            exposure = [timed(client, by_exposure) for _ in range(args.requests)]
        ids = re.findall(r"/alerts/([0-9a-f-]{36})", client.get("/?status=all").text)
        first_alert = timed(client, f"/alerts/{ids[0]}")
        alert = [timed(client, f"/alerts/{ids[(i + 1) % len(ids)]}") for i in range(args.requests)]
        results = {
            "queue": summary("queue /", first_queue, queue),
            **(
                {"exposure": summary("by exposure", first_exposure, exposure)}
                if not args.no_tariffs
                else {}
            ),
            "alert": summary("alert page", first_alert, alert),
            **wanted,
        }
        out = ROOT / "bench" / "out" / "console.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
