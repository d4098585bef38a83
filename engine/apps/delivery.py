"""Where alerts go, wired from the settings: the lake writer's sinks on this machine
(log, JSON lines), what it queues in the outbox (webhook, notification channels, NATS)
and the actions it decides beside the rules; the outbox's destinations that serve's
couriers deliver to, and a channel's transport (`notify test`). Replay and backtest
never deliver, publish or act.

The receiver's process imports this module (serve's outbox destinations), and must not
load DuckDB, polars, pyarrow, River or SciPy: what does is imported inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.apps.detectors import rule_tags
from engine.apps.settings import ChannelSettings, DetectionSettings, Settings
from engine.core.yamlfile import YamlFileError

if TYPE_CHECKING:
    from engine.alerts.actions import ActionSink
    from engine.alerts.actionspec import ActionSet
    from engine.alerts.couriers import Destination
    from engine.alerts.transports import Transport
    from engine.detect.alerts import Alert, AlertSink
    from engine.detect.pipeline import Pipeline

log = logging.getLogger(__name__)


def make_sinks(settings: Settings) -> list[AlertSink]:
    """The sinks on this machine: the log and the JSON-lines file."""
    from engine.alerts.sinks import JsonLinesSink, LogSink

    detection = settings.detection
    sinks: list[AlertSink] = [LogSink()]
    if detection.alerts_jsonl != "off":
        path = Path(detection.alerts_jsonl or settings.store.data_dir / "alerts.jsonl")
        sinks.append(JsonLinesSink(path))
    return sinks


def make_durable_sinks(
    settings: Settings,
    pipeline: Pipeline | None = None,
    *,
    tags_of: Callable[[str], Sequence[str]] | None = None,
) -> list[AlertSink]:
    """What leaves the machine goes through the outbox (serve's couriers send it; the
    relay's process publishes what is for NATS), and so do actions (decided here, done
    by serve's couriers); only `serve`'s lake writer makes these: replay and backtest
    never deliver, publish or act. The rules' tags route notifications and actions
    (`tags_of`, by default those of the rules `pipeline` runs)."""
    from engine.alerts.notify import NotifySink, Route
    from engine.alerts.outbox import Outbox, OutboxSink

    webhook = settings.detection.webhook_url
    channels = settings.notify.channels
    sinks: list[AlertSink] = []
    if settings.relay.nats.enabled:
        sinks.append(NatsOutboxSink(Outbox.of(settings.store.data_dir), settings))
    if webhook:
        sinks.append(OutboxSink(Outbox.of(settings.store.data_dir), ["webhook"]))
    if channels:
        routes = [
            (
                channel.label,
                Route(
                    severities=frozenset(channel.severities),
                    levels=frozenset(channel.levels),
                    rules=tuple(channel.rules),
                    tags=frozenset(channel.tags),
                ),
            )
            for channel in channels
        ]
        tags = tags_of if tags_of is not None else rule_tags(pipeline)
        sinks.append(NotifySink(Outbox.of(settings.store.data_dir), routes, tags))
    actions = make_action_sink(settings, pipeline)
    if actions is not None:
        sinks.append(actions)
    return sinks


class NatsOutboxSink:
    """Alerts (not shadow ones) and finished calls enqueued for NATS (outbox destination
    `nats`, key = Nats-Msg-Id), one transaction per segment: the relay's process
    publishes them (engine.relay.nats)."""

    def __init__(self, outbox: Any, settings: Settings) -> None:
        from engine.relay.subjects import Subjects

        self.outbox = outbox
        self.subjects = Subjects(settings.relay.nats.subject_prefix)

    def deliver(self, alerts: Sequence[Alert]) -> None:
        from engine.relay.nats import alert_message, outbox_items

        messages = [alert_message(a.as_json(), self.subjects) for a in alerts if a.mode == "alert"]
        self.outbox.enqueue_many(outbox_items(messages))

    def deliver_calls(self, columns: dict[str, Any]) -> None:
        from engine.relay.nats import call_messages, outbox_items

        self.outbox.enqueue_many(outbox_items(call_messages(columns, self.subjects)))

    def close(self) -> None:
        self.outbox.close()


def load_action_set(detection: DetectionSettings) -> ActionSet:
    """The actions beside the rules in use (`actions/` in the rule folder); raises
    YamlFileError listing every problem."""
    from engine.alerts.actionspec import actions_dir, load_actions

    return load_actions(actions_dir(detection.rules_folder))


def make_action_sink(settings: Settings, pipeline: Pipeline | None) -> ActionSink | None:
    """The sink that decides actions, when detection runs and the rule folder has an
    `actions/` folder. Action files that are invalid at the start are logged and none
    acts until they are fixed (the rule watcher loads them again)."""
    from engine.alerts.actionbook import ActionBook
    from engine.alerts.actions import ActionSink
    from engine.alerts.actionspec import ActionSet, actions_dir

    if pipeline is None or not actions_dir(settings.detection.rules_folder).is_dir():
        return None
    try:
        actions = load_action_set(settings.detection)
    except YamlFileError as error:
        log.error("actions are invalid, none will act:\n  %s", "\n  ".join(error.problems))
        actions = ActionSet()

    data_dir = settings.store.data_dir
    return ActionSink(lambda: ActionBook.of(data_dir), actions, rule_tags(pipeline))


def outbox_destinations(settings: Settings) -> list[Destination]:
    """Where deliveries go, by name, as configured (the webhook, when set; each
    notification channel as `notify.NAME`)."""
    from engine.alerts.notify import NotifyDestination
    from engine.alerts.webhook import WebhookDestination

    detection = settings.detection
    destinations: list[Destination] = []
    if detection.webhook_url:
        destinations.append(
            WebhookDestination(
                detection.webhook_url,
                token=detection.webhook_token,
                timeout_s=settings.outbox.timeout_s,
            )
        )
    for channel in settings.notify.channels:
        destinations.append(
            NotifyDestination(
                channel.label,
                channel_transport(channel, settings.outbox.timeout_s),
                settings.store.data_dir,
                limit=channel.limit,
                period_s=channel.rate_period_s,
                public_url=settings.console.public_url,
            )
        )
    return destinations


def destination_names(settings: Settings) -> list[str]:
    """Every outbox destination the settings name, as the outbox does: those of
    `outbox_destinations`, NATS when it is on, and the actions' (without making their
    transports: for a command that only lists)."""
    from engine.alerts.actionbook import DESTINATIONS
    from engine.relay.nats import OUTBOX_DESTINATION

    names = ["webhook"] if settings.detection.webhook_url else []
    names += [channel.label for channel in settings.notify.channels]
    if settings.relay.nats.enabled:
        names.append(OUTBOX_DESTINATION)
    return [*names, *DESTINATIONS.values()]


def channel_transport(channel: ChannelSettings, timeout_s: float) -> Transport:
    """How a notification channel's messages leave: its Apprise URL, or syslog."""
    from engine.alerts.transports import AppriseTransport, SyslogTransport
    from engine.apps.settings import syslog_target

    if channel.syslog:
        protocol, host, port = syslog_target(channel.syslog)
        return SyslogTransport(protocol, host, port, facility=channel.facility, timeout_s=timeout_s)
    return AppriseTransport(channel.expanded_url, secrets=channel.secrets, timeout_s=timeout_s)
