"""Close raw TCP connections that UCX holds below the application (Linux).

A TCP connection to a UCX listener (or to a port of UCX's TCP transport) that never
sends UCX's wire-up is accepted and kept by UCX's connection manager: no Python
callback ever sees it, so no handshake deadline applies, and UCX has no setting that
bounds it (keepalive, ``UCX_TCP_KEEPIDLE`` and friends, only detects dead peers; an
idle live one answers). 20,000 of them filled an actor's file descriptors.

``ConnectionReaper`` bounds them from outside UCX. Every ``interval`` it lists this
process's established TCP sockets on UCX's ports (``/proc/self/fd`` and
``/proc/net/tcp{,6}``) and takes as *pending*, from ``TCP_INFO``:

* on the listener's port (UCX's connection manager), those on which this side has not
  had a byte of data acknowledged (``tcpi_bytes_acked == 0``): UCX answers a
  connection request as soon as it arrives, so a connection that got no answer has
  not sent one, whatever else the peer sent;
* on the ports of UCX's TCP transport (its data lanes, which accept connections from
  peers that already hold this worker's address), those that have sent nothing and
  received fewer than ``DATA_PORT_MIN_BYTES``: the accepting side of a real lane only
  receives, and its wire-up alone is larger (208 bytes and more measured with UCX
  1.21); UCX itself closes a connection whose first 8 bytes are not its magic number.

A pending socket is dropped once it was seen pending for
``deadline`` seconds, and beyond ``cap`` pending sockets the oldest are dropped at
once. Dropping is ``shutdown(SHUT_RDWR)`` on a duplicate of UCX's descriptor (checked
to be the same socket): UCX then sees the peer gone and closes the socket itself, so
its descriptor is never closed under it. Connections that completed the wire-up are
never touched: they carry UCX's answer, and from then on the transport's own
handshake deadline (``_listener.py``) applies.

So an unauthenticated peer holds a connection at most ``deadline + interval``
seconds, and at most ``cap`` (plus what it opens within one ``interval``) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping

__all__ = ["ConnectionReaper", "listening_ports", "select_stale"]

logger = logging.getLogger("shuffle.transport.ucx")

#: ``struct tcp_info``: ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` (u64 each) sit
#: at this offset (Linux >= 4.1).
_BYTES_OFFSET = 120
#: A data-lane connection that received less than this has not completed UCX's wire-up.
DATA_PORT_MIN_BYTES = 64
_TCP_ESTABLISHED = "01"
_TCP_LISTEN = "0A"
_PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists(_PROC_TABLES[0])


def select_stale(
    first_seen: Mapping[int, float], *, now: float, deadline: float, cap: int
) -> list[int]:
    """The pending sockets to drop: those pending for ``deadline`` or longer, then the
    oldest of the rest beyond ``cap``. ``first_seen``: socket -> when first seen pending."""
    by_age = sorted(first_seen, key=first_seen.__getitem__)
    stale = [s for s in by_age if now - first_seen[s] >= deadline]
    young = [s for s in by_age if now - first_seen[s] < deadline]
    return stale + young[: max(0, len(young) - cap)]


def _socket_fds() -> dict[int, int]:
    """This process's sockets: inode -> one of its descriptors."""
    fds: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{name}")
            if link.startswith("socket:["):
                fds[int(link[8:-1])] = int(name)
    return fds


def _tcp_table() -> list[tuple[int, str, int]]:
    """Every TCP socket of this network namespace: (local port, state, inode)."""
    rows = []
    for path in _PROC_TABLES:
        with contextlib.suppress(OSError), open(path) as table:
            next(table, None)
            for line in table:
                fields = line.split()
                rows.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3], int(fields[9])))
    return rows


def listening_ports() -> set[int]:
    """The TCP ports this process listens on."""
    ours = _socket_fds()
    return {port for port, state, inode in _tcp_table() if state == _TCP_LISTEN and inode in ours}


def _pending(listener_ports: Collection[int], data_ports: Collection[int]) -> dict[int, int]:
    """Sockets of this process that did not complete UCX's wire-up (module doc):
    inode -> descriptor."""
    candidates = {
        inode: port in listener_ports
        for port, state, inode in _tcp_table()
        if state == _TCP_ESTABLISHED and (port in listener_ports or port in data_ports)
    }
    if not candidates:
        return {}
    pending = {}
    for inode, fd in _socket_fds().items():
        if inode not in candidates:
            continue
        counts = _bytes_acked_received(fd, inode)
        if counts is None:
            continue
        acked, received = counts
        if acked == 0 and (candidates[inode] or received < DATA_PORT_MIN_BYTES):
            pending[inode] = fd
    return pending


@contextlib.contextmanager
def _socket_of(fd: int, inode: int) -> Iterator[socket.socket | None]:
    """A duplicate of ``fd`` as a socket, closed on exit (``fd`` stays UCX's); ``None``
    if ``fd`` is closed, or was closed and reused meanwhile (it no longer is ``inode``)."""
    try:
        dup = os.dup(fd)
    except OSError:
        yield None
        return
    with socket.socket(fileno=dup) as sock:
        yield sock if os.fstat(dup).st_ino == inode else None


def _bytes_acked_received(fd: int, inode: int) -> tuple[int, int] | None:
    """``(tcpi_bytes_acked, tcpi_bytes_received)`` of ``fd``'s socket, if it still is
    ``inode`` and the kernel says."""
    with _socket_of(fd, inode) as sock:
        if sock is None:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _BYTES_OFFSET + 16:
        return None  # a kernel too old to say: leave it alone
    acked, received = struct.unpack_from("<QQ", info, _BYTES_OFFSET)
    return int(acked), int(received)


def _drop(fd: int, inode: int) -> bool:
    """Shut the socket down under UCX, which then closes it; the descriptor stays UCX's."""
    with _socket_of(fd, inode) as sock:
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            return True
    return False


class ConnectionReaper:
    """Drops connections on ``ports`` that did not complete UCX's wire-up (module doc)."""

    def __init__(
        self,
        *,
        listener_ports: Collection[int],
        data_ports: Collection[int] = (),
        deadline: float,
        cap: int,
        interval: float = 1.0,
        on_drop: Callable[[str], None],
    ) -> None:
        self.listener_ports = frozenset(listener_ports)
        self.data_ports = frozenset(data_ports) - self.listener_ports
        self.ports = self.listener_ports | self.data_ports
        self._deadline = deadline
        self._cap = cap
        self._interval = interval
        self._on_drop = on_drop
        self._first_seen: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def pending_count(self) -> int:
        """Pending sockets seen by the last sweep and not dropped."""
        return len(self._first_seen)

    def start(self) -> None:
        if supported():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"reap pending UCX connections on {sorted(self.ports)}"
            )
        else:
            logger.info(
                "cannot list sockets on %s: raw connections to UCX stay unbounded", sys.platform
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def sweep(self, now: float) -> int:
        """One pass (blocking I/O on /proc); returns how many sockets it dropped."""
        pending = _pending(self.listener_ports, self.data_ports)
        first_seen = {inode: self._first_seen.get(inode, now) for inode in pending}
        dropped = 0
        for inode in select_stale(first_seen, now=now, deadline=self._deadline, cap=self._cap):
            del first_seen[inode]
            dropped += _drop(pending[inode], inode)
        self._first_seen = first_seen
        return dropped

    async def _run(self) -> None:
        reason = (
            f"a raw connection to UCX port(s) {sorted(self.ports)} completed no UCX wire-up "
            f"within {self._deadline:g} s, or more than {self._cap} were pending"
        )
        while True:
            try:
                # Off the loop: listing 20,000 sockets takes tens of milliseconds.
                dropped = await asyncio.to_thread(self.sweep, time.monotonic())
            except Exception:  # keep guarding; a failed pass is retried
                logger.exception("sweeping pending UCX connections on %s failed", self.ports)
            else:
                for _ in range(dropped):
                    self._on_drop(reason)
            await asyncio.sleep(self._interval)
