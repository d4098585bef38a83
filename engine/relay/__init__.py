"""Fan-out: every stored live report passed on to the consumers that listened on the
switch's one address before callsentry took it, and published to NATS JetStream (the
README's "Relaying to existing consumers" and "Publishing to NATS JetStream" show a
deployment).

- `feed`: stored reports read back from the journal, in the order they were stored,
  from a position a target's cursor keeps; the journal segments the relay still
  needs, held past the lake writer and bounded;
- `udp`: one UDP target, with the switch's own retry rules and a durable cursor;
- `nats`: publication to NATS JetStream (reports from the journal like a target;
  calls, alerts and reviews from the outbox), `subjects` its subject tokens and
  message ids;
- `state`: the cursors and counters on disk, which `callsentry relay status` reads.

The relay runs in a process of its own (engine/apps/relay.py), never on the answer
path.
"""
