"""Transport addresses: ``scheme://host:port``, IPv6 hosts in brackets."""

from __future__ import annotations

from ._errors import TransportUsageError


def format_address(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def parse_address(address: str, scheme: str) -> tuple[str, int]:
    """``"tcp://host:port"`` (or ``"tcp://[v6]:port"``) -> ``(host, port)``."""
    prefix = f"{scheme}://"
    if not isinstance(address, str) or not address.startswith(prefix):
        raise TransportUsageError(f"{address!r} is not a {scheme}:// address")
    rest = address[len(prefix) :]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = rest.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TransportUsageError(f"{address!r} is not of the form {scheme}://host:port")
    return host, int(port_text)
