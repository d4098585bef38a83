"""Fan-out: every stored live report passed on to the consumers that listened on the
switch's one address before callsentry took it (the README's "Relaying to existing
consumers" shows a deployment).

- `feed`: stored reports read back from the journal, in the order they were stored,
  from a position a target's cursor keeps; the journal segments the relay still
  needs, held past the lake writer and bounded;
- `udp`: one UDP target, with the switch's own retry rules and a durable cursor;
- `state`: the cursors and counters on disk, which `callsentry relay status` reads.

The relay runs in a process of its own (engine/apps/relay.py), never on the answer
path.
"""
