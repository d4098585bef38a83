"""Where raised alerts go: the log, a JSON-lines file, and the outbox for what leaves
the machine (a webhook; notifications and actions later)."""
