"""Small modules every layer may use: events, durations, addresses, YAML files, gc."""
