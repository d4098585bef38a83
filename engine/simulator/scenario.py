"""Scenario files: benign traffic plus labelled incidents, generated deterministically.

    name: mixed-day
    seed: 7
    start: 2026-11-02T08:00:00+00:00
    duration: 4h
    benign: {calls_per_hour: 1500}
    incidents:
      - {id: cb-1, family: callback_abuse, at: 30m, calls: 40}

Any value may be a range drawn from the seed (`{between: [15, 80]}`, `{one_of: [...]}`,
an incident's `repeat`): see engine.simulator.ranges.

`generate()` gives the reports in event-time order and one label per incident.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from engine.core.durations import Duration
from engine.core.events import CallEvent
from engine.core.yamlfile import YamlDocument, YamlFileError, load_yaml, parse_model
from engine.simulator import ranges
from engine.simulator.calls import Call
from engine.simulator.incidents import Context, Incident, entity_of
from engine.simulator.traffic import BenignSpec, generate_benign, iter_benign, make_population


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

    def lasting(self, duration: float) -> Scenario:
        """This scenario cut or stretched to `duration` seconds, checked again (an
        incident after its end is refused: ValidationError)."""
        return Scenario.model_validate({**self.model_dump(by_alias=True), "duration": duration})


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


def load_scenario(path: Path, seed: int | None = None) -> Scenario:
    """The scenario in `path`, its ranges (if any) drawn from `seed` (the file's own
    `seed` when None). A file with ranges is checked whole before anything is drawn."""
    document = load_yaml(path)
    if not isinstance(document.data, dict) or not ranges.has_ranges(document.data):
        scenario = _parse(document)
        return scenario if seed is None else scenario.model_copy(update={"seed": seed})
    check_ranges(document)
    if seed is None:
        seed = _parse(document, lambda r, loc: r.low_end(), lambda v, loc: 1).seed
    return _parse(
        document,
        lambda r, loc: r.draw(random.Random(f"{seed}:{'.'.join(map(str, loc))}")),
        lambda v, loc: _copies(v, loc, seed),
        seed=seed,
    )


def check_ranges(document: YamlDocument) -> None:
    """YamlFileError unless every range is well formed and the scenario is valid with
    every range at its low end, at its high end and in its middle, and with each
    `one_of` at each of its values (a seed may draw any of them)."""
    passes: list[tuple[str, ranges.Choose]] = [
        ("its low end", lambda r, loc: r.low_end()),
        ("its high end", lambda r, loc: r.high_end()),
        ("the middle", lambda r, loc: r.middle()),
    ]
    for n in range(1, ranges.longest_choice(document.data) - 1):
        passes.append((f"one_of's value {n + 1}", _value_number(n)))
    for where, choose in passes:
        try:
            _parse(document, choose, _checked_copies)
        except RangeShapeError:
            raise
        except YamlFileError as error:
            if not ranges.has_ranges(document.data, repeats=False):
                raise
            raise YamlFileError(
                [f"{p} (with every range at {where})" for p in error.problems]
            ) from None


def _value_number(n: int) -> ranges.Choose:
    return lambda r, loc: r.value_number(n)


class RangeShapeError(YamlFileError):
    """A range, a `repeat` or the seed is malformed (whatever is drawn from it)."""


def _checked_copies(value: Any, loc: ranges.Loc) -> Any:
    """For the checks: one copy of a repeated incident, once both ends are valid."""
    ends = [value]
    if isinstance(value, dict):
        try:
            parsed = ranges.parse_range(value)
        except ValueError:
            return value  # reported as a repeat that is no whole number
        ends = [parsed.low_end(), parsed.high_end()]
    for end in ends:
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= ranges.MAX_REPEAT:
            return end
    return 1


def _copies(value: Any, loc: ranges.Loc, seed: int) -> Any:
    if isinstance(value, dict):
        try:
            drawn = ranges.parse_range(value)
        except ValueError:
            return value
        return drawn.draw(random.Random(f"{seed}:{'.'.join(map(str, loc))}"))
    return value


def _parse(
    document: YamlDocument,
    choose: ranges.Choose | None = None,
    copies: Callable[[Any, ranges.Loc], Any] | None = None,
    seed: int | None = None,
) -> Scenario:
    """The scenario of `document`, each range replaced by `choose(range, where)` and
    each repeated incident by `copies(repeat, where)` copies (what the key of a draw
    names is the incident's id, not its place, so copies elsewhere change nothing)."""
    if choose is None or copies is None or not isinstance(document.data, dict):
        try:
            return parse_model(document, Scenario)
        except YamlFileError:
            raise
        except ValueError as error:
            raise YamlFileError([f"{document.path}: {error}"]) from None
    data = document.data
    problems: list[tuple[ranges.Loc, str]] = []
    if isinstance(data.get("seed"), dict):
        problems.append((("seed",), "seed is the draw's seed: a whole number, not a range"))
    incidents = data.get("incidents")
    origin: list[int] = []
    if isinstance(incidents, list):
        # Problems of `repeat` are at the incident's place in the file, not its copies'.
        incidents, origin = ranges.expand_repeats(
            incidents, lambda v, loc: copies(v, _keyed(loc, data["incidents"])), problems
        )
    in_file = [f"{document.where(loc)}: {'.'.join(map(str, loc))}: {why}" for loc, why in problems]
    problems = []
    top = {key: value for key, value in data.items() if key != "incidents"}
    drawn = ranges.resolve(top, (), choose, problems)
    if isinstance(incidents, list):
        out = []
        for index, incident in enumerate(incidents):
            key = incident.get("id", index) if isinstance(incident, dict) else index
            name = key if isinstance(key, str | int) and not isinstance(key, bool) else index

            def keyed(r: ranges.Range, loc: ranges.Loc, name: str | int = name) -> Any:
                return choose(r, ("incidents", name, *loc[2:]))

            out.append(ranges.resolve(incident, ("incidents", index), keyed, problems))
        drawn["incidents"] = out
    elif "incidents" in data:
        drawn["incidents"] = incidents
    if seed is not None:
        drawn["seed"] = seed
    # The drawn data, each key on the line of the key it was drawn for.
    placed = ranges.relocated(document, drawn, origin)
    if problems or in_file:
        raise RangeShapeError(
            in_file
            + [f"{placed.where(loc)}: {'.'.join(map(str, loc))}: {why}" for loc, why in problems]
        )
    try:
        return parse_model(placed, Scenario)
    except YamlFileError as error:
        if seed is None:
            raise
        raise YamlFileError(
            [f"{p} (values drawn with seed {seed})" for p in error.problems]
        ) from None
    except ValueError as error:
        raise YamlFileError([f"{document.path}: {error}"]) from None


def _keyed(loc: ranges.Loc, incidents: Any) -> ranges.Loc:
    """The key a repeat's draw is made under: the incident's id, not its place."""
    index = loc[1]
    if isinstance(index, int) and isinstance(incidents, list) and index < len(incidents):
        name = incidents[index].get("id") if isinstance(incidents[index], dict) else None
        if isinstance(name, str):
            return ("incidents", name, *loc[2:])
    return loc


def _incidents(scenario: Scenario) -> tuple[list[Call], list[Label]]:
    """Every incident's calls, and its label."""
    start = scenario.start.timestamp()
    population = make_population(scenario.benign, random.Random(f"{scenario.seed}:population"))
    calls: list[Call] = []
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
                incident.onset(start + incident.at, incident_calls),
                max(c.end for c in incident_calls),
                incident.must_alert,
                [c.call_id for c in incident_calls],
            )
        )
    return calls, labels


def _event_order(event: CallEvent) -> tuple[float, str, int]:
    return (event.ts, event.call_id, event.serial)


def generate(scenario: Scenario) -> Generated:
    start = scenario.start.timestamp()
    rng = random.Random(f"{scenario.seed}:benign")
    calls: list[Call] = generate_benign(scenario.benign, start, scenario.duration, rng)
    incident_calls, labels = _incidents(scenario)
    calls.extend(incident_calls)
    events = [event for call in calls for event in call.reports()]
    events.sort(key=_event_order)
    return Generated(events, labels, len(calls))


# Event time per part when a scenario is generated a part at a time.
PART_S = 86_400.0
# Rows per row group of a Parquet file written: what replay reads as one part.
PART_ROWS = 100_000


@dataclass
class Parts:
    """`generate()`'s reports a part of event time at a time (iterate once): the same
    reports in the same order, without holding more than a part's calls (and the
    reports of calls still going at its end). `calls` counts the calls generated so
    far; `labels` are the incidents'."""

    scenario: Scenario
    part_s: float = PART_S
    calls: int = 0
    labels: list[Label] = field(default_factory=list)

    def __iter__(self) -> Iterator[list[CallEvent]]:
        scenario = self.scenario
        start = scenario.start.timestamp()
        incident_calls, self.labels = _incidents(scenario)
        incident_calls.sort(key=lambda call: call.start)
        benign = iter_benign(
            scenario.benign, start, scenario.duration, random.Random(f"{scenario.seed}:benign")
        )
        following = next(benign, None)
        incident = 0
        # Reports at or after the part's end, of calls that started before it.
        later: list[CallEvent] = []
        part_end = start
        while following is not None or incident < len(incident_calls) or later:
            part_end += self.part_s
            events = later
            # Every call that starts before the part's end: a report of one that starts
            # after it is no earlier than that start (reports are rounded to the
            # millisecond, as a part's end is when the scenario starts on one).
            while following is not None and following.start < part_end:
                events.extend(following.reports())
                self.calls += 1
                following = next(benign, None)
            while incident < len(incident_calls) and incident_calls[incident].start < part_end:
                events.extend(incident_calls[incident].reports())
                self.calls += 1
                incident += 1
            events.sort(key=_event_order)
            cut = bisect.bisect_left(events, part_end, key=lambda event: event.ts)
            later = events[cut:]
            if cut:
                yield events[:cut]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def _iso_column(times: list[float]) -> pl.Series:
    """`_iso` of each time, made by polars (several times faster): to the nearest
    microsecond, then the milliseconds written as they are, as isoformat does."""
    micros = (pl.Series(times, dtype=pl.Float64) * 1e6).round().cast(pl.Int64)
    return micros.cast(pl.Datetime("us", "UTC")).dt.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z")


def events_frame(events: list[CallEvent]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": _iso_column([e.ts for e in events]),
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
    return _write(iter([generated.events]), generated.labels, directory, fmt)


def write_parts(parts: Parts, directory: Path, fmt: str = "csv") -> tuple[Path, Path]:
    """`write_files` for a scenario generated a part at a time: each part written as it
    comes (a row group of the Parquet file, a run of lines of the others), so a
    month of traffic is written holding a day's."""
    return _write(iter(parts), parts, directory, fmt)


def _write(
    parts: Iterator[list[CallEvent]],
    labels: list[Label] | Parts,
    directory: Path,
    fmt: str,
) -> tuple[Path, Path]:
    if fmt not in ("csv", "parquet", "jsonl"):
        raise ValueError(f"unknown event file format {fmt!r} (csv, parquet or jsonl)")
    directory.mkdir(parents=True, exist_ok=True)
    events_path = directory / f"events.{fmt}"
    writer: pq.ParquetWriter | None = None
    with events_path.open("wb") as handle:
        first = True
        for events in itertools.chain(parts, [[]]):
            if not events and not first:
                continue
            frame = events_frame(events)
            if fmt == "csv":
                frame.write_csv(handle, include_header=first)
            elif fmt == "jsonl":
                frame.write_ndjson(handle)
            else:
                table = frame.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema, compression="zstd")
                if events or first:
                    # Row groups of a replay's part: reading one decodes no more.
                    writer.write_table(table, row_group_size=PART_ROWS)
            first = False
        if writer is not None:
            writer.close()
    labels_path = directory / "labels.jsonl"
    with labels_path.open("w", encoding="utf-8") as handle:
        for label in labels if isinstance(labels, list) else labels.labels:
            handle.write(json.dumps(label.as_json(), ensure_ascii=False) + "\n")
    return events_path, labels_path
