"""What the console reads: the lake's Parquet files through a private in-memory DuckDB
(never the analysts' `callsentry.duckdb`, never a write lock), so the console runs
beside a live `serve` and its lake writer and cannot block them. The views re-list the
lake's files at every query: an alert written a second ago is in the next page.

The pages read `alerts_current` often and its files seldom change, so the view keeps
it as an in-memory table, made again whenever a file of `alerts`, `alert_reviews` or
`alert_assignments` appears, goes or changes (a listing of their folders, taken
before the table is made: a file written meanwhile makes the next request build it
again). A review the console itself records is therefore in the very next page.

Every value here is returned as stored; escaping is the page's (Jinja2 autoescape) or
the terminal's (engine.core.text.shown) business.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import yaml

from engine.console.tariffs import TariffList, e164_query
from engine.core.durations import parse_duration
from engine.detect.numbers import NumberPlan
from engine.lake.parquet import ALERT_SCHEMA, Lake
from engine.lake.review_status import STATUSES

log = logging.getLogger("callsentry.console")

SEVERITIES = ("critical", "high", "medium", "low")
# The tables `alerts_current` is made of.
CURRENT_TABLES = ("alerts", "alert_reviews", "alert_assignments")
ENTITY_TYPES = ("caller", "callee", "forward", "menu")
# The calls column an entity of each type is found in.
ENTITY_COLUMN = {"caller": "caller", "callee": "callee", "forward": "forward", "menu": "menu_id"}
_RANK = (
    "CASE severity "
    + " ".join(f"WHEN '{name}' THEN {rank}" for rank, name in enumerate(SEVERITIES))
    + f" ELSE {len(SEVERITIES)} END"
)

# The `alerts` columns, then what `alerts_current` adds of the latest review and assignment.
ALERT_COLUMNS = (*ALERT_SCHEMA, "status", "review_note", "reviewer", "reviewed_at", "assignee")
QUEUE_COLUMNS = tuple(c for c in ALERT_COLUMNS if c != "evidence")
# What the queue page shows of each alert (fewer times to convert: a page is quicker).
QUEUE_PAGE_COLUMNS = (
    "alert_id",
    "rule_id",
    "severity",
    "entity_type",
    "entity",
    "raised_at",
    "summary",
    "status",
    "assignee",
)
CALL_COLUMNS = (
    "call_id",
    "started_at",
    "caller",
    "callee",
    "forward",
    "menu_id",
    "menu_name",
    "outcome",
    "ring_s",
    "talk_s",
)


# The tables an alert's exposure is made of.
EXPOSURE_TABLES = ("alerts", "calls")
# The queue's orders: severity then newest (the default), or estimated exposure.
SORTS = ("severity", "exposure")


class LakeViewError(Exception):
    """The data dir's lake cannot be read; the message says which and why."""


@dataclass(frozen=True)
class QueueFilter:
    """The queue's filters, as the page's URL and the API's query give them."""

    status: str = "open"  # a status, or "all"
    severities: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    entity: str = ""
    assignee: str = ""  # a name, "-" for nobody, "" for anyone
    since: datetime | None = None
    until: datetime | None = None

    def where(self, *, with_status: bool = True) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if with_status and self.status != "all":
            clauses.append("status = ?")
            params.append(self.status)
        if self.severities:
            clauses.append("list_contains(?, severity)")
            params.append(list(self.severities))
        if self.rules:
            clauses.append("list_contains(?, rule_id)")
            params.append(list(self.rules))
        if self.entity:
            clauses.append("entity = ?")
            params.append(self.entity)
        if self.assignee == "-":
            clauses.append("assignee IS NULL")
        elif self.assignee:
            clauses.append("assignee = ?")
            params.append(self.assignee)
        if self.since is not None:
            clauses.append("raised_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("raised_at < ?")
            params.append(self.until)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


@dataclass(frozen=True)
class RuleText:
    rule_id: str
    path: Path
    text: str
    mode: str
    title: str
    severity: str
    window_s: int | None  # the aggregate's window, when the file gives one


@dataclass
class RuleBook:
    """The rule files' text by rule id, for the alert and rules pages (read as YAML
    only to find each file's id: the engine's loader judges them, not the console)."""

    folder: Path | None
    rules: dict[str, RuleText] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path | None) -> RuleBook:
        book = cls(folder)
        if folder is None or not folder.is_dir():
            return book
        for path in sorted(folder.rglob("*.yaml")):
            try:
                text = path.read_text(encoding="utf-8")
                document = yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            if not isinstance(document, dict) or not isinstance(document.get("id"), str):
                continue
            aggregate = document.get("aggregate")
            window = aggregate.get("window") if isinstance(aggregate, dict) else None
            try:
                window_s: int | None = int(parse_duration(str(window))) if window else None
            except ValueError:
                window_s = None
            book.rules[document["id"]] = RuleText(
                document["id"],
                path,
                text,
                str(document.get("mode", "alert")),
                str(document.get("title", "")),
                str(document.get("severity", "")),
                window_s,
            )
        return book


class LakeView:
    """Read-only queries over one data dir's lake, shared by the console's threads
    (each query on its own cursor of one in-memory database holding the views)."""

    def __init__(self, data_dir: Path, exposure_max_age_s: float = 30.0) -> None:
        self.lake = Lake(data_dir)
        self.exposure_max_age_s = exposure_max_age_s
        if not (self.lake.root / "alerts").is_dir():
            raise LakeViewError(f"{data_dir} has no alerts yet (is it callsentry's data dir?)")
        # The views are made once: a table a writer of an older release never prepared
        # would stay an empty view even after the console wrote to it, so it is
        # prepared now (a console without write access reads it as empty).
        with contextlib.suppress(OSError):
            self.lake.prepare_table("alert_assignments")
        self._con = duckdb.connect()
        self._lock = threading.Lock()
        self._rule_ids: tuple[float, list[str]] | None = None
        self._refresh_lock = threading.Lock()
        self._current_stamp: tuple[tuple[str, int, int], ...] | None = None
        # How many times `current_alerts` and `current_exposure` were made, and the pair
        # `priced_alerts` was last made from.
        self._current_made = 0
        self._exposure_made = 0
        self._priced_from: tuple[int, int] | None = None
        self.tariffs: TariffList | None = None
        self._plan = NumberPlan()
        self._exposure_lock = threading.Lock()
        self._exposure_stamp: tuple[tuple[str, int, int], ...] | None = None
        self._exposure_checked = -math.inf
        self._warming: threading.Thread | None = None
        try:
            # Times in UTC on every cursor, whatever the machine's zone.
            self._con.execute("SET GLOBAL TimeZone = 'UTC'")
            self.lake.create_views(self._con)
            self._refresh()
        except duckdb.Error as error:
            raise LakeViewError(
                f"cannot read the lake in {data_dir} (is it callsentry's data dir?): "
                f"{_first_line(error)}"
            ) from None

    def close(self) -> None:
        if self._warming is not None:
            self._warming.join()
        self._con.close()

    def _stamp(self, tables: Sequence[str] = CURRENT_TABLES) -> tuple[tuple[str, int, int], ...]:
        """What the files behind `tables` are now: path, mtime, size."""
        found = []
        for table in tables:
            for folder in sorted((self.lake.root / table).glob("day=*")):
                with contextlib.suppress(OSError):
                    for entry in os.scandir(folder):
                        if entry.name.endswith(".parquet"):
                            info = entry.stat()
                            found.append((entry.path, info.st_mtime_ns, info.st_size))
        return tuple(sorted(found))

    def _refresh(self) -> None:
        """`current_alerts` as `alerts_current` is now (and `current_reviews`,
        `current_assignments` as their tables are), made again if their files changed."""
        stamp = self._stamp()
        with self._refresh_lock:
            if stamp == self._current_stamp:
                return
            with self._lock:
                cursor = self._con.cursor()
            try:
                # One transaction: a page never sees one table new and another old.
                cursor.execute("BEGIN TRANSACTION")
                cursor.execute(
                    "CREATE OR REPLACE TABLE current_alerts AS "
                    f"SELECT *, {_RANK} AS severity_rank FROM alerts_current"
                )
                cursor.execute("CREATE OR REPLACE TABLE current_reviews AS FROM alert_reviews")
                cursor.execute(
                    "CREATE OR REPLACE TABLE current_assignments AS FROM alert_assignments"
                )
                cursor.execute("COMMIT")
            finally:
                cursor.close()
            self._current_stamp = stamp
            self._current_made += 1

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if "current_" in sql:
            try:
                self._refresh()
            except duckdb.Error as error:
                raise LakeViewError(f"cannot read the lake: {_first_line(error)}") from None
        with self._lock:
            cursor = self._con.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        except duckdb.Error as error:
            raise LakeViewError(f"cannot read the lake: {_first_line(error)}") from None
        finally:
            cursor.close()

    def dicts(
        self, columns: Sequence[str], sql: str, params: Sequence[Any] = ()
    ) -> list[dict[str, Any]]:
        return [dict(zip(columns, row, strict=True)) for row in self.rows(sql, params)]

    # -- exposure -----------------------------------------------------------------------

    def price_with(self, tariffs: TariffList, plan: NumberPlan, *, warm: bool = False) -> None:
        """Estimate each alert's exposure with `tariffs`, reading numbers by `plan`.
        `warm`: count every alert's exposure now, in a thread of its own (on a large
        lake that takes seconds: the console listens meanwhile, and a page sorted by
        exposure waits for it)."""
        with self._lock:
            cursor = self._con.cursor()
        try:
            cursor.execute(
                "CREATE OR REPLACE TABLE tariff_rates AS SELECT unnest(?::VARCHAR[]) AS prefix, "
                "unnest(?::DOUBLE[]) AS rate, unnest(?::VARCHAR[]) AS name",
                [
                    [t.prefix for t in tariffs.tariffs],
                    [t.rate for t in tariffs.tariffs],
                    [t.name for t in tariffs.tariffs],
                ],
            )
            cursor.execute(
                "CREATE OR REPLACE TABLE tariff_lengths AS "
                "SELECT DISTINCT length(prefix) AS digits FROM tariff_rates"
            )
        finally:
            cursor.close()
        self._plan = plan
        self.tariffs = tariffs
        self._exposure_stamp = None
        if warm:
            self._warming = threading.Thread(target=self._warm, name="exposure-warm", daemon=True)
            self._warming.start()

    def _warm(self) -> None:
        began = time.perf_counter()
        try:
            self._refresh_exposure(0.0)
        except duckdb.Error as error:
            log.error("console: cannot count the alerts' exposure: %s", _first_line(error))
            return
        log.info("console: exposure of the alerts counted in %.1f s", time.perf_counter() - began)

    def _legs_sql(self, evidence: str) -> str:
        """Each evidence call of `evidence` (a query of alert_id, call_id and the bounds
        its start lies in) found in `calls`, priced (`_priced_sql`). The start bounds
        are parameters, so DuckDB skips the row groups of other days."""
        return self._priced_sql(f"""
            SELECT e.alert_id, c.outcome = 'answered' AS answered, c.talk_s, c.forward,
                c.callee
            FROM ({evidence}) e JOIN calls c ON c.call_id = e.call_id
                AND c.started_at >= e.first AND c.started_at <= e.last
            WHERE c.started_at >= ?::TIMESTAMPTZ AND c.started_at <= ?::TIMESTAMPTZ""")

    def _priced_sql(self, calls: str) -> str:
        """The calls of `calls` (alert_id, answered, talk_s, forward, callee) with their
        answered minutes and the tariff their destination falls under (prefix NULL:
        unpriced). The destination is the forward number when the call was forwarded,
        else the callee (engine.console.tariffs says why)."""
        return f"""
            WITH legs AS (
                SELECT alert_id, answered,
                    CASE WHEN answered THEN coalesce(talk_s, 0) / 60.0 ELSE 0 END AS minutes,
                    CASE WHEN NOT answered THEN NULL
                        WHEN coalesce(forward, '') <> '' THEN forward
                        ELSE callee END AS number
                FROM ({calls})
            ),
            numbers AS ({e164_query("SELECT DISTINCT number FROM legs", self._plan)}),
            priced AS (
                SELECT n.number, arg_max(t.prefix, length(t.prefix)) AS prefix,
                    arg_max(t.rate, length(t.prefix)) AS rate,
                    arg_max(t.name, length(t.prefix)) AS name
                FROM numbers n CROSS JOIN tariff_lengths l
                JOIN tariff_rates t ON t.prefix = left(n.digits, l.digits)
                WHERE n.digits IS NOT NULL
                GROUP BY n.number
            )
            SELECT legs.alert_id, legs.answered, legs.minutes, priced.prefix, priced.rate,
                priced.name
            FROM legs LEFT JOIN priced USING (number)"""

    def _refresh_exposure(self, max_age_s: float) -> None:
        """`current_exposure` (alert_id, exposure, unpriced_minutes, settled) for every
        alert, brought up to date when a file of `alerts` or `calls` changed, looked
        for at most every `max_age_s`. Only the alerts not settled yet are counted
        again: an alert is settled once every evidence call is in `calls`, or a day
        after its window (a call still missing then is lost, not in progress); so a
        live lake writer's new files cost the recent alerts' recount, not all of them
        (the figures: bench/README.md, "Console")."""
        now = time.monotonic()
        if self._exposure_stamp is not None and now - self._exposure_checked < max_age_s:
            return
        with self._exposure_lock:
            if self._exposure_stamp is not None and now - self._exposure_checked < max_age_s:
                return
            stamp = self._stamp(EXPOSURE_TABLES)
            if stamp != self._exposure_stamp:
                with self._lock:
                    cursor = self._con.cursor()
                try:
                    self._count_exposure(cursor)
                finally:
                    cursor.close()
                self._exposure_stamp = stamp
            self._exposure_checked = time.monotonic()

    def _count_exposure(self, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS current_exposure (alert_id VARCHAR PRIMARY KEY, "
            "exposure DOUBLE, unpriced_minutes DOUBLE, settled BOOLEAN)"
        )
        cursor.execute(
            "CREATE OR REPLACE TEMP TABLE exposure_pending AS "
            "SELECT alert_id, evidence, window_start, window_end FROM alerts "
            "WHERE alert_id NOT IN (SELECT alert_id FROM current_exposure WHERE settled)"
        )
        first, last, newest = cursor.execute(
            "SELECT min(window_start) - INTERVAL 1 DAY, max(window_end), "
            "(SELECT max(started_at) FROM calls) FROM exposure_pending"
        ).fetchall()[0]
        if first is None:
            return
        legs = self._legs_sql(
            "SELECT alert_id, unnest(evidence) AS call_id, "
            "window_start - INTERVAL 1 DAY AS first, window_end AS last FROM exposure_pending"
        )
        # One transaction: a page never sees the recounted alerts missing.
        cursor.execute("BEGIN TRANSACTION")
        try:
            cursor.execute(
                "DELETE FROM current_exposure WHERE alert_id IN "
                "(SELECT alert_id FROM exposure_pending)"
            )
            cursor.execute(
                "INSERT OR REPLACE INTO current_exposure "
                "SELECT p.alert_id, coalesce(x.exposure, 0), coalesce(x.unpriced, 0), "
                "coalesce(x.found, 0) >= len(p.evidence) "
                "OR p.window_end < ?::TIMESTAMPTZ - INTERVAL 1 DAY "
                "FROM exposure_pending p LEFT JOIN ("
                "SELECT alert_id, sum(minutes * coalesce(rate, 0)) AS exposure, "
                "sum(minutes) FILTER (answered AND prefix IS NULL) AS unpriced, "
                f"count(*) AS found FROM ({legs}) GROUP BY alert_id) x USING (alert_id)",
                [newest, first, last],
            )
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._exposure_made += 1

    def _priced_alerts(self) -> None:
        """`priced_alerts`: `current_alerts` with each alert's exposure, made again when
        either table was. A page reads it alone: the join at every request was most
        of a queue page's time (bench/README.md, "Console")."""
        self._refresh()
        self._refresh_exposure(self.exposure_max_age_s)
        made = (self._current_made, self._exposure_made)
        if made == self._priced_from:
            return
        with self._refresh_lock:
            with self._lock:
                cursor = self._con.cursor()
            try:
                cursor.execute(
                    "CREATE OR REPLACE TABLE priced_alerts AS SELECT a.*, x.exposure, "
                    "x.unpriced_minutes FROM current_alerts a "
                    "LEFT JOIN current_exposure x USING (alert_id)"
                )
            finally:
                cursor.close()
            self._priced_from = made

    def exposure_of(self, calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The exposure of an alert's evidence `calls` (as `evidence` gives them) by
        tariff prefix (prefix None: the answered minutes no tariff covers), priced
        in DuckDB as the queue's are, without reading the lake again."""
        if self.tariffs is None:
            return []
        priced = self._priced_sql(
            "SELECT '' AS alert_id, unnest(?::VARCHAR[]) = 'answered' AS answered, "
            "unnest(?::DOUBLE[]) AS talk_s, unnest(?::VARCHAR[]) AS forward, "
            "unnest(?::VARCHAR[]) AS callee"
        )
        columns = ("prefix", "name", "rate", "calls", "minutes", "exposure")
        return self.dicts(
            columns,
            "SELECT prefix, any_value(name), any_value(rate), count(*), sum(minutes), "
            f"sum(minutes * coalesce(rate, 0)) FROM ({priced}) WHERE answered "
            "GROUP BY prefix ORDER BY 6 DESC, prefix NULLS LAST",
            [[c[key] for c in calls] for key in ("outcome", "talk_s", "forward", "callee")],
        )

    # -- the queue ----------------------------------------------------------------------

    def _ordered(
        self, columns: Sequence[str], chosen: QueueFilter, order: str, limit: int, sort: str
    ) -> list[dict[str, Any]]:
        where, params = chosen.where()
        if self.tariffs is not None:
            try:
                self._priced_alerts()
            except duckdb.Error as error:
                raise LakeViewError(f"cannot read the lake: {_first_line(error)}") from None
            return self.dicts(
                (*columns, "exposure", "unpriced_minutes"),
                f"SELECT {', '.join(columns)}, exposure, unpriced_minutes "
                f"FROM priced_alerts {where} "
                f"ORDER BY {'coalesce(exposure, 0) DESC, ' if sort == 'exposure' else ''}"
                f"{order} LIMIT {max(0, int(limit))}",
                params,
            )
        return self.dicts(
            columns,
            f"SELECT {', '.join(columns)} FROM current_alerts {where} "
            f"ORDER BY {order} LIMIT {max(0, int(limit))}",
            params,
        )

    def queue(
        self,
        chosen: QueueFilter,
        limit: int = 200,
        sort: str = "severity",
        columns: Sequence[str] = QUEUE_PAGE_COLUMNS,
    ) -> list[dict[str, Any]]:
        """Alerts by severity (critical first), then newest first; or, with `sort`
        "exposure", by estimated exposure first. With a tariff list each alert has its
        `exposure` and `unpriced_minutes` (None: its alert is newer than the estimate)."""
        return self._ordered(
            columns, chosen, "severity_rank, raised_at DESC, alert_id", limit, sort
        )

    def newest_first(
        self, chosen: QueueFilter, limit: int, sort: str = "time"
    ) -> list[dict[str, Any]]:
        return self._ordered(QUEUE_COLUMNS, chosen, "raised_at DESC, alert_id", limit, sort)

    def status_counts(self, chosen: QueueFilter) -> dict[str, int]:
        """Alerts per status under every filter but the status."""
        where, params = chosen.where(with_status=False)
        counts = dict.fromkeys(STATUSES, 0)
        for status, count in self.rows(
            f"SELECT status, count(*) FROM current_alerts {where} GROUP BY status", params
        ):
            counts[status] = count
        return counts

    def rule_ids(self, max_age_s: float = 60.0) -> list[str]:
        """The rules that raised alerts, for the queue's filter: read again at most once
        a minute (a new rule's first alert shows in the list a minute late, at worst)."""
        now = time.monotonic()
        if self._rule_ids is None or now - self._rule_ids[0] > max_age_s:
            rules = [r for (r,) in self.rows("SELECT DISTINCT rule_id FROM alerts ORDER BY 1")]
            self._rule_ids = (now, rules)
        return self._rule_ids[1]

    # -- one alert ----------------------------------------------------------------------

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        found = self.dicts(
            ALERT_COLUMNS,
            f"SELECT {', '.join(ALERT_COLUMNS)} FROM current_alerts WHERE alert_id = ?",
            [alert_id],
        )
        return found[0] if found else None

    def alert_ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        return [
            i
            for (i,) in self.rows(
                f"SELECT alert_id FROM current_alerts WHERE starts_with(alert_id, ?) "
                f"ORDER BY alert_id LIMIT {int(limit)}",
                [prefix],
            )
        ]

    def evidence(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        """The alert's evidence calls as the lake has them (those still in progress are
        not in `calls` yet). The time bounds let DuckDB skip other days' files."""
        return self.dicts(
            CALL_COLUMNS,
            f"SELECT {', '.join(CALL_COLUMNS)} FROM calls WHERE list_contains(?, call_id) "
            "AND started_at >= ? AND started_at <= ? ORDER BY started_at, call_id",
            [
                list(alert["evidence"] or []),
                alert["window_start"] - timedelta(days=1),
                alert["window_end"] + timedelta(hours=1),
            ],
        )

    def reviews(self, alert_ids: Sequence[str]) -> list[dict[str, Any]]:
        columns = ("alert_id", "reviewed_at", "reviewer", "status", "note")
        return self.dicts(
            columns,
            f"SELECT {', '.join(columns)} FROM current_reviews WHERE list_contains(?, alert_id) "
            "ORDER BY reviewed_at DESC",
            [list(alert_ids)],
        )

    def assignments(self, alert_id: str) -> list[dict[str, Any]]:
        columns = ("assigned_at", "assigned_by", "assignee")
        return self.dicts(
            columns,
            f"SELECT {', '.join(columns)} FROM current_assignments WHERE alert_id = ? "
            "ORDER BY assigned_at DESC",
            [alert_id],
        )

    def entity_alerts(
        self, entity: str, entity_type: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        typed = "AND entity_type = ?" if entity_type else ""
        return self.dicts(
            QUEUE_COLUMNS,
            f"SELECT {', '.join(QUEUE_COLUMNS)} FROM current_alerts WHERE entity = ? {typed} "
            f"ORDER BY raised_at DESC LIMIT {int(limit)}",
            [entity, entity_type] if entity_type else [entity],
        )

    def traffic(
        self, entity_type: str, entity: str, start: datetime, end: datetime, bucket_s: int
    ) -> list[tuple[datetime, int]]:
        """Calls of the entity started in [start, end), counted per `bucket_s`."""
        column = ENTITY_COLUMN[entity_type]
        rows = self.rows(
            f"SELECT time_bucket(to_seconds(?::BIGINT), started_at, ?::TIMESTAMPTZ) AS b, "
            f"count(*) FROM calls WHERE {column} = ? AND started_at >= ? AND started_at < ? "
            "GROUP BY b ORDER BY b",
            [bucket_s, start, entity, start, end],
        )
        return [(b, n) for b, n in rows]

    # -- an entity ----------------------------------------------------------------------

    def entity_types(self, entity: str) -> list[str]:
        """The kinds of entity `entity` is: in alerts, or in calls' columns."""
        found = [
            t
            for (t,) in self.rows(
                "SELECT DISTINCT entity_type FROM alerts WHERE entity = ?", [entity]
            )
        ]
        probes = " UNION ALL ".join(
            f"SELECT '{kind}' FROM (SELECT 1 FROM calls WHERE {column} = ? LIMIT 1)"
            for kind, column in ENTITY_COLUMN.items()
        )
        for (kind,) in self.rows(probes, [entity] * len(ENTITY_COLUMN)):
            if kind not in found:
                found.append(kind)
        return [t for t in ENTITY_TYPES if t in found]

    def entity_span(self, entity_type: str, entity: str) -> tuple[datetime, datetime] | None:
        column = ENTITY_COLUMN[entity_type]
        row = self.rows(
            f"SELECT min(started_at), max(started_at) FROM calls WHERE {column} = ?", [entity]
        )[0]
        return None if row[0] is None else (row[0], row[1])

    def entity_calls(self, entity_type: str, entity: str, limit: int = 50) -> list[dict[str, Any]]:
        column = ENTITY_COLUMN[entity_type]
        return self.dicts(
            CALL_COLUMNS,
            f"SELECT {', '.join(CALL_COLUMNS)} FROM calls WHERE {column} = ? "
            f"ORDER BY started_at DESC LIMIT {int(limit)}",
            [entity],
        )

    # -- rules --------------------------------------------------------------------------

    def rule_summary(self) -> list[dict[str, Any]]:
        """Per rule: alerts, per status, the false-positive share of the reviewed ones."""
        columns = ("rule_id", "alerts", "open", "false_positive", "confirmed", "reviewed", "last")
        return self.dicts(
            columns,
            "SELECT rule_id, count(*), count(*) FILTER (status = 'open'), "
            "count(*) FILTER (status = 'false_positive'), "
            "count(*) FILTER (status = 'confirmed'), "
            "count(*) FILTER (status <> 'open'), max(raised_at) "
            "FROM current_alerts GROUP BY rule_id ORDER BY rule_id",
        )

    def per_day(self, table: str) -> list[tuple[str, Any, int]]:
        """(rule_id, day, alerts) for `alerts` or `shadow_alerts`."""
        assert table in ("alerts", "shadow_alerts")
        rows = self.rows(
            f"SELECT rule_id, date_trunc('day', raised_at) AS d, count(*) FROM {table} "
            "GROUP BY ALL ORDER BY 1, 2"
        )
        return [(r, d, n) for r, d, n in rows]

    def shadow_summary(self) -> list[dict[str, Any]]:
        columns = ("rule_id", "alerts", "entities", "first", "last")
        return self.dicts(
            columns,
            "SELECT rule_id, count(*), count(DISTINCT entity), min(raised_at), max(raised_at) "
            "FROM shadow_alerts GROUP BY rule_id ORDER BY rule_id",
        )

    def shadow_recent(self, limit: int = 20) -> list[dict[str, Any]]:
        columns = ("rule_id", "raised_at", "entity_type", "entity", "summary")
        return self.dicts(
            columns,
            f"SELECT {', '.join(columns)} FROM shadow_alerts ORDER BY raised_at DESC "
            f"LIMIT {int(limit)}",
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
