"""Detection: calls rebuilt from reports, sliding event-time windows, YAML rules, alerts."""
