"""``ServingListener``: handshake, then the handler, for every accepted connection.

What an unauthenticated peer can hold is bounded on every transport: a connection
must finish the handshake within ``TransportConfig.handshake_timeout`` of being
accepted, and at most ``TransportConfig.max_pending`` accepted connections may be
unauthenticated at once; one more drops the oldest of them (a real client finishes
its handshake within milliseconds, so under a flood it is the attacker's older
connections that go, not the newcomer). Dropped connections are logged at most once
per ``DROP_LOG_INTERVAL`` seconds, with their count.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable

from shuffle._closable import Closable

from ._endpoint import FramedEndpoint
from ._errors import (
    AuthenticationError,
    BrokenTransportError,
    ClosedResourceError,
    EndOfStream,
    ProtocolError,
)
from ._handshake import authenticate_server
from .base import Handler, Listener, ListenerStats, TransportConfig

logger = logging.getLogger("shuffle.transport")

#: At most one warning line per this many seconds about dropped connections.
DROP_LOG_INTERVAL = 10.0


class DropLog:
    """Warns about dropped connections at most once per ``interval``, with counts.

    The first drop is logged at once; later ones are counted and reported with the
    next drop after the interval, so a flood of connections makes a few lines.
    """

    def __init__(
        self,
        where: str,
        *,
        interval: float = DROP_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._where = where
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._unreported = 0
        #: Every connection dropped so far (logged or not).
        self.total = 0

    def dropped(self, reason: object) -> None:
        self.total += 1
        self._unreported += 1
        now = self._clock()
        if self._last is None:
            logger.warning("%s: dropped a connection: %s", self._where, str(reason))
        elif now - self._last >= self._interval:
            logger.warning(
                "%s: dropped %d connections in the last %.0f s (at most one line per %g s); "
                "latest: %s",
                self._where,
                self._unreported,
                now - self._last,
                self._interval,
                str(reason),
            )
        else:
            return
        self._last, self._unreported = now, 0


class ServingListener(Closable, Listener):
    """Runs ``handshake -> handler -> close`` for every accepted connection."""

    def __init__(self, *, config: TransportConfig, handler: Handler, address: str) -> None:
        self._config = config
        self._handler = handler
        self._address = address
        self._closed = False
        self._connections: dict[asyncio.Task[None], FramedEndpoint] = {}
        self._stats = ListenerStats()
        # Accepted, not yet authenticated; insertion order is age (oldest first).
        self._pending: dict[FramedEndpoint, None] = {}
        self._drops = DropLog(address)

    @abc.abstractmethod
    async def _stop_accepting(self) -> None:
        """Stop accepting new connections and release the listening resource."""

    @property
    def address(self) -> str:
        return self._address

    @property
    def stats(self) -> ListenerStats:
        return self._stats

    @property
    def connection_count(self) -> int:
        """Accepted connections still being served (handshake or handler running)."""
        return len(self._connections)

    @property
    def pending_count(self) -> int:
        """Accepted connections that have not authenticated yet."""
        return len(self._pending)

    @property
    def dropped_count(self) -> int:
        """Unauthenticated connections dropped so far (failed, timed out or evicted)."""
        return self._drops.total

    def _accept(self, endpoint: FramedEndpoint) -> None:
        """Take ownership of a freshly accepted, unauthenticated endpoint."""
        if self._closed:
            endpoint.abort()
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(endpoint), name=f"serve {endpoint.name}"
        )
        self._connections[task] = endpoint
        task.add_done_callback(self._connections.pop)
        self._pending[endpoint] = None
        while len(self._pending) > self._config.max_pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._drops.dropped(f"{oldest.name}: more than {self._config.max_pending} pending")
            oldest.abort()  # its _serve sees ClosedResourceError and returns

    async def _serve(self, endpoint: FramedEndpoint) -> None:
        try:
            await authenticate_server(endpoint, self._config)
        except AuthenticationError as e:
            self._stats.handshakes_failed += 1
            self._drops.dropped(e)
            endpoint.abort()
            return
        except ClosedResourceError:
            return
        finally:
            self._pending.pop(endpoint, None)
        endpoint.set_limits(self._config.limits)
        try:
            await self._handler(endpoint)
        except (ClosedResourceError, EndOfStream) as e:
            logger.debug("%s: handler for %s ended: %r", self._address, endpoint.name, e)
        except BrokenTransportError as e:
            if isinstance(e, ProtocolError):
                self._stats.protocol_errors += 1
            # str(e): a log record that keeps the error (pytest's, a memory handler) would
            # keep its traceback's frames, and the message being received, alive.
            logger.warning("%s: connection %s failed: %s", self._address, endpoint.name, str(e))
        except Exception:
            logger.exception("%s: handler for %s raised", self._address, endpoint.name)
        finally:
            await endpoint.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_accepting()
        endpoints = list(self._connections.values())
        tasks = list(self._connections)
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._config.close_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._connections)} connections"
        return f"<{type(self).__name__} {self._address} {state}>"
