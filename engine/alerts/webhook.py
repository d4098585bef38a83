"""Deliveries over HTTP: the webhook destination, and the one request function the
webhook and the actions' `http` steps share (its key in `Idempotency-Key`, redirects
not followed, what a status means for the courier).
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Mapping

from engine.alerts.couriers import DeliveryError
from engine.core.text import shown

# The header that carries a delivery's key to an HTTP endpoint (the IETF draft's name).
IDEMPOTENCY_HEADER = "Idempotency-Key"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: a POST must not be turned into a GET elsewhere, and a
    request goes only where its settings or action file say; a redirect is the URL to fix."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def send_http(
    opener: urllib.request.OpenerDirector,
    method: str,
    url: str,
    body: bytes | None,
    headers: Mapping[str, str],
    key: str,
    timeout_s: float,
) -> int:
    """One HTTP request of a delivery, with its key in `Idempotency-Key`; the status
    when it is 2xx. 408, 425, 429 and 5xx, timeouts and connection errors are a
    DeliveryError that means the endpoint is down or busy (the courier pauses it); any
    other answer is one that refuses this delivery. What the endpoint says is read up
    to 64 KiB and dropped: only its status counts."""
    request = urllib.request.Request(
        url, data=body, headers={**headers, IDEMPOTENCY_HEADER: key}, method=method
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            response.read(65536)
            status = int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        status = error.code
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise DeliveryError(shown(str(reason))) from None
    if 200 <= status < 300:
        return status
    refused = status < 500 and status not in (408, 425, 429)
    raise DeliveryError(f"HTTP {status}", refused=refused)


class WebhookDestination:
    """POSTs the payload as JSON with the delivery's key in `Idempotency-Key`.

    2xx is delivered. 408, 425, 429 and 5xx, timeouts and connection errors mean the
    endpoint is down or busy (the courier pauses it); any other answer refuses this
    one delivery (retried later with its own back-off)."""

    def __init__(
        self, url: str, *, token: str = "", timeout_s: float = 10.0, name: str = "webhook"
    ) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json"}
        if token:
            # Most alert receivers (SOAR, chat, ticketing) take a bearer token.
            self.headers["Authorization"] = f"Bearer {token}"
        self._opener = urllib.request.build_opener(NoRedirect)

    def send(self, key: str, payload: bytes) -> None:
        send_http(self._opener, "POST", self.url, payload, self.headers, key, self.timeout_s)
