"""Where alerts go on this machine once detection raised them: the log, a JSON-lines file.
What leaves the machine (the webhook) goes through the outbox (engine.alerts.outbox)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

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
