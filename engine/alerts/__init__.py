"""Where raised alerts go: the log, a JSON-lines file, a webhook."""
