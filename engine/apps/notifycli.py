"""`callsentry notify`: the notification channels, tried by hand."""

from __future__ import annotations

from pathlib import Path

import click

from engine.apps.commandline import config_option, fail, settings_or_fail

# The test message's alert: its own id, rule and entity, so no one mistakes it for one
# raised by detection.
TEST_ALERT = {
    "alert_id": "00000000-0000-0000-0000-000000000000",
    "rule_id": "callsentry.test",
    "detector": "rule",
    "severity": "low",
    "level": "warning",
    "entity_type": "caller",
    "entity": "0000000000",
    "window_start": "1970-01-01T00:00:00+00:00",
    "window_end": "1970-01-01T00:00:00+00:00",
    "raised_at": "1970-01-01T00:00:00+00:00",
    "value": 0.0,
    "threshold": 0.0,
    "evidence": [],
    "rule_version": "",
    "tags": ["test"],
}


@click.group()
def notify() -> None:
    """Notification channels ([[notify.channels]] in the settings)."""


@notify.command("test")
@config_option
@click.option(
    "--channel", "names", multiple=True, help="Only this channel (by name; may be repeated)."
)
def notify_test(config: Path | None, names: tuple[str, ...]) -> None:
    """Send a test message to each channel now, directly (not through the outbox, outside
    the rate limit), and say which took it."""
    from engine.alerts.couriers import DeliveryError
    from engine.apps.delivery import channel_transport

    settings = settings_or_fail(config, {})
    channels = settings.notify.channels
    if not channels:
        fail("no notification channel is configured ([[notify.channels]] in the settings)")
    known = [channel.name for channel in channels]
    unknown = sorted(set(names) - set(known))
    if unknown:
        fail(f"no channel named {', '.join(map(repr, unknown))} (known: {', '.join(known)})", 2)
    chosen = [channel for channel in channels if not names or channel.name in names]
    failed = 0
    for channel in chosen:
        transport = channel_transport(channel, settings.outbox.timeout_s)
        summary = f"A test message from callsentry: channel {channel.name} works."
        try:
            transport.send_alert({**TEST_ALERT, "summary": summary}, settings.console.public_url)
        except DeliveryError as error:
            failed += 1
            click.echo(f"{channel.label}: failed: {error}")
        else:
            click.echo(f"{channel.label}: sent")
    if failed:
        fail(f"{failed} of {len(chosen)} channels did not take the test message")
