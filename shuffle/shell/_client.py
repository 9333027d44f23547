"""The sending side of the shuffle, as it runs inside Ray transfer tasks.

Transfer tasks run synchronously in ordinary Ray worker processes, which Ray reuses
across tasks. Each process gets one ``ShuffleClient`` (``_process.get_client``, created on first
use and closed at interpreter exit) that owns:

* one background thread running an asyncio loop, where every transport operation
  happens (ucxx binds its threads to one loop per process, and connections outlive
  tasks, so the loop must too);
* one transport and one ``EndpointPool`` per ``(transport, secret)``: authenticated
  endpoints keyed by actor address, reused by later tasks and runs.

On its first input it also sets the process's glibc malloc thresholds to the run's
``RunOptions.malloc`` (``shuffle._malloc``), so that the megabyte buffers of later
inputs reuse freed memory instead of faulting in new pages.

``ShuffleClient.shuffle(df, handle, i)`` splits input partition ``i`` in the calling
thread (CPU work stays off the loop, ``shuffle._split``), then on the loop batches the
pieces per owner (``shuffle._send``) and sends each message as a request: the owner's actor
answers with an ack once it stored the shards, or with the typed error that refused
them (``_reply``). It returns once every message was acknowledged, which is what
makes the transfer -> barrier -> unpack order sound.

Every wait has a deadline: one request (lock, connect, send, ack) is bounded by
``ClientConfig.request_timeout``, budget waits by ``RunOptions.limiter_timeout`` and a
whole ``shuffle`` call by ``ClientConfig.transfer_timeout``. A request that fails on a
pooled connection is retried once on a fresh one: the actor may have dropped an idle
connection, and a resent shard is dropped by its ``ShardKey`` if it had arrived.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from shuffle._closable import Closable
from shuffle._malloc import MallocTuning, tune_malloc
from shuffle._send import send_shards
from shuffle._split import Shards, split_input
from shuffle._tracebacks import PACKAGE_DIR, drop_frame_locals
from shuffle._transport import (
    ClosedResourceError,
    TransportConfig,
    TransportName,
    get_transport,
)
from shuffle.device._cuda import registry_for
from shuffle.shell._handle import RunHandle
from shuffle.shell._limits import MESSAGE_LIMITS
from shuffle.shell._pool import EndpointPool

__all__ = ["ClientConfig", "ShuffleClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SCHEMES = ("ucx", "tcp", "local")
#: Pools (one per transport and secret, i.e. per shuffle service) kept open; the least
#: recently used beyond this are closed, so a long-lived worker does not keep the
#: connections of services that are gone.
_MAX_POOLS = 4


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Deadlines of the sending side, in seconds."""

    #: One message: waiting for its endpoint, connecting, sending, and the ack.
    request_timeout: float = 120.0
    #: One whole ``shuffle`` call (all messages of one input partition).
    transfer_timeout: float = 3600.0
    #: Closing the client: endpoints, transports and the loop thread.
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("request_timeout", "transfer_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class ShuffleClient(Closable):
    """One process's sender: a loop thread, transports and endpoint pools (module doc).

    Call ``send``/``shuffle`` from any thread except the client's own loop thread.
    """

    def __init__(self, *, config: ClientConfig | None = None) -> None:
        self.config = config if config is not None else ClientConfig()
        #: How messages name their sender; receivers log it, they do not check it.
        self.name = f"transfer@{socket.gethostname()}:{os.getpid()}"
        self._pools: OrderedDict[tuple[str, bytes], EndpointPool] = OrderedDict()  # loop only
        self._malloc: MallocTuning | None = None  # what this process's malloc was set to
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="shuffle-client-loop", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<ShuffleClient {self.name} closed={self._closed}>"

    def send(self, address: str, frames: Sequence[Any], *, secret: bytes) -> None:
        """Send one message to the actor at ``address``; return once it acknowledged."""
        self._call(self._send(address, frames, secret), None)  # bounded by the request

    def connect(self, addresses: Sequence[str], *, transport: str, secret: bytes) -> None:
        """Open this process's transport (UCX context) and authenticated connections to
        ``addresses`` ahead of the first send; connections already open are kept."""
        self._call(self._connect(addresses, transport, secret), None)

    def shuffle(self, data: Any, handle: RunHandle, input_partition: int) -> None:
        """Send input partition ``input_partition`` of ``handle``'s run to its owners.

        ``data`` is a dataframe partition, or an array chunk for a rechunk run.

        Returns once every owner acknowledged every piece; raises the first failure
        (a peer's typed error such as ``StaleRunError``, a transport error, a timeout).
        """
        self.shuffle_many([(input_partition, data, (input_partition,))], handle)

    def shuffle_many(
        self,
        inputs: Sequence[tuple[int, Any, Sequence[int]]],
        handle: RunHandle,
        *,
        checked: bool = False,
    ) -> None:
        """``shuffle`` for several ``(input partition, data, covers)`` items at once:
        their pieces share messages. ``checked``, ``covers``: as for
        ``shuffle._split.split_input``."""
        tuning = handle.options.malloc
        if tuning is not None and tuning != self._malloc:
            self._malloc = tuning  # tried once per value in a row, not per input
            tune_malloc(tuning)
        shards: Shards = {}
        for input_partition, data, covers in inputs:
            split = split_input(
                data,
                spec=handle.spec,
                meta=handle.meta,
                input_partition=input_partition,
                checked=checked,
                covers=covers,
            )
            for owner, items in split.items():
                shards.setdefault(owner, []).extend(items)
        if shards:
            covered = sorted(i for _, _, c in inputs for i in c)
            more = f", ... ({len(covered)} in all)" if len(covered) > 4 else ""
            name = ", ".join(map(str, covered[:4])) + more
            self._call(self._send_shards(handle, name, shards), self.config.transfer_timeout)

    def close(self, *, graceful: bool = True) -> None:
        """Close every pool and stop the loop thread; idempotent, bounded in time.

        ``graceful=False`` aborts the connections instead of saying goodbye (at exit:
        ucxx's own exit hook may have stopped the thread a goodbye would wait for).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{self!r}: close() was called from its own loop thread")
        timeout = self.config.close_timeout
        future = asyncio.run_coroutine_threadsafe(self._aclose(graceful), self._loop)
        try:
            future.result(timeout)
        except Exception as e:  # noqa: BLE001 -- closing is best effort; what is left dies with the loop
            logger.warning("%r: closing failed: %r", self, e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("%r: loop thread did not stop within %g s", self, timeout)
        else:
            self._loop.close()

    # ---- on the loop thread

    async def _pool(self, scheme: str, secret: bytes) -> EndpointPool:
        # Only ever called on the loop thread, so the dict needs no lock.
        key = (scheme, secret)
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
        else:
            if scheme not in _SCHEMES:
                raise ValueError(f"no shuffle transport for addresses of scheme {scheme!r}")
            transport = get_transport(
                cast(TransportName, scheme),
                config=TransportConfig(secret=secret, limits=MESSAGE_LIMITS),
            )
            pool = self._pools[key] = EndpointPool(
                transport, request_timeout=self.config.request_timeout
            )
            while len(self._pools) > _MAX_POOLS:
                _, oldest = self._pools.popitem(last=False)
                await oldest.close()
        return pool

    async def _connect(self, addresses: Sequence[str], scheme: str, secret: bytes) -> None:
        pool = await self._pool(scheme, secret)
        await asyncio.gather(*(pool.connect(a) for a in addresses))

    async def _send(self, address: str, frames: Sequence[Any], secret: bytes) -> None:
        pool = await self._pool(address.partition("://")[0], secret)
        await pool.send(address, frames)

    async def _send_shards(self, handle: RunHandle, inputs: str, shards: Shards) -> None:
        spec = handle.spec
        pool = await self._pool(handle.transport, handle.secret)
        pool.retain(handle.addresses.values())
        name = f"{spec.shuffle_id}[{spec.run_id}] inputs {inputs}"

        async def deliver(owner: str, frames: list[Any]) -> None:
            await pool.send(handle.addresses[owner], frames)

        sent = await send_shards(
            shards,
            spec=spec,
            options=handle.options,
            sender=self.name,
            deliver=deliver,
            # Device payloads (frames exposing __cuda_array_interface__) travel as
            # "cuda" frames unless the run's device mode is host, where they are refused.
            registry=registry_for(handle.device.mode),
            name=name,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: %d messages, %d bytes acknowledged", name, sent.messages, sent.nbytes)

    async def _aclose(self, graceful: bool) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pools = list(self._pools.values())
        self._pools.clear()
        closing = (p.close(graceful=graceful) for p in pools)
        for result in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("%r: closing a pool failed: %r", self, result)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop; ``timeout=None`` if it bounds itself (one request)."""
        if self._closed:
            coro.close()
            raise ClosedResourceError(f"{self!r} is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self!r}: blocking call from its own loop thread")
        # The deadline is enforced on the loop, which cancels the work cleanly; the
        # wait here has a later one in case the loop stopped (a racing close()).
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            coro if timeout is None else _with_deadline(coro, timeout), self._loop
        )
        bound = (self.config.request_timeout if timeout is None else timeout) + (
            self.config.close_timeout
        )
        try:
            try:
                return future.result(bound)
            except TimeoutError:
                if future.done():
                    raise  # the coroutine's own timeout, with its own message
                future.cancel()
                raise TimeoutError(
                    f"{self!r}: its loop did not answer within {bound:g} s"
                ) from None
        except BaseException as e:
            drop_frame_locals(e, dirs=(PACKAGE_DIR,))
            raise
        finally:
            del future  # the error's traceback holds this frame; the future holds the error


async def _with_deadline(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await coro
    except TimeoutError:
        if not deadline.expired():
            raise  # a deadline inside, e.g. a request's, with its own message
        raise TimeoutError(f"shuffle client call did not finish within {timeout:g} s") from None
