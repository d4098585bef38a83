"""Forward-number ramps over random seeds: how many are caught, how soon, at what rate.

Each seed draws one scenario within issue 25's ranges: six hours of benign traffic
from 06:00 (the morning's rise in it) at 1,500 calls an hour; a forward number
ramping from one call per 10-30 minutes to 60-300 an hour over 30-90 minutes,
starting anywhere from minute 0 to hour 3, after a quiet history at its starting
rate (one to three hours) in about half of them; a call-centre number at 240 an hour
from within the first half hour; a marketing campaign of 1,500-3,000 calls an hour
for an hour on the forward numbers' own menu. The events go through the detection
pipeline in memory (the rules and models of `--rules`), and each seed prints when
the ramp was first alerted from its start, the rate it had reached then, by which
rules, and the alerts on other forward numbers and on that menu (all false).

    .venv/bin/python bench/ramps.py [--seeds 0:14] [--rules rules]

Figures: bench/README.md, "Forward ramps".
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.apps.detectors import make_pipeline
from engine.apps.settings import Settings
from engine.simulator.scenario import Scenario, generate

RAMP_MENU = "4"  # the simulator's menu with forward numbers


def draw(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scenario document and what its ramp is."""
    rng = random.Random(seed)
    start_at = rng.uniform(0, 3 * 3600)
    quiet = rng.random() < 0.5
    low = 3600 / rng.uniform(600, 1800)
    high = rng.uniform(60, 300)
    over = rng.uniform(1800, 5400)
    forward = f"+3716{seed:07d}"
    incidents: list[dict[str, Any]] = []
    if quiet:
        history = rng.uniform(3600, 3 * 3600)
        incidents.append(
            {
                "id": "quiet",
                "family": "forward_ramp",
                "at": max(0.0, start_at - history),
                "over": max(60.0, min(history, start_at)),
                "rate_start_per_hour": low,
                "rate_end_per_hour": low,
                "forward": forward,
                "must_alert": False,
            }
        )
    incidents += [
        {
            "id": "ramp",
            "family": "forward_ramp",
            "at": start_at,
            "over": over,
            "rate_start_per_hour": low,
            "rate_end_per_hour": high,
            "forward": forward,
        },
        {
            "id": "cc",
            "family": "call_centre_forward",
            "at": rng.uniform(0, 1800),
            "forward": "4008005009",
            "calls_per_hour": 240,
            "over": 5 * 3600,
        },
        {
            "id": "campaign",
            "family": "marketing_campaign",
            "at": rng.uniform(0, 4 * 3600),
            "menu_id": RAMP_MENU,
            "calls_per_hour": rng.uniform(1500, 3000),
            "over": 3600,
        },
    ]
    document = {
        "name": f"ramp-{seed}",
        "seed": seed,
        "start": "2026-11-05T06:00:00+00:00",
        "duration": "6h",
        "benign": {"calls_per_hour": 1500},
        "incidents": incidents,
    }
    ramp = {"start_at": start_at, "quiet": quiet, "low": low, "high": high, "over": over}
    return document, {**ramp, "forward": forward}


def run(document: dict[str, Any], rules: Path) -> tuple[float, list[Any]]:
    scenario = Scenario.model_validate(document)
    with tempfile.TemporaryDirectory(prefix="callsentry-ramps-") as folder:
        settings = Settings.model_validate(
            {"store": {"data_dir": folder}, "detection": {"alerts_jsonl": "off"}}
        )
        pipeline = make_pipeline(settings.detection, rules)
        events = generate(scenario).events
        alerts = []
        for i in range(0, len(events), 5000):
            alerts += pipeline.feed(events[i : i + 5000]).alerts
        alerts += pipeline.advance(events[-1].ts + 7200).alerts
    return scenario.start.timestamp(), [a for a in alerts if a.mode == "alert"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:14", help="first:last (last not included)")
    parser.add_argument("--rules", type=Path, default=Path("rules"))
    args = parser.parse_args()
    first, last = (int(part) for part in args.seeds.split(":"))
    found: list[float | None] = []
    false_alerts = 0
    for seed in range(first, last):
        document, ramp = draw(seed)
        t0, alerts = run(document, args.rules)
        begins = t0 + ramp["start_at"]
        on_ramp = [a for a in alerts if a.entity == ramp["forward"] and a.raised_at >= begins]
        others = [
            a
            for a in alerts
            if a.entity != ramp["forward"] and (a.entity_type == "forward" or a.entity == RAMP_MENU)
        ]
        false_alerts += len(others)
        ttd = min((a.raised_at for a in on_ramp), default=None)
        after = None if ttd is None else ttd - begins
        found.append(after)
        rate = (
            None
            if after is None
            else ramp["low"] + (ramp["high"] - ramp["low"]) * min(1.0, after / ramp["over"])
        )
        print(
            f"seed {seed}: ramp from minute {ramp['start_at'] / 60:.0f}, quiet history "
            f"{'yes' if ramp['quiet'] else 'no'}, {ramp['low']:.1f} -> {ramp['high']:.0f}/h over "
            f"{ramp['over'] / 60:.0f} min: "
            + ("missed" if after is None else f"{after / 60:.1f} min at {rate:.0f}/h")
            + f" by {sorted({a.rule_id for a in on_ramp}) or '-'}; false alerts "
            f"{sorted((a.rule_id, a.entity) for a in others)}",
            flush=True,
        )
    caught = sorted(t / 60 for t in found if t is not None)
    print(
        f"caught {len(caught)} of {len(found)}"
        + (
            f": median {statistics.median(caught):.1f} min, worst {caught[-1]:.1f} min"
            if caught
            else ""
        )
        + f"; false alerts {false_alerts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
