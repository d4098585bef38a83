"""What an operator's tools ask a running `serve`, over HTTP on `metrics.listen`:

- `/metrics`: Prometheus text (the receiver's counters, the lake writer's, rule
  loads, alerts by rule and severity, build info);
- `/healthz`: 200 while the process answers at all (a liveness probe: restart it
  when this fails);
- `/readyz`: 200 when the engine can be relied on, 503 when not, and in both cases a
  JSON body saying what was checked and why it is not ready: the rules are loaded,
  the lake writer runs and is not behind past `metrics.ready_max_lake_backlog`, and
  how long ago the switch last reported (past `metrics.ready_max_report_age_s`,
  when that is set, it is not ready either).

A small stdlib HTTP server in a thread of the receiver's process: it reads plain
integers and never touches the answer path.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from engine.alerts.actionbook import ActionBook
from engine.alerts.couriers import Dispatch
from engine.alerts.outbox import DestinationCounts, OutboxError
from engine.apps.build import build_info
from engine.apps.lakewriter import LakeWriterProcess
from engine.apps.relay import RelayProcess
from engine.apps.settings import Settings
from engine.ingest.stats import COUNTER_HELP, RULES_INVALID, RULES_LOADING, Stats

log = logging.getLogger(__name__)


class ReportClock:
    """When the switch last reported. The receiver's counts are sampled (every second by
    the housekeeping, and at each /readyz), so the age is right to about a second,
    without a clock read on the answer path."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._count = 0
        self._at: float | None = None

    def age_s(self) -> float | None:
        """Seconds since the last report (a copy of one counts), None before the first."""
        count = self.stats.stored + self.stats.duplicates
        now = time.monotonic()
        if count != self._count:
            self._count = count
            self._at = now
        return None if self._at is None else now - self._at


class Health:
    """The engine's state as /readyz and the metrics report it."""

    def __init__(
        self,
        settings: Settings,
        stats: Stats,
        writer: LakeWriterProcess,
        clock: ReportClock,
        relay: RelayProcess | None = None,
        *,
        deliveries: Dispatch | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.writer = writer
        self.clock = clock
        self.deliveries = deliveries
        self.relay = relay
        self.started_at = time.monotonic()

    def _rules(self) -> dict[str, Any]:
        if not self.settings.detection.enabled:
            return {"ok": True, "why": "detection is off (detection.enabled = false)"}
        lake = self.writer.counters
        running = lake.get("rules_running")
        check: dict[str, Any] = {
            "loads": lake.get("rule_loads"),
            "failed_loads": lake.get("rule_load_failures"),
        }
        last = lake.get("rule_last_load_ms")
        if last:
            check["last_loaded_at"] = datetime.fromtimestamp(last / 1000, tz=UTC).isoformat()
        if running == RULES_LOADING:
            check.update(ok=False, why="the lake writer is loading the rules")
        elif running == RULES_INVALID:
            check.update(
                ok=False,
                why=f"the rules in {self.settings.detection.rules_folder} are invalid, detection "
                "is off (the lake writer's log lists the problems)",
            )
        else:
            check.update(ok=True, why=f"{running} rules running", rules=running)
        return check

    def _lake_writer(self) -> dict[str, Any]:
        writer = self.writer
        backlog = self.stats.lake_backlog
        bound = self.settings.metrics.ready_max_lake_backlog
        check: dict[str, Any] = {
            "pid": writer.pid,
            "restarts": writer.restarts,
            "backlog_reports": backlog,
            "max_backlog_reports": bound or None,
        }
        if not writer.alive():
            code = writer.exitcode()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            check.update(
                ok=False,
                why=f"the lake writer is not running ({how}); it is restarted within seconds",
            )
        elif bound and backlog > bound:
            check.update(
                ok=False,
                why=f"the lake writer is {backlog} reports behind, past the bound of {bound} "
                "(metrics.ready_max_lake_backlog)",
            )
        else:
            check.update(ok=True, why=f"running, {backlog} reports behind")
        return check

    def _reports(self) -> dict[str, Any]:
        age = self.clock.age_s()
        bound = self.settings.metrics.ready_max_report_age_s
        check: dict[str, Any] = {
            "last_report_age_s": None if age is None else round(age, 1),
            "max_age_s": bound or None,
        }
        since_start = time.monotonic() - self.started_at
        quiet = since_start if age is None else age
        if bound and quiet > bound:
            heard = "no report since start" if age is None else f"no report for {age:.0f} s"
            check.update(
                ok=False, why=f"{heard}, past {bound:g} s (metrics.ready_max_report_age_s)"
            )
        else:
            heard = "no report yet" if age is None else f"last report {age:.1f} s ago"
            check.update(ok=True, why=heard)
        return check

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "rules": self._rules(),
            "lake_writer": self._lake_writer(),
            "reports": self._reports(),
        }
        ready = all(check["ok"] for check in checks.values())
        reasons = [f"{name}: {check['why']}" for name, check in checks.items() if not check["ok"]]
        return ready, {"ready": ready, "reasons": reasons, "checks": checks}

    def liveness(self) -> dict[str, Any]:
        return {
            "alive": True,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            **build_info(),
        }


class ServiceCollector(Collector):
    """Rule loads, alerts by rule and severity, the lake writer, readiness, build info."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        health = self.health
        lake = health.writer.counters
        info = InfoMetricFamily("callsentry_build", "The running build")
        info.add_metric([], build_info())
        yield info
        loads = CounterMetricFamily(
            "callsentry_rule_loads",
            "Loads of the rule set (at start and each reload): swapped in, or refused "
            "because a file was invalid (the running set stays)",
            labels=["result"],
        )
        loads.add_metric(["success"], lake.get("rule_loads"))
        loads.add_metric(["failure"], lake.get("rule_load_failures"))
        yield loads
        yield GaugeMetricFamily(
            "callsentry_rule_last_load_success_timestamp_seconds",
            "When the rule set was last loaded successfully (Unix time; 0: never)",
            value=lake.get("rule_last_load_ms") / 1000,
        )
        yield GaugeMetricFamily(
            "callsentry_rules_running",
            "Rules in the running set (0 while loading or when the set was invalid)",
            value=max(0, lake.get("rules_running")),
        )
        alerts = CounterMetricFamily(
            "callsentry_rule_alerts",
            "Alerts raised, by rule, severity and mode (alert or shadow)",
            labels=["rule", "severity", "mode"],
        )
        for (rule, severity, mode), count in sorted(health.writer.alert_counts().items()):
            alerts.add_metric([rule, severity, mode], count)
        yield alerts
        yield GaugeMetricFamily(
            "callsentry_lake_writer_up",
            "1 while the lake writer process runs",
            value=int(health.writer.alive()),
        )
        yield CounterMetricFamily(
            "callsentry_lake_writer_restarts",
            "Times the lake writer exited and was started again",
            value=health.writer.restarts,
        )
        age = health.clock.age_s()
        if age is not None:
            yield GaugeMetricFamily(
                "callsentry_last_report_age_seconds",
                "Seconds since the switch last reported (a retried copy counts)",
                value=age,
            )
        yield GaugeMetricFamily(
            "callsentry_ready", "1 when /readyz says ready", value=int(health.readiness()[0])
        )
        if health.relay is not None:
            yield from relay_metrics(health.relay)


_RELAY_METRICS = {
    "sent": ("counter", "Reports sent to a relay target (first copies)"),
    "answered": ("counter", "Reports a relay target answered with call_id,serial"),
    "retried": ("counter", "Copies sent again to a relay target (retries and probes)"),
    "given_up": (
        "counter",
        "Reports given up for a relay target (unanswered while it was up, "
        "or past relay.horizon_s / relay.max_held_bytes while it was down)",
    ),
    "given_up_horizon": ("counter", "Of those given up, the ones past the horizon or byte bound"),
    "bad_answers": ("counter", "Answers from a relay target that were no call_id,serial"),
    "lag_reports": (
        "gauge",
        "Stored records (reports and quarantined datagrams) past a relay target's cursor",
    ),
    "lag_seconds": ("gauge", "Age of the oldest report a relay target has not answered"),
    "down": ("gauge", "1 while a relay target answers nothing (no report is given up meanwhile)"),
}


def relay_metrics(relay: RelayProcess) -> Iterator[Metric]:
    values = relay.values()
    for name, (kind, text) in _RELAY_METRICS.items():
        family: Metric
        if kind == "counter":
            family = CounterMetricFamily(f"callsentry_relay_{name}", text, labels=["target"])
        else:
            family = GaugeMetricFamily(f"callsentry_relay_{name}", text, labels=["target"])
        for target, counts in values.items():
            family.add_metric([target], counts[name])
        yield family
    yield GaugeMetricFamily(
        "callsentry_relay_up", "1 while the relay process runs", value=int(relay.alive())
    )


class DeliveriesCollector(Collector):
    """The outbox, per destination: `callsentry_deliveries_*` (a dashboard reads these
    names). Read from the outbox file at each scrape, so the counters span restarts."""

    def __init__(self, deliveries: Dispatch | None) -> None:
        self.deliveries = deliveries

    def collect(self) -> Iterator[Metric]:
        label = ["destination"]
        delivered = CounterMetricFamily(
            "callsentry_deliveries_delivered", "Deliveries the endpoint accepted", labels=label
        )
        failed = CounterMetricFamily(
            "callsentry_deliveries_failed",
            "Delivery attempts that failed (each is tried again until the horizon)",
            labels=label,
        )
        given_up = CounterMetricFamily(
            "callsentry_deliveries_given_up",
            "Deliveries given up after outbox.give_up_after_s (callsentry alerts deliveries)",
            labels=label,
        )
        depth = GaugeMetricFamily(
            "callsentry_deliveries_queue_depth", "Deliveries waiting in the outbox", labels=label
        )
        oldest = GaugeMetricFamily(
            "callsentry_deliveries_oldest_pending_age_seconds",
            "Age of the oldest delivery waiting (0: none waits)",
            labels=label,
        )
        if self.deliveries is not None:
            try:
                counts = self.deliveries.outbox.counts()
            except OutboxError as error:
                log.error("metrics: %s", error)
                counts = {}
            now = time.time()
            names = sorted({*counts, *self.deliveries.destinations})
            for name in names:
                count = counts.get(name, DestinationCounts())
                delivered.add_metric([name], count.delivered)
                failed.add_metric([name], count.failed)
                given_up.add_metric([name], count.given_up)
                depth.add_metric([name], count.pending)
                at = count.oldest_pending_at
                oldest.add_metric([name], 0.0 if at is None else max(0.0, now - at))
        yield from (delivered, failed, given_up, depth, oldest)


class ActionsCollector(Collector):
    """Per action: `callsentry_actions_*` (fired, approved, failed attempts, budget holds,
    pending approval). Read from the outbox file at each scrape, so they span restarts."""

    def __init__(self, deliveries: Dispatch | None) -> None:
        self.deliveries = deliveries

    def collect(self) -> Iterator[Metric]:
        label = ["action"]
        families = {
            "fired": CounterMetricFamily(
                "callsentry_actions_fired",
                "Actions done (or, in dry-run, described) on alerts",
                labels=label,
            ),
            "approved": CounterMetricFamily(
                "callsentry_actions_approved", "Action requests a reviewer approved", labels=label
            ),
            "failed": CounterMetricFamily(
                "callsentry_actions_failed",
                "Attempts at an action that failed (retried by the outbox)",
                labels=label,
            ),
            "budget_holds": CounterMetricFamily(
                "callsentry_actions_budget_holds",
                "Actions held for approval because their budget per hour was used up",
                labels=label,
            ),
        }
        pending = GaugeMetricFamily(
            "callsentry_actions_pending",
            "Action requests waiting for approval (callsentry actions list --state pending)",
            labels=label,
        )
        if self.deliveries is not None:
            try:
                counts = ActionBook(self.deliveries.outbox).counts()
            except OutboxError as error:
                log.warning("metrics: cannot read the actions: %s", error)
                counts = {}
            for name, count in counts.items():
                for field, family in families.items():
                    family.add_metric([name], getattr(count, field))
                pending.add_metric([name], count.pending)
        yield from (*families.values(), pending)


def metrics_registry(health: Health) -> CollectorRegistry:
    registry = registry_for(health.stats)
    registry.register(ServiceCollector(health))
    registry.register(DeliveriesCollector(health.deliveries))
    registry.register(ActionsCollector(health.deliveries))
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        health = self.server.health
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send_json(200, health.liveness())
        elif path == "/readyz":
            ready, body = health.readiness()
            self._send_json(200 if ready else 503, body)
        else:
            self._send_json(404, {"error": f"no {path}: try /metrics, /healthz or /readyz"})

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        text = json.dumps(body, ensure_ascii=False, indent=2) + "\n"
        self._send(status, text.encode(), "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: int, health: Health, registry: CollectorRegistry
    ) -> None:
        self.address_family = family
        self.health = health
        self.registry = registry
        super().__init__(address, _Handler)


class OperatorEndpoint:
    """/metrics, /healthz and /readyz on one address, served from a thread."""

    def __init__(self, host: str, port: int, health: Health) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = _Server((host, port), family, health, metrics_registry(health))
        except OSError as error:
            # The address is the one thing an operator needs to fix a clash.
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(
                error.errno, f"cannot serve metrics on {shown}: {error.strerror or error}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="callsentry-metrics", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class StatsCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(
                f"callsentry_{name}", help_text, value=getattr(self.stats, name)
            )
        rejected = CounterMetricFamily(
            "callsentry_rejected", "Reports quarantined, by reason", labels=["reason"]
        )
        for reason, count in sorted(self.stats.rejected_by_reason().items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "callsentry_pending_reports",
            "Reports accepted and waiting for their group commit",
            value=self.stats.pending,
        )
        yield GaugeMetricFamily(
            "callsentry_lake_backlog_reports",
            "Reports stored in the journal and not yet written to the lake",
            value=self.stats.lake_backlog,
        )


def registry_for(stats: Stats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    return registry
