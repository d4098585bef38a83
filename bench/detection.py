"""Detection quality on the scenario library: callsentry against an hourly SQL baseline.

Every scenario in data/scenarios is generated, replayed through `replay` (rules
and models, as shipped), and scored per incident family: detected or not, time
from incident start to first alert, and alerts on benign look-alikes; overall
precision (alerts that belong to an incident that must alert / all alerts) and
recall. In the same run, the do-it-yourself baseline: the threshold queries a
team without this engine runs from cron every hour over the stored events,
scored the same way.

    .venv/bin/python bench/detection.py [--scenarios data/scenarios] [--json out.json]
        [--default-region CN]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.apps.replay import replay
from engine.apps.settings import Settings
from engine.simulator.scenario import generate, load_scenario, write_files

# The cron jobs of a team without a streaming engine: once an hour, over the last
# hour of raw events. Thresholds are what such a team would pick to stay quiet on
# normal days (one hour of a busy legitimate caller is a few dozen calls).
BASELINE_QUERIES = {
    "sql.caller-volume": """
        SELECT 'caller' AS entity_type, caller AS entity, list(DISTINCT call_id) AS evidence
        FROM events WHERE ts > $start AND ts <= $end
        GROUP BY caller HAVING count(DISTINCT call_id) >= 30
    """,
    "sql.caller-unanswered": """
        WITH per_call AS (
            SELECT call_id, any_value(caller) AS caller, bool_or(state = 'ANSWERED') AS answered,
                   bool_or(state = 'HANGUP') AS ended
            FROM events WHERE ts > $start AND ts <= $end GROUP BY call_id)
        SELECT 'caller', caller, list(call_id) FROM per_call WHERE ended AND NOT answered
        GROUP BY caller HAVING count(*) >= 20
    """,
    "sql.forward-volume": """
        SELECT 'forward', forward, list(DISTINCT call_id)
        FROM events WHERE ts > $start AND ts <= $end AND forward <> ''
        GROUP BY forward HAVING count(DISTINCT call_id) >= 15
    """,
    "sql.menu-unanswered": """
        WITH per_call AS (
            SELECT call_id, any_value(menu_id) AS menu_id, bool_or(state = 'ANSWERED') AS answered,
                   bool_or(state = 'HANGUP') AS ended
            FROM events WHERE ts > $start AND ts <= $end GROUP BY call_id)
        SELECT 'menu', menu_id, list(call_id) FILTER (WHERE NOT answered) FROM per_call
        WHERE ended
        GROUP BY menu_id HAVING count(*) >= 50 AND avg(CASE WHEN answered THEN 0 ELSE 1 END) > 0.5
    """,
}


@dataclass
class Found:
    source: str
    entity: str
    raised_at: float
    evidence: set[str]


# An alert is about an incident when it names the incident's entity, or when at least
# this share of the calls it gives as evidence are the incident's (a menu-wide query
# that lists a thousand calls, three of them the incident's, did not find it).
MIN_EVIDENCE_SHARE = 0.2


def owners_of(alert: Found, labels: list[tuple[dict[str, Any], set[str]]]) -> list[dict[str, Any]]:
    owners = []
    for label, ids in labels:
        shared = len(alert.evidence & ids)
        if not shared:
            continue
        if alert.entity == label["entity"] or shared >= MIN_EVIDENCE_SHARE * len(alert.evidence):
            owners.append(label)
    return owners


@dataclass
class Score:
    alerts: int = 0
    true_alerts: int = 0
    lookalike_alerts: int = 0
    detected: dict[str, float | None] = field(default_factory=dict)  # incident -> ttd or None
    families: dict[str, str] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return self.true_alerts / self.alerts if self.alerts else 1.0

    @property
    def recall(self) -> float:
        if not self.detected:
            return 1.0
        return sum(1 for t in self.detected.values() if t is not None) / len(self.detected)

    def ttds(self) -> list[float]:
        return [t for t in self.detected.values() if t is not None]


def score(found: list[Found], labels: list[dict[str, Any]], into: Score) -> None:
    calls = [(label, set(label["call_ids"])) for label in labels]
    starts = {
        label["incident"]: datetime.fromisoformat(label["start"]).timestamp() for label in labels
    }
    for label in labels:
        if label["must_alert"]:
            into.detected.setdefault(label["incident"], None)
            into.families[label["incident"]] = label["family"]
    for alert in found:
        into.alerts += 1
        owners = owners_of(alert, calls)
        if any(o["must_alert"] for o in owners):
            into.true_alerts += 1
        if any(not o["must_alert"] for o in owners):
            into.lookalike_alerts += 1
        for owner in owners:
            if not owner["must_alert"]:
                continue
            incident = owner["incident"]
            ttd = max(0.0, alert.raised_at - starts[incident])
            best = into.detected[incident]
            into.detected[incident] = ttd if best is None else min(best, ttd)


def run_baseline(database: Path, start: float, end: float) -> list[Found]:
    found = []
    with duckdb.connect(str(database), read_only=True) as con:
        hour = start + 3600
        while hour <= end + 3600:
            for name, query in BASELINE_QUERIES.items():
                rows = con.execute(
                    query,
                    {
                        "start": datetime.fromtimestamp(hour - 3600).astimezone(),
                        "end": datetime.fromtimestamp(hour).astimezone(),
                    },
                ).fetchall()
                found.extend(Found(name, row[1], hour, set(row[2] or [])) for row in rows)
            hour += 3600
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=Path, default=Path("data/scenarios"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--default-region",
        default="",
        help="detection.default_region: the region national numbers belong to (CN for the "
        "simulator's numbers); unset, national numbers are not judged",
    )
    args = parser.parse_args()
    engine, baseline, models_only = Score(), Score(), Score()
    per_scenario = []
    with tempfile.TemporaryDirectory(prefix="callsentry-detection-") as tmp:
        for path in sorted(args.scenarios.glob("*.yaml")):
            scenario = load_scenario(path)
            generated = generate(scenario)
            events_path, labels_path = write_files(generated, Path(tmp) / scenario.name)
            labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
            settings = Settings.model_validate(
                {
                    "store": {"data_dir": str(Path(tmp) / f"data-{scenario.name}")},
                    "detection": {
                        "alerts_jsonl": "off",
                        "default_region": args.default_region,
                    },
                }
            )
            result = replay([events_path], settings)
            alerts = [a for a in result.alerts if a.mode == "alert"]
            found = [Found(a.rule_id, a.entity, a.raised_at, set(a.evidence)) for a in alerts]
            before = (engine.alerts, engine.true_alerts)
            score(found, labels, engine)
            score(
                [f for f, a in zip(found, alerts, strict=True) if a.detector == "model"],
                labels,
                models_only,
            )
            start = scenario.start.timestamp()
            sql = run_baseline(
                settings.store.data_dir / "callsentry.duckdb", start, start + scenario.duration
            )
            score(sql, labels, baseline)
            per_scenario.append(
                (
                    scenario.name,
                    engine.alerts - before[0],
                    engine.true_alerts - before[1],
                    sorted({a.rule_id for a in alerts if a.detector == "model"}),
                    len(sql),
                )
            )
            labelled = [(label, set(label["call_ids"])) for label in labels]
            for alert in found + sql:
                owners = [o["incident"] for o in owners_of(alert, labelled)]
                shown = ", ".join(owners) or "no incident"
                print(f"  {scenario.name:14} {alert.source:32} {alert.entity:16} -> {shown}")
    print()
    print(
        f"{'incident':16} {'family':22} {'callsentry':>12} {'SQL hourly':>12}"
        f" {'(models alone)':>16}"
    )
    for incident, family in sorted(engine.families.items()):
        ours, theirs = engine.detected[incident], baseline.detected.get(incident)
        model = models_only.detected.get(incident)
        show = lambda t: "missed" if t is None else f"{t / 60:.1f} min"  # noqa: E731
        print(f"{incident:16} {family:22} {show(ours):>12} {show(theirs):>12} {show(model):>16}")
    print(
        f"models alone: {models_only.alerts} alerts, precision {models_only.precision:.2f}, "
        f"recall {models_only.recall:.0%}"
    )
    rows = [
        ("recall", f"{engine.recall:.0%}", f"{baseline.recall:.0%}"),
        ("precision", f"{engine.precision:.2f}", f"{baseline.precision:.2f}"),
        (
            "median time to detect",
            f"{statistics.median(engine.ttds()) / 60:.1f} min" if engine.ttds() else "-",
            f"{statistics.median(baseline.ttds()) / 60:.1f} min" if baseline.ttds() else "-",
        ),
        ("alerts on look-alikes", str(engine.lookalike_alerts), str(baseline.lookalike_alerts)),
        ("alerts in all", str(engine.alerts), str(baseline.alerts)),
    ]
    print()
    for name, ours, theirs in rows:
        print(f"{name:39} {ours:>12} {theirs:>12}")
    for name, count, true, models, sql in per_scenario:
        print(
            f"scenario {name}: {count} alerts ({true} on incidents), "
            f"model alerts from {', '.join(models) or 'no model'}; SQL baseline {sql} alerts"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"callsentry": engine.__dict__, "sql": baseline.__dict__}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
