"""The lake writer: sealed journal segments -> decoded reports -> Parquet lake.

It runs in a process of its own beside the receiver (`serve`), so decoding,
Parquet and compaction never hold the receiver's interpreter lock; `replay`
runs the same code inline. A segment is deleted only after its Parquet files
are durable; a crash in between is repaired on the next start (the segment's
partial files are dropped and written again), so every report lands once.

At its start it prepares the lake (placeholders, interrupted compactions), rebuilds
the key file the receiver recovers from (engine.ingest.keyfile) and publishes the
analysts' views; after each lake write, before the journal segment goes, it puts
the segment's keys in the key file.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from engine.core.events import CHECK_CALL_ID_PREFIX, CallEvent, CallState, Reject
from engine.core.positions import Position
from engine.core.yamlfile import YamlFileError
from engine.detect.alerts import Alert, AlertSink
from engine.detect.bounds import evictions
from engine.detect.calls import call_columns
from engine.ingest.codec import Codec
from engine.ingest.journal import (
    DATAGRAMS,
    TICK,
    Frame,
    fsync_dir,
    read_segment,
    sealed_path,
    sealed_segments,
    segment_number,
    tick_of,
)
from engine.ingest.keyfile import RecentKeys, StoredKey, key_file_path
from engine.ingest.records import Item, item_of
from engine.ingest.senders import SenderDirectory
from engine.ingest.stats import COUNTERS, SharedCounters
from engine.ingest.store import codec_of
from engine.lake.parquet import (
    ALERT_SCHEMA,
    CALL_SCHEMA,
    ESCALATION_SCHEMA,
    Lake,
    storage_errors,
)

# A report's time, and its key with its time (a StoredKey), read in C.
_TS = operator.attrgetter("ts")
_KEY_AND_TS = operator.attrgetter("call_id", "serial", "ts")

# Detection's rules, models and state are imported where a pipeline is given: replay's
# parent process, whose detection runs in a process of its own, never loads them.
if TYPE_CHECKING:
    from engine.detect.pipeline import Output, Pipeline
    from engine.detect.rules import RuleSet

log = logging.getLogger(__name__)


class Outage:
    """One kind of the lake writer's work while the file system fails it (a full disk):
    said once when it starts failing and once when it works again, and tried again
    only after a pause that doubles from `first_pause_s` to `max_pause_s` (`due`), so
    a disk that stays full costs a line, not a loop of them."""

    def __init__(
        self,
        what: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        first_pause_s: float = 1.0,
        max_pause_s: float = 5.0,
    ) -> None:
        self.what = what
        self.clock = clock
        self.first_pause_s = first_pause_s
        self.max_pause_s = max_pause_s
        # When this outage started (None: the work works), and its failures so far.
        self.since: float | None = None
        self.failures = 0
        self.pause_s = 0.0
        self._retry_at = 0.0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """Whether to try now: always while it works, after the pause while it fails."""
        return self.since is None or self.clock() >= self._retry_at

    def failed(self, error: Exception, meanwhile: str) -> None:
        now = self.clock()
        if self.since is None:
            self.since = now
            self.failures = 0
            self.pause_s = self.first_pause_s
            log.error(
                "%s failed (%s: %s); %s; trying again, and saying so once it works",
                self.what,
                type(error).__name__,
                error,
                meanwhile,
            )
        else:
            self.pause_s = min(2 * self.pause_s, self.max_pause_s)
        self.failures += 1
        self._retry_at = now + self.pause_s

    def worked(self) -> None:
        if self.since is None:
            return
        log.warning(
            "%s works again (%d failed tries in %.0f s)",
            self.what,
            self.failures,
            self.clock() - self.since,
        )
        self.since = None


@dataclass
class DrainResult:
    segments: int = 0
    reports: int = 0
    rejects: list[Reject] | None = None
    alerts: list[Alert] = field(default_factory=list)
    calls: int = 0


# A decoded segment, step by step: batches of reports, and ticks (event time moving on).
Step = tuple[int, list[Item]] | float

_IS_CHECK = operator.itemgetter(CallEvent._fields.index("check"))


def without_checks(items: list[Item]) -> list[Item]:
    """The items detection sees: all but deployment checks (stored apart, in `checks`,
    and never detected on)."""
    if set(map(type, items)) == {CallEvent} and not any(map(_IS_CHECK, items)):
        return items  # the usual batch: reports only, no check among them
    return [item for item in items if type(item) is not CallEvent or not item.check]


@dataclass
class DetectedSegment:
    """A segment decoded and run through detection, waiting for its lake write:
    its reports, and the calls (columns, see `call_columns`) and alerts they made."""

    steps: list[Step]
    calls: dict[str, list[Any]]
    alerts: list[Alert]

    @property
    def call_count(self) -> int:
        return len(self.calls["call_id"])


def calls_frame(columns: dict[str, Any]) -> pl.DataFrame:
    """The calls table from `call_columns` (texts as lists, numbers as doubles with
    NaN for unknown, times in epoch seconds)."""
    series = []
    for name, dtype in CALL_SCHEMA.items():
        values = columns[name]
        if dtype == pl.String:
            series.append(pl.Series(name, values, pl.String))
            continue
        numbers = pl.Series(name, values, pl.Float64).fill_nan(None)
        if dtype == pl.Datetime("us", "UTC"):
            # As the events table's times: microseconds, rounded half to even.
            numbers = (numbers * 1_000_000).round().cast(pl.Int64).cast(dtype)
        series.append(numbers.cast(dtype))
    return pl.DataFrame(series)


def alerts_frame(alerts: Sequence[Alert], table: dict[str, Any] = ALERT_SCHEMA) -> pl.DataFrame:
    """The rows of `table` (the alerts' columns, or the escalations') from alerts."""
    times = ("window_start", "window_end", "raised_at", "escalated_at")
    data: dict[str, list[Any]] = {name: [] for name in table}
    for alert in alerts:
        for name in table:
            value = getattr(alert, name)
            data[name].append(round(value * 1_000_000) if name in times else value)
    schema = {name: (pl.Int64 if name in times else dtype) for name, dtype in table.items()}
    return pl.DataFrame(data, schema=schema).with_columns(
        pl.col(name).cast(pl.Datetime("us", "UTC")) for name in times if name in table
    )


def alert_frames(alerts: Sequence[Alert]) -> dict[str, pl.DataFrame]:
    """The lake tables detection's alerts go to: alerts of rules in alert mode, those of
    rules in shadow mode, and the escalations of alerts (in alert mode: a shadow
    rule's escalation is not stored, as it notifies no one)."""
    raised = [a for a in alerts if not a.escalation]
    return {
        "alerts": alerts_frame([a for a in raised if a.mode == "alert"]),
        "shadow_alerts": alerts_frame([a for a in raised if a.mode != "alert"]),
        "alert_escalations": alerts_frame(
            [a for a in alerts if a.escalation and a.mode == "alert"], ESCALATION_SCHEMA
        ),
    }


class CallSink(Protocol):
    """Where a segment's finished calls go after its lake write (NATS, through the
    outbox); as a durable sink, it must accept a repeat after a crash."""

    def deliver_calls(self, columns: dict[str, Any]) -> None: ...


class LakeWriter:
    def __init__(
        self,
        data_dir: Path,
        *,
        compact_target_bytes: int = 64 * 1024 * 1024,
        counters: SharedCounters | None = None,
        pipeline: Pipeline | None = None,
        sinks: Sequence[AlertSink] = (),
        durable_sinks: Sequence[AlertSink] = (),
        call_sinks: Sequence[CallSink] = (),
        snapshots: bool = True,
        dedup_horizon_s: float = 3600.0,
        max_dedup_keys: int | None = None,
        keys_ready: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        release: Callable[[Path], None] | None = None,
        senders: SenderDirectory | None = None,
        publish_views: bool = True,
    ) -> None:
        """Starts the lake writer's work on `data_dir`: the caller holds its lock
        (`lake_writer_lock`), or is the only process on the data dir. `release` takes a
        sealed segment once it is in the lake (default: delete it; serve with relay
        targets hands it to the relay, which deletes it once every target has it).
        `senders`: the switch names and check senders (none named, none allowed to send
        checks).

        `durable_sinks` (the outbox) take a segment's alerts after its lake write and
        before its journal segment goes: a crash in between runs the segment through
        detection again, and they take the same alerts again (they must accept a
        repeat). A failure there (an OSError) fails the write like a full disk.
        `call_sinks` take a segment's calls at the same moment, on the same terms.
        `publish_views`: write the analysts' views file now (False: the caller does,
        from `lake.view_statements()`, as replay does in a process of its own)."""
        self.data_dir = data_dir
        self.senders = senders if senders is not None else SenderDirectory({})
        self.lake = Lake(data_dir)
        self.journal_dir = data_dir / "journal"
        self._release = release or Path.unlink
        self.compact_target_bytes = compact_target_bytes
        self.counters = counters
        self.pipeline = pipeline
        self.sinks = list(sinks)
        self.durable_sinks = list(durable_sinks)
        self.call_sinks = list(call_sinks)
        # Detection must see each report once: a segment whose lake write failed is
        # kept here, already run through the pipeline, and written again as it is.
        self._decoded: dict[int, DetectedSegment] = {}
        self._lock = threading.Lock()
        # Compaction and retention run on the scheduler's threads: one at a time.
        self._housekeeping = threading.Lock()
        # Each kind of work a failing file system (a full disk) stops, said once.
        self.writes = Outage("lake write", clock=clock)
        self.compactions = Outage("compaction", clock=clock)
        self.expiries = Outage("retention", clock=clock)
        self.snapshots = Outage("detection snapshot", clock=clock)
        # Segments whose reports the caller still holds decoded (replay): no need to
        # read them back from the journal.
        self._primed: dict[int, list[Step]] = {}
        self.position = Position(0, 0)
        self._snapshots = snapshots
        self.snapshot_file: Path | None = None
        self.lake.prepare()
        # Before the restore: its catch-up feeds detection what the lake holds already.
        self.settle()
        self.keys = RecentKeys(key_file_path(data_dir), dedup_horizon_s, max_dedup_keys)
        with self.lake.sharing():
            self.rebuild_keys()
            if keys_ready is not None:
                # The receiver waits for the key file, not for detection's state.
                keys_ready()
            if publish_views:
                self.lake.publish_views()
            if pipeline is not None:
                self.attach(pipeline)

    def attach(self, pipeline: Pipeline) -> None:
        """Detect with `pipeline`, its state restored from the data dir's snapshot (and
        the lake's reports after it): at the start, or later where detection could not
        run elsewhere as planned (replay)."""
        from engine.detect.snapshotfile import snapshot_path

        self.pipeline = pipeline
        if self._snapshots:
            self.snapshot_file = snapshot_path(self.data_dir)
            with self.lake.sharing():
                self._restore(self.snapshot_file)

    def _journaled(self) -> list[int]:
        numbers = map(segment_number, sealed_segments(self.journal_dir))
        return [n for n in numbers if n is not None]

    def settle(self) -> None:
        """Put right what a crash left between the lake and the journal: the lake files
        of a segment still in the journal may be partial, and are written again from
        it, so they go now (and detection's catch-up does not see their reports
        twice). A group (`write_group`) lets its journal segments go once every file
        is durable, the last segment first and alone: with that one gone the group
        is whole and the rest of its segments go too; with it there, the group's
        files go and its segments are written again."""
        journaled = set(self._journaled())
        if not journaled:
            return
        for first, last in self.lake.groups():
            if last in journaled:
                log.info("lake files of segments %d-%d may be partial: written again", first, last)
                self.lake.drop_group(first, last)
                continue
            done = [n for n in range(first, last) if n in journaled]
            for number in done:
                sealed_path(self.journal_dir, number).unlink()
                journaled.discard(number)
            if done:
                fsync_dir(self.journal_dir)
        for number in sorted(journaled):
            self.lake.drop_segment(number)

    def rebuild_keys(self) -> None:
        """Write the key file afresh from what the lake holds (after `settle`: the lake
        then holds no segment that is still in the journal)."""
        max_seq = max_ts_us = None
        keys: list[StoredKey] = []
        # A new data dir (its lake holding placeholders only) reads no file.
        stored = self.lake.report_keys() if self.lake.holds_reports() else None
        if stored is not None:
            max_seq, max_ts_us = stored.select(pl.max("seq"), pl.max("ts_us")).collect().row(0)
            since_us = (max_ts_us or 0) - round(self.keys.horizon_s * 1_000_000)
            newest = stored.filter(
                pl.col("ts_us") >= since_us,
                pl.col("call_id").is_not_null(),
                pl.col("serial").is_not_null(),
            ).sort("ts_us", descending=True)
            # The newest store.max_dedup_keys only: the receiver holds no more.
            if self.keys.max_keys is not None:
                newest = newest.head(self.keys.max_keys)
            keys = [
                (call_id, serial, us / 1_000_000)
                for call_id, serial, us in newest.select("call_id", "serial", "ts_us")
                .collect()
                .iter_rows()
            ]
            keys.reverse()
        self.keys.reset(
            self.lake.highest_segment(), max_seq or 0, (max_ts_us or 0) / 1_000_000, keys
        )

    def _remember_keys(self, segment: int, batches: list[tuple[int, list[Item]]]) -> None:
        """Put the keys of reports just written to the lake in the key file; before their
        journal segments go, so a restarting receiver finds each in one or the other."""
        keys: list[StoredKey] = []
        max_seq = 0
        max_ts = 0.0
        for first_seq, items in batches:
            if not items:
                continue
            max_seq = max(max_seq, first_seq + len(items) - 1)
            max_ts = max(max_ts, max(map(_TS, items)))
            if set(map(type, items)) == {CallEvent}:
                # (call_id, serial, ts) of each, made in C.
                keys.extend(map(_KEY_AND_TS, items))
                continue
            for item in items:
                key = item.key
                if key is not None:
                    keys.append((key[0], key[1], item.ts))
        self.keys.add(segment, max_seq, max_ts, keys)

    def _restore(self, path: Path) -> None:
        from engine.detect.snapshot import restore_into

        assert self.pipeline is not None
        restored = restore_into(self.pipeline, path)
        if restored is None:
            return
        position, count = restored
        self.position = position
        caught_up = self._catch_up(position.seq)
        log.info(
            "detection state restored from %s (up to report %d; %d rules and models; "
            "%d later reports from the lake fed again)",
            path.name,
            position.seq,
            count,
            caught_up,
        )

    def _catch_up(self, after_seq: int) -> int:
        """Reports the lake took after the snapshot (a crash between snapshots) go
        through detection again so its state is whole; what they raised is already
        in the lake, so the output is dropped."""
        assert self.pipeline is not None
        import duckdb  # Lake.query's

        try:
            rows = self.lake.query(
                "SELECT seq, epoch_us(ts), call_id, serial, state, code, caller, callee, "
                "forward, menu_id, menu_name, source, switch FROM events WHERE seq > ? "
                "ORDER BY seq",
                [after_seq],
            )
        except duckdb.Error as error:
            log.error("could not read the lake to catch detection up: %s", error)
            return 0
        events = [
            CallEvent(us / 1e6, call_id, serial, CallState(state), code, *rest)
            for _, us, call_id, serial, state, code, *rest in rows
        ]
        self.pipeline.feed(events)
        if rows:
            self.position = Position(self.position.segment, rows[-1][0])
        return len(events)

    def snapshot(self) -> bool:
        """Save detection state between segments (see engine.detect.snapshot)."""
        if self.pipeline is None or self.snapshot_file is None:
            return False
        from engine.detect.snapshot import save as snapshot_save
        from engine.detect.state import Snapshot

        with self._lock:
            if self._decoded:
                return False  # a segment is detected but not yet in the lake: next time
            started = time.monotonic()
            snapshot = Snapshot(self.position, self.pipeline.state(), time.time())
            try:
                size = snapshot_save(self.snapshot_file, snapshot)
            except OSError as error:
                self.snapshots.failed(error, "the previous one stays")
                return False
        self.snapshots.worked()
        log.info(
            "detection state saved (%.1f MiB in %.1f s, up to report %d)",
            size / 2**20,
            time.monotonic() - started,
            self.position.seq,
        )
        return True

    def _count(self, name: str, value: int = 1) -> None:
        if self.counters is not None:
            self.counters.add(name, value)

    def prime(self, segment: int, steps: list[Step]) -> None:
        """Hand over the decoded content of a segment just sealed (exactly what
        `decode_segment` would read back from it)."""
        self._primed[segment] = steps

    def decode_segment(self, path: Path) -> list[Step]:
        segment = read_segment(path)
        if segment.problem is not None:
            # The receiver seals only whole frames; a problem here is damage after the fact.
            log.error("journal %s: %s; reading the frames before it", path.name, segment.problem)
        codec = codec_of(segment.header)
        steps: list[Step] = []
        for frame in segment.frames:
            if frame.kind == DATAGRAMS:
                items = self._decode_datagrams(codec, frame)
            elif frame.kind == TICK:
                steps.append(tick_of(frame))
                continue
            else:
                items = [item_of(record) for record in frame.records()]
            steps.append((frame.first_seq, items))
        return steps

    def _decode_datagrams(self, codec: Codec, frame: Frame) -> list[Item]:
        """A frame's datagrams decoded, each with the switch its sender is named as;
        a check from a check sender marked as one (engine.ingest.senders). A frame's
        datagrams come from a few senders: each is looked up once per frame."""
        decode, sender_of = codec.decode, self.senders.of
        switches: dict[str, str] = {}
        check_senders: set[str] = set()
        items: list[Item] = []
        append = items.append
        for ts, source, raw in frame.datagrams():
            switch = switches.get(source)
            if switch is None:
                sender = sender_of(source)
                switch = switches[source] = sender.switch
                if sender.checks:
                    check_senders.add(source)
            append(decode(raw, ts, source, switch)[0])
        if check_senders:
            for index, item in enumerate(items):
                if (
                    type(item) is CallEvent
                    and item.source in check_senders
                    and item.call_id.startswith(CHECK_CALL_ID_PREFIX)
                ):
                    items[index] = item._replace(check=True)
        return items

    def _detect(self, steps: list[Step]) -> Output:
        from engine.detect.pipeline import Output

        output = Output()
        if self.pipeline is None:
            return output
        for step in steps:
            if isinstance(step, float):
                output.extend(self.pipeline.advance(step))
            else:
                output.extend(self.pipeline.feed(without_checks(step[1])))
        return output

    def drain(self, collect_rejects: bool = False) -> DrainResult:
        """Write every sealed segment to the lake, oldest first, with what detection made of it."""
        result = DrainResult(rejects=[] if collect_rejects else None)
        # One segment detected, then written, then the next: what is held decoded is a
        # segment's, however far behind the writer is (a backlog of millions).
        for number, path, written in self._detect_each():
            self.write_detected(number, path, written, result)
        return result

    def detect_sealed(
        self, exclude: Container[int] = ()
    ) -> list[tuple[int, Path, DetectedSegment]]:
        """Run every sealed segment not yet detected through detection, oldest first;
        each stays held (`_decoded`) until `write_detected` has put it in the lake.
        `exclude`: segments already handed to `write_detected` (being written)."""
        return list(self._detect_each(exclude))

    def _detect_each(
        self, exclude: Container[int] = ()
    ) -> Iterator[tuple[int, Path, DetectedSegment]]:
        """`detect_sealed`, a segment at a time as the caller asks for the next."""
        for path in sealed_segments(self.journal_dir):
            number = segment_number(path)
            assert number is not None
            if number in exclude:
                continue
            with self._lock:
                written = self._decoded.get(number)
                if written is None:
                    primed = self._primed.pop(number, None)
                    steps = primed if primed is not None else self.decode_segment(path)
                    output = self._detect(steps)
                    written = self.hold(number, steps, call_columns(output.calls), output.alerts)
            yield number, path, written

    def hold(
        self, number: int, steps: list[Step], calls: dict[str, list[Any]], alerts: list[Alert]
    ) -> DetectedSegment:
        """Keep a detected segment until `write_detected` (detection must see each report
        once: a segment whose lake write fails is written again as it is), and move the
        position detection has reached past it."""
        written = self._decoded[number] = DetectedSegment(steps, calls, alerts)
        self.position = self.position_after([(number, steps)])
        return written

    def position_after(self, segments: list[tuple[int, list[Step]]]) -> Position:
        """Where detection will be once it has seen these segments, in order."""
        position = self.position
        for number, steps in segments:
            last_seq = max(
                (s[0] + len(s[1]) - 1 for s in steps if not isinstance(s, float) and s[1]),
                default=position.seq,
            )
            position = Position(number, max(last_seq, position.seq))
        return position

    def write_detected(
        self, number: int, path: Path, written: DetectedSegment, result: DrainResult
    ) -> None:
        """Put one detected segment in the lake, then let its journal segment go.
        Segments must be written in the order `detect_sealed` gave them."""
        batches = [step for step in written.steps if not isinstance(step, float)]
        alerts = written.alerts
        derived = {"calls": calls_frame(written.calls), **alert_frames(alerts)}
        # A crash may have left part of this segment's Parquet; write it whole again.
        self.lake.drop_segment(number)
        reports = self.lake.write_segment(number, batches, derived)
        self._hand_over(alerts)
        if written.call_count:
            for call_sink in self.call_sinks:
                call_sink.deliver_calls(written.calls)
        self._remember_keys(number, batches)
        self._release(path)
        with self._lock:
            del self._decoded[number]
        self._written(alerts, batches, reports, written.call_count, result, segments=1)

    def write_group(
        self,
        segments: list[tuple[int, list[Step]]],
        detected: Callable[[], tuple[dict[str, list[Any]], list[Alert]]],
        result: DrainResult,
    ) -> None:
        """Replay's lake write: journal segments just sealed, in order, written to the
        lake as one group (Lake.write_group), their reports while detection works
        on them, then what `detected` returns for each segment in turn (its
        calls as columns, and alerts), then the journal segments go. One write
        for many segments instead of one each and a compaction after: compaction
        re-encoded every row at the end of a replay, when nothing else was left."""
        first, last = segments[0][0], segments[-1][0]
        batches = [step for _, steps in segments for step in steps if not isinstance(step, float)]
        reports = self.lake.write_group(first, last, batches)
        held: list[DetectedSegment] = []
        calls: list[pl.DataFrame] = []
        for number, steps in segments:
            columns, alerts = detected()
            held.append(self.hold(number, steps, columns, alerts))
            # Framed now, while detection works on the next segment.
            calls.append(calls_frame(columns))
        alerts = [alert for segment in held for alert in segment.alerts]
        self.lake.write_group(
            first,
            last,
            [],
            {"calls": pl.concat(calls), **alert_frames(alerts)},
        )
        self._hand_over(alerts)
        self._remember_keys(last, batches)
        # The last segment first and on its own: gone, it says the group is whole.
        sealed_path(self.journal_dir, last).unlink()
        fsync_dir(self.journal_dir)
        for number, _ in segments[:-1]:
            sealed_path(self.journal_dir, number).unlink()
        fsync_dir(self.journal_dir)
        with self._lock:
            for number, _ in segments:
                del self._decoded[number]
        call_count = sum(segment.call_count for segment in held)
        self._written(alerts, batches, reports, call_count, result, segments=len(segments))

    def _hand_over(self, alerts: list[Alert]) -> None:
        if alerts:
            for sink in self.durable_sinks:
                sink.deliver(alerts)

    def _written(
        self,
        alerts: list[Alert],
        batches: list[tuple[int, list[Item]]],
        reports: int,
        calls: int,
        result: DrainResult,
        *,
        segments: int,
    ) -> None:
        """What follows a lake write: sinks, the result, counters, rejects."""
        for sink in self.sinks:
            try:
                sink.deliver(alerts)
            except OSError as error:
                log.error("alert sink %s failed: %s", type(sink).__name__, error)
        result.segments += segments
        result.reports += reports
        result.calls += calls
        result.alerts.extend(alerts)
        self._count("flushed", reports)
        self._count("flushed_segments", segments)
        self._count("calls", calls)
        self._count("alerts", sum(1 for a in alerts if a.mode == "alert" and not a.escalation))
        if self.pipeline is not None and self.counters is not None:
            evicted = evictions(self.pipeline)
            self.counters.array[COUNTERS.index("evicted_keys")] = evicted.keys
            self.counters.array[COUNTERS.index("evicted_calls")] = evicted.calls
        for _, items in batches:
            for item in items:
                if type(item) is not CallEvent:
                    reject: Reject = item  # type: ignore[assignment]
                    self._count(f"rejected_{reject.reason.value}")
                    if result.rejects is not None:
                        result.rejects.append(reject)

    def reload_rules(self, load: Callable[[], RuleSet]) -> bool:
        """Load the rule and model files again (`load` raises YamlFileError listing
        every problem); swap them in whole only if every file is valid."""
        if self.pipeline is None:
            return False
        try:
            rules = load()
        except YamlFileError as error:
            log.error(
                "rules not reloaded, the running rules stay:\n  %s",
                "\n  ".join(error.problems),
            )
            return False
        from engine.detect.conduct import CONDUCT_KEPT

        with self._lock:
            kept = self.pipeline.swap_rules(rules)
        rule_ids = {rule.id for rule in rules.rules}
        kept_rules = sum(1 for kept_id in kept if kept_id in rule_ids)
        # The callers' conduct is neither a rule nor a model.
        kept_conduct = CONDUCT_KEPT in kept
        log.info(
            "rules reloaded: %d rules and %d models; unchanged, and keeping what they "
            "learned: %d rules and %d models%s",
            len(rules.rules),
            len(rules.models),
            kept_rules,
            len(kept) - kept_rules - kept_conduct,
            ", and the callers' conduct" if kept_conduct else "",
        )
        return True

    def drain_logged(self, *, last: bool = False) -> None:
        """`drain` for the lake writer's loop. A lake write the file system fails (a
        full disk) is counted (`flush_failures`), said once, and tried again after a
        pause (`Outage`). The journal keeps the segment meanwhile, and detection does
        not see it again: it stays held as detected (`_decoded`) and is written as it
        is, before any later segment, once the write works. `last`: the pass before
        the process exits, tried whatever the pause (room may be back)."""
        if not (last or self.writes.due()):
            return
        try:
            self.drain()
        except storage_errors() as error:
            self._count("flush_failures")
            self.writes.failed(error, "the journal keeps the reports")
            return
        self.writes.worked()

    def expire(self, retention_days: int) -> None:
        """Retention: wall-clock housekeeping, like compaction (detection is unaffected)."""
        if retention_days <= 0:
            return
        before = datetime.now(UTC).date() - timedelta(days=retention_days)
        try:
            with self._housekeeping:
                removed = self.lake.expire(before)
        except storage_errors() as error:
            self.expiries.failed(error, "old days stay until it works")
            return
        self.expiries.worked()
        if removed:
            log.info("retention: removed %d day partitions before %s", len(removed), before)

    def compact(self) -> None:
        try:
            with self._housekeeping:
                # Listed before the lake's files (see Lake.compact): a segment whose
                # files are written meanwhile is still in this list.
                journaled = self._journaled()
                result = self.lake.compact(self.compact_target_bytes, journaled)
        except storage_errors() as error:
            self.compactions.failed(error, "the segments stay as they are, each row once")
            return
        self.compactions.worked()
        if result.written_files:
            self._count("compacted_files", result.merged_files)
            log.info(
                "compacted %d segments into %d files", result.merged_files, result.written_files
            )
