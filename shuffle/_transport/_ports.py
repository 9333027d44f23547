"""Listening on a port of a fixed range, so that firewalls can allow just that range.

The transports bind one port per ``listen`` call; a port taken by another process
(or another shuffle actor of the node) fails that call with ``BrokenTransportError``,
so the next port of the range is tried. Ports are tried in order from the range's
start: the few actors of a node end up on its first free ports, which keeps the
range an operator has to open small and predictable.
"""

from __future__ import annotations

from ._errors import BrokenTransportError
from .base import Handler, Listener, Transport

__all__ = ["PortRangeExhaustedError", "listen_in_range"]


class PortRangeExhaustedError(BrokenTransportError):
    """Every port of the configured range is in use (or cannot be bound) on this host."""


async def listen_in_range(
    transport: Transport, *, host: str, ports: tuple[int, int] | None, handler: Handler
) -> Listener:
    """``transport.listen`` on the first port of ``ports`` (inclusive) that binds.

    ``ports=None``: any free port, chosen by the operating system.
    """
    if ports is None:
        return await transport.listen(host, 0, handler)
    first, last = ports
    if not 0 < first <= last < 65536:
        raise ValueError(f"invalid port range {first}-{last}: need 0 < first <= last < 65536")
    error: BrokenTransportError | None = None
    for port in range(first, last + 1):
        try:
            return await transport.listen(host, port, handler)
        except BrokenTransportError as e:  # in use, most likely: try the next one
            error = e
    raise PortRangeExhaustedError(
        f"cannot listen on {transport.scheme} {host}: none of the {last - first + 1} ports "
        f"{first}-{last} is free (last error: {error}); widen the shuffle's port range "
        "(ray-oob-sched.shuffle.port-range) or free ports in it"
    ) from error
