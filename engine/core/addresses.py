"""Network addresses as settings and flags write them."""

from __future__ import annotations


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'0.0.0.0:8000', '[::]:8000', 'localhost:9100' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:8000")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)
