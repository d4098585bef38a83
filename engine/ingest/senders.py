"""Who sent a report: the switch its address is named as, and whether it may send checks.

`receiver.switches` names sender addresses (a name per address or network); the name
is stored with every report and call (`switch`), so one engine can watch several
switches and rules can select and group by it. An address no switch names gets
switch "" (its address is in `source`). Where networks overlap the most specific
one names the address (as routes are chosen).

`receiver.check_senders` lists where deployment checks may come from (loopback by
default): a report from there whose call_id starts with CHECK_CALL_ID_PREFIX is a
check (docs/protocol.md, "Check reports"). An address a switch is named for is never
a check sender, whatever `check_senders` says: from a switch the prefix means
nothing, so it cannot be used to slip a report past detection.

The lake writer asks this once per distinct sender ("host:port" as journaled), not
per datagram:

>>> senders = SenderDirectory({"east": ["10.0.0.0/24"], "west": ["10.0.0.9"]}, ["127.0.0.0/8"])
>>> senders.of("10.0.0.5:5060"), senders.of("10.0.0.9:5060"), senders.of("127.0.0.1:40000")
(Sender(switch='east', checks=False), Sender(switch='west', checks=False), \
Sender(switch='', checks=True))
>>> senders.is_check("127.0.0.1:40000", "callsentry-check-1"), senders.is_check(
...     "10.0.0.5:5060", "callsentry-check-1")
(True, False)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from engine.core.events import CHECK_CALL_ID_PREFIX

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A spoofing flood of distinct sources must not grow the cache without bound.
_MAX_CACHED = 65_536


class Sender(NamedTuple):
    switch: str
    checks: bool


_NOBODY = Sender("", False)


def host_of(source: str) -> str:
    """The address of a journaled source: '10.0.0.5:5060' -> '10.0.0.5', '::1:5060' ->
    '::1' (the receiver writes "host:port", an IPv6 host without brackets)."""
    host = source.rpartition(":")[0] if ":" in source else source
    return host.strip("[]")


class SenderDirectory:
    def __init__(
        self, switches: Mapping[str, Sequence[str]], check_senders: Sequence[str] = ()
    ) -> None:
        named = [
            (ipaddress.ip_network(address, strict=False), name)
            for name, addresses in switches.items()
            for address in addresses
        ]
        # Most specific first: the first network holding an address names it.
        self._switches = sorted(named, key=lambda entry: -entry[0].prefixlen)
        self._check_senders = [ipaddress.ip_network(a, strict=False) for a in check_senders]
        self._cache: dict[str, Sender] = {}

    @property
    def names(self) -> list[str]:
        return sorted({name for _, name in self._switches})

    def of(self, source: str) -> Sender:
        sender = self._cache.get(source)
        if sender is None:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            sender = self._cache[source] = self._look_up(source)
        return sender

    def is_check(self, source: str, call_id: str) -> bool:
        """Whether a report with this call_id from this source is a deployment check."""
        return self.of(source).checks and call_id.startswith(CHECK_CALL_ID_PREFIX)

    def _look_up(self, source: str) -> Sender:
        try:
            address = ipaddress.ip_address(host_of(source).split("%", 1)[0])
        except ValueError:
            return _NOBODY  # not a network address (an event file's "file:line")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network, name in self._switches:
            if address.version == network.version and address in network:
                return Sender(name, False)
        checks = any(
            address.version == network.version and address in network
            for network in self._check_senders
        )
        return Sender("", checks)
