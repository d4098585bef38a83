"""callsentry's runtime: receive, decode, store, track, detect, alert."""
