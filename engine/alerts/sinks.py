"""Where alerts go once detection raised them: the log, a JSON-lines file, a webhook."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from engine.core.text import shown
from engine.detect.alerts import Alert

log = logging.getLogger(__name__)


class LogSink:
    def deliver(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            if alert.mode == "alert":
                log.warning("ALERT %s [%s] %s", alert.rule_id, alert.severity, shown(alert.summary))

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


class WebhookSink:
    """POSTs each alert as JSON from a thread of its own, retrying with back-off;
    a slow or dead endpoint never blocks the pipeline (a bounded queue drops and counts)."""

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        timeout_s: float = 5.0,
        retries: int = 5,
        queue_size: int = 10_000,
    ) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if token:
            # Most alert receivers (SOAR, chat, ticketing) take a bearer token.
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self.retries = retries
        self.dropped = 0
        self.delivered = 0
        self.failed = 0
        self._queue: queue.Queue[Alert | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def deliver(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            if alert.mode != "alert":
                continue
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            body = json.dumps(alert.as_json(), ensure_ascii=False).encode("utf-8")
            delay = 0.5
            for attempt in range(self.retries + 1):
                request = urllib.request.Request(self.url, data=body, headers=self.headers)
                error: Exception | None = None
                try:
                    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                        if 200 <= response.status < 300:
                            self.delivered += 1
                            break
                        error = ValueError(f"HTTP {response.status}")
                except urllib.error.HTTPError as http_error:
                    http_error.close()
                    error = http_error
                except (urllib.error.URLError, OSError, ValueError) as other:
                    error = other
                if attempt == self.retries:
                    self.failed += 1
                    log.error(
                        "webhook %s: giving up on alert %s: %s", self.url, alert.alert_id, error
                    )
                    break
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def delivery_counts(self) -> dict[str, int]:
        """Alerts delivered, failed (given up on), dropped (queue full), and queued now."""
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": self._queue.qsize(),
        }

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
