"""Scenario files: benign traffic plus labelled incidents, generated deterministically.

    name: mixed-day
    seed: 7
    start: 2026-11-02T08:00:00+00:00
    duration: 4h
    benign: {calls_per_hour: 1500}
    incidents:
      - {id: cb-1, family: callback_abuse, at: 30m, calls: 40}

`generate()` gives the reports in event-time order and one label per incident.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from engine.core.durations import Duration
from engine.core.events import CallEvent
from engine.core.yamlfile import YamlFileError, load_yaml, parse_model
from engine.simulator.calls import Call
from engine.simulator.incidents import Context, Incident, entity_of
from engine.simulator.traffic import BenignSpec, generate_benign, make_population


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    seed: int = 1
    start: AwareDatetime = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    duration: Duration = 14400.0
    benign: BenignSpec = Field(default_factory=BenignSpec)
    incidents: list[Incident] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        ids = [incident.id for incident in self.incidents]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"incident ids must be unique; repeated: {', '.join(repeated)}")
        for incident in self.incidents:
            if incident.at > self.duration:
                raise ValueError(
                    f"incident {incident.id} starts at {incident.at:.0f} s, after the "
                    f"scenario's {self.duration:.0f} s"
                )
        return self


@dataclass(frozen=True)
class Label:
    incident: str
    family: str
    entity_type: str
    entity: str
    start: float
    end: float
    must_alert: bool
    call_ids: list[str]

    def as_json(self) -> dict[str, Any]:
        return {
            "incident": self.incident,
            "family": self.family,
            "entity_type": self.entity_type,
            "entity": self.entity,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "must_alert": self.must_alert,
            "call_ids": self.call_ids,
        }


@dataclass(frozen=True)
class Generated:
    events: list[CallEvent]
    labels: list[Label]
    calls: int


def load_scenario(path: Path) -> Scenario:
    document = load_yaml(path)
    try:
        return parse_model(document, Scenario)
    except YamlFileError:
        raise
    except ValueError as error:
        raise YamlFileError([f"{path}: {error}"]) from None


def generate(scenario: Scenario) -> Generated:
    start = scenario.start.timestamp()
    rng = random.Random(f"{scenario.seed}:benign")
    calls: list[Call] = generate_benign(scenario.benign, start, scenario.duration, rng)
    population = make_population(scenario.benign, random.Random(f"{scenario.seed}:population"))
    labels = []
    for incident in scenario.incidents:
        ctx = Context(scenario.benign, population, random.Random(f"{scenario.seed}:{incident.id}"))
        incident_calls = incident.calls(start + incident.at, ctx)
        if not incident_calls:
            continue
        calls.extend(incident_calls)
        labels.append(
            Label(
                incident.id,
                incident.family,
                incident.entity_type,
                entity_of(incident, incident_calls),
                min(c.start for c in incident_calls),
                max(c.end for c in incident_calls),
                incident.must_alert,
                [c.call_id for c in incident_calls],
            )
        )
    events = [event for call in calls for event in call.reports()]
    events.sort(key=lambda e: (e.ts, e.call_id, e.serial))
    return Generated(events, labels, len(calls))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def events_frame(events: list[CallEvent]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [_iso(e.ts) for e in events],
            "call_id": [e.call_id for e in events],
            "serial": [e.serial for e in events],
            "state": [
                str(e.code) if e.code is not None else _TOKENS[e.state.value] for e in events
            ],
            "caller": [e.caller for e in events],
            "callee": [e.callee for e in events],
            "forward": [e.forward for e in events],
            "menu_id": [e.menu_id for e in events],
            "menu_name": [e.menu_name for e in events],
        },
        schema={
            "ts": pl.String,
            "call_id": pl.String,
            "serial": pl.Int64,
            "state": pl.String,
            "caller": pl.String,
            "callee": pl.String,
            "forward": pl.String,
            "menu_id": pl.String,
            "menu_name": pl.String,
        },
    )


_TOKENS = {"RINGING": "Ringing", "ANSWERED": "OK", "HANGUP": "Bye"}


def write_files(generated: Generated, directory: Path, fmt: str = "csv") -> tuple[Path, Path]:
    """Write `events.<fmt>` (docs/protocol.md's columns, replayable) and `labels.jsonl`."""
    directory.mkdir(parents=True, exist_ok=True)
    frame = events_frame(generated.events)
    events_path = directory / f"events.{fmt}"
    if fmt == "csv":
        frame.write_csv(events_path)
    elif fmt == "parquet":
        frame.write_parquet(events_path)
    elif fmt == "jsonl":
        frame.write_ndjson(events_path)
    else:
        raise ValueError(f"unknown event file format {fmt!r} (csv, parquet or jsonl)")
    labels_path = directory / "labels.jsonl"
    with labels_path.open("w", encoding="utf-8") as handle:
        for label in generated.labels:
            handle.write(json.dumps(label.as_json(), ensure_ascii=False) + "\n")
    return events_path, labels_path
