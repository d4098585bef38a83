"""Where alerts go on this machine once detection raised them: the log, a JSON-lines file.
What leaves the machine (the webhook) goes through the outbox (engine.alerts.outbox)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.core.text import shown
from engine.detect.alerts import Alert

log = logging.getLogger(__name__)


class LogSink:
    def deliver(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            if alert.mode != "alert":
                continue
            if alert.escalation:
                log.warning(
                    "ESCALATED %s [%s] %s to critical: %s",
                    alert.rule_id,
                    alert.severity,
                    alert.alert_id,
                    shown(alert.summary),
                )
            else:
                log.warning(
                    "ALERT %s [%s/%s] %s",
                    alert.rule_id,
                    alert.severity,
                    alert.level,
                    shown(alert.summary),
                )

    def close(self) -> None:
        pass


class JsonLinesSink:
    """Appends one JSON object per alert (shadow ones too, marked) to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def deliver(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            for alert in alerts:
                handle.write(json.dumps(alert.as_json(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


class AlertTally:
    """An alert sink that counts alerts by rule, severity and mode, and hands the counts
    to the receiver's process (its metrics) once per drain pass, not once per alert."""

    def __init__(self, outbox: Any) -> None:
        self.outbox = outbox
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def deliver(self, alerts: Sequence[Alert]) -> None:
        # An escalation is the same alert at a higher level, not another one (as the
        # lake writer's own alert count has it).
        self.counts.update((a.rule_id, a.severity, a.mode) for a in alerts if not a.escalation)

    def send(self) -> None:
        if self.counts:
            self.outbox.put(dict(self.counts))
            self.counts.clear()

    def close(self) -> None:
        self.send()
