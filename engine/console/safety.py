"""What keeps the console safe to open on a reviewer's desk: failed sign-ins throttled,
a CSRF token per session, and the headers every answer carries.

>>> throttle = LoginThrottle(failures=2, period_s=60, clock=iter([0.0, 1.0, 2.0, 70.0]).__next__)
>>> throttle.fail("10.0.0.1", "ana"); throttle.fail("10.0.0.1", "ana")
>>> throttle.wait_s("10.0.0.1", "ana")
58
>>> throttle.wait_s("10.0.0.1", "ana")
0
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

# No inline script or style anywhere: the console's own script and sheet are files it
# serves itself; the charts are SVG markup in the page. Nothing may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",
}


class LoginThrottle:
    """At most `failures` failed sign-ins per client address and per name within
    `period_s`; past that, sign-in is refused (without checking the password) until the
    oldest failure is older than the period. Per address stops one machine guessing
    many names; per name stops many machines guessing one password. Its memory is
    bounded: the oldest keys are forgotten past `max_keys`."""

    def __init__(
        self,
        failures: int = 5,
        period_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.failures = failures
        self.period_s = period_s
        self.clock = clock
        self.max_keys = max_keys
        self._failed: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, client: str, name: str) -> tuple[str, str]:
        return (f"addr:{client}", f"name:{name}")

    def wait_s(self, client: str, name: str) -> int:
        """Seconds until `name` may try again from `client` (0: now)."""
        with self._lock:
            return self._wait(client, name, self.clock())

    def _wait(self, client: str, name: str, now: float) -> int:
        wait = 0.0
        for key in self._keys(client, name):
            times = self._failed.get(key)
            if times is None:
                continue
            while times and times[0] <= now - self.period_s:
                times.popleft()
            if len(times) >= self.failures:
                wait = max(wait, times[0] + self.period_s - now)
        return int(wait + 0.999)

    def begin(self, client: str, name: str) -> tuple[int, float]:
        """(seconds to wait, 0) when refused; else (0, the attempt's time), the attempt
        counted as failed until `succeeded` says otherwise. Counted before the password
        is checked, so attempts sent at once cannot all pass while the first is checked."""
        now = self.clock()
        with self._lock:
            wait = self._wait(client, name, now)
            if wait:
                return wait, 0.0
            self._record(client, name, now)
        return 0, now

    def succeeded(self, client: str, name: str, at: float) -> None:
        """The attempt `begin` counted at `at` was right: it is not a failure."""
        with self._lock:
            for key in self._keys(client, name):
                times = self._failed.get(key)
                if times is not None and at in times:
                    times.remove(at)

    def fail(self, client: str, name: str) -> None:
        with self._lock:
            self._record(client, name, self.clock())

    def _record(self, client: str, name: str, now: float) -> None:
        for key in self._keys(client, name):
            times = self._failed.pop(key, None) or deque(maxlen=self.failures)
            times.append(now)
            self._failed[key] = times  # newest last: the oldest keys go first
        while len(self._failed) > self.max_keys:
            del self._failed[next(iter(self._failed))]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: object, given: object) -> bool:
    """Whether a form's (or header's) token is the session's, compared in constant time."""
    return (
        isinstance(expected, str)
        and isinstance(given, str)
        and bool(expected)
        and hmac.compare_digest(expected.encode(), given.encode())
    )
