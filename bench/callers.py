"""Caller-side detection over random seeds: heavy benign callers against incidents.

Each seed draws a scenario within the ranges of issue 25 (point 6) for the caller
families: a benign population (20,000-100,000 callers, 3-12 calls/s, the simulator's
own trunks), one to five benign trunks and one to three PBXs on no list each placing
a normal call every 5-60 s from the first minute (a PBX reaches many distinct callees,
and some of its calls ring unanswered at the usual rate), a Wangiri run of 15-80
unanswered calls spaced 5-45 s, a short-call burst of 10-40 calls spaced 3-10 s and
10-25 simultaneous long calls opened within 1-3 minutes, each incident starting in
the first 30 minutes. The shipped rules and models run in-process (as replay runs
them) and each seed is scored: incidents caught, time to detect, alerts on the
benign trunks and PBXs, and precision (alerts naming an incident's caller / all
alerts about callers).

    .venv/bin/python bench/callers.py [--seeds 10] [--hours 2] [--rules rules] [--json out.json]

Run with another checkout's interpreter and PYTHONPATH to score that build on the
same draws (the draws depend only on the seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.apps.detectors import make_pipeline
from engine.apps.settings import DetectionSettings
from engine.simulator.calls import Call, new_call_id
from engine.simulator.scenario import Scenario, generate
from engine.simulator.traffic import BenignSpec, benign_call

INCIDENTS = ("wangiri", "callback_abuse", "simultaneous_calls")
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


@dataclasses.dataclass
class Drawn:
    scenario: Scenario
    pbxs: list[tuple[str, float]]  # (caller, seconds between calls)


def draw(seed: int, hours: float) -> Drawn:
    rng = random.Random(f"callers:{seed}")
    duration = hours * 3600
    benign = BenignSpec(
        callers=rng.randint(20_000, 100_000),
        calls_per_hour=rng.uniform(3, 12) * 3600,
        caller_skew=rng.uniform(1.1, 2.0),
    )
    incidents: list[dict[str, Any]] = [
        {
            "id": "wangiri",
            "family": "wangiri",
            "at": rng.uniform(0, 1800),
            "calls": rng.randint(15, 80),
            "spacing": rng.uniform(5, 45),
        },
        {
            "id": "callback_abuse",
            "family": "callback_abuse",
            "at": rng.uniform(0, 1800),
            "calls": rng.randint(10, 40),
            "spacing": rng.uniform(3, 10),
        },
        {
            "id": "simultaneous_calls",
            "family": "simultaneous_calls",
            "at": rng.uniform(0, 1800),
            "calls": rng.randint(10, 25),
            "within": rng.uniform(60, 180),
        },
    ]
    for n in range(rng.randint(1, 5)):
        incidents.append(
            {
                "id": f"trunk-{n}",
                "family": "busy_trunk",
                "at": rng.uniform(0, 60),
                "calls_per_hour": 3600 / rng.uniform(5, 60),
                "over": duration - 60,
            }
        )
    pbxs = [
        (f"860216{seed % 100:02d}{n:04d}", rng.uniform(5, 60)) for n in range(rng.randint(1, 3))
    ]
    scenario = Scenario.model_validate(
        {
            "name": f"callers-{seed}",
            "seed": seed,
            "start": START,
            "duration": duration,
            "benign": benign,
            "incidents": incidents,
        }
    )
    return Drawn(scenario, pbxs)


def pbx_calls(drawn: Drawn, seed: int) -> list[Call]:
    """Each PBX: a normal call every `gap` s (Poisson) from the first minute, to many
    distinct numbers, answered at its menu's usual rate."""
    spec = drawn.scenario.benign
    start = drawn.scenario.start.timestamp()
    calls = []
    for caller, gap in drawn.pbxs:
        rng = random.Random(f"pbx:{seed}:{caller}")
        callees = [f"861{rng.randrange(10**9, 10**10)}" for _ in range(400)]
        t = rng.uniform(0, 60)
        while t < drawn.scenario.duration - 60:
            call = benign_call(spec, rng.choice(spec.menus), caller, start + t, rng)
            calls.append(
                dataclasses.replace(call, callee=rng.choice(callees), call_id=new_call_id(rng))
            )
            t += rng.expovariate(1 / gap)
    return calls


def run(seed: int, hours: float, rules: Path | None) -> dict[str, Any]:
    drawn = draw(seed, hours)
    generated = generate(drawn.scenario)
    events = generated.events
    pbx = pbx_calls(drawn, seed)
    events = sorted(
        [*events, *(e for c in pbx for e in c.reports())],
        key=lambda e: (e.ts, e.call_id, e.serial),
    )
    pipeline = make_pipeline(DetectionSettings(), rules)
    began = time.perf_counter()
    alerts = []
    for at in range(0, len(events), 20_000):
        alerts.extend(pipeline.feed(events[at : at + 20_000]).alerts)
    alerts.extend(pipeline.advance(events[-1].ts + 86_400).alerts)
    took = time.perf_counter() - began
    # Alerts only: a shadow rule's are recorded, never notified.
    caller_alerts = [a for a in alerts if a.entity_type == "caller" and a.mode == "alert"]
    shadow = [a for a in alerts if a.entity_type == "caller" and a.mode != "alert"]
    benign = {label.entity for label in generated.labels if not label.must_alert}
    benign |= {caller for caller, _ in drawn.pbxs}
    incidents = {label.entity: label for label in generated.labels if label.must_alert}
    result: dict[str, Any] = {"seed": seed, "events": len(events), "seconds": round(took, 1)}
    for family in INCIDENTS:
        label = next(lab for lab in generated.labels if lab.family == family)
        hits = [
            a.raised_at
            for a in caller_alerts
            if a.entity == label.entity and label.start <= a.raised_at <= label.end + 3600
        ]
        result[family] = round(min(hits) - label.start, 1) if hits else None
    result["shadow_alerts"] = sorted(f"{a.rule_id}:{a.entity}" for a in shadow)
    result["lookalike_alerts"] = sorted(
        f"{a.rule_id}:{a.entity}" for a in caller_alerts if a.entity in benign
    )
    good = sum(1 for a in caller_alerts if a.entity in incidents)
    result["caller_alerts"] = len(caller_alerts)
    result["precision"] = round(good / len(caller_alerts), 3) if caller_alerts else 1.0
    result["false_alerts"] = sorted(
        f"{a.rule_id}:{a.entity}" for a in caller_alerts if a.entity not in incidents
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--rules", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for seed in range(1, args.seeds + 1):
        result = run(seed, args.hours, args.rules)
        results.append(result)
        print(json.dumps(result), flush=True)
    print()
    print(f"{'family':<20} {'recall':>7} {'median s':>9} {'worst s':>8}")
    for family in INCIDENTS:
        times = [r[family] for r in results if r[family] is not None]
        recall = len(times) / len(results)
        median = f"{statistics.median(times):.0f}" if times else "-"
        worst = f"{max(times):.0f}" if times else "-"
        print(f"{family:<20} {recall:>7.2f} {median:>9} {worst:>8}")
    all_alerts = sum(r["caller_alerts"] for r in results)
    false = sum(len(r["false_alerts"]) for r in results)
    lookalike = [len(r["lookalike_alerts"]) for r in results]
    print(
        f"precision {1 - false / all_alerts if all_alerts else 1:.3f} over {all_alerts} caller "
        f"alerts; look-alike alerts per seed {lookalike}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
