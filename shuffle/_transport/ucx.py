"""UCX transport over ucxx: the only module that imports ``ucxx`` (lazily).

Wire protocol per message, on the endpoint's tag (ucxx agrees one per connection):
one header message (``_frames.encode_frame_header``: kind, frame count, sizes, memory
types), then the frames as wire buffers: runs of small host frames joined into one
(``_frames.coalesce_groups``; UCX's per-message cost dominates for many small
pieces, and coalescing halved a 256 x 256 shuffle of 1 MiB partitions here), every
other non-empty frame alone. An all-host message of several wire buffers travels as
one ucxx multi-buffer request (``send_multi``/``recv_multi``, see
``_travels_as_multi``); otherwise each wire buffer is its own tag message, received
into a buffer allocated from the header (``TransportConfig.allocator``), so device
frames land in their final device memory. Coalesced frames are copied out of their
wire buffer (a few KiB each). Frames exposing ``__cuda_array_interface__`` are sent
as they are. Both ends derive the plan from the header alone. UCX matches messages
of one tag in posting order, so the header and the frames of a message are posted
together (pipelined) and a send lock keeps messages from interleaving. The header is
received into a buffer sized for ``limits.max_frames``; a larger header is truncated
by UCX and rejected as a ``ProtocolError`` before anything is allocated.

Environment, set with ``setdefault`` before UCX initialises:

* ``UCX_MM_ERROR_HANDLING=y``: ucxx creates endpoints with peer error handling (so a
  dead peer raises instead of hanging). UCX's shared-memory transports (posix,
  sysv) do not claim error-handling support unless this is set, so UCX silently
  drops them for such endpoints and moves same-host data over TCP loopback instead:
  0.3-0.9 GB/s versus 3.5-9.8 GB/s with it set, as measured for this project; on a
  2-core sandbox VM ``benchmarks/transport_bandwidth.py --compare-mm-error-handling``
  still shows about 2x (UCX_PROTO_INFO=y shows sysv lanes only with it set).
* ``UCX_WARN_UNUSED_ENV_VARS=n``: ucxx itself exports UCX_* variables (e.g.
  ``UCX_RNDV_FRAG_MEM_TYPE=cuda``) that are unused on CPU-only hosts, and UCX would
  print a warning about them when each context is created.
* ``UCX_TCP_CM_REUSEADDR=y``: connections a listener accepted leave its port in
  TIME_WAIT after close, and without SO_REUSEADDR a new listener cannot bind that
  port for a minute (asyncio/socket servers set SO_REUSEADDR for the same reason).

ucxx runtime (``_UcxRuntime``): ucxx keeps one process-wide context whose threads are
bound to the event loop that was running when it was created. By default ucxx waits
for requests by polling the event loop (``wait_yield``), which keeps a core at 100%
while an endpoint merely waits for its next message; we therefore initialise ucxx
with its notifier thread (``enable_python_future=True``), which wakes asyncio futures
instead (measured: 1.0 s of CPU per idle second without, 0.03 with). That thread is
not a daemon, so it must be stopped or the interpreter hangs at exit: the last
``UcxTransport.close()`` resets ucxx, and a ``threading`` exit hook stops the thread as
a last resort. If the process moves to a new event loop (e.g. successive
``asyncio.run`` calls), ucxx is reset and re-initialised on first use in the new loop;
two event loops open at the same time are not supported (``TransportUsageError``).

The ucxx listener binds every interface (ucxx 0.52 exposes no bind address); the
``host`` given to ``listen`` is only advertised in ``Listener.address``. The handshake
still keeps unauthenticated peers out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import sys
import threading
import time
import weakref
from types import ModuleType
from typing import Any

from shuffle._tracebacks import chained_exceptions

from ._address import format_address, parse_address
from ._endpoint import ConnectionLost, FramedEndpoint
from ._errors import BrokenTransportError, ProtocolError, TransportUsageError
from ._framed import BaseTransport
from ._frames import (
    FRAME_PREFIX,
    OutFrame,
    coalesce_groups,
    decode_prefix,
    decode_sizes,
    encode_frame_header,
    frame_header_nbytes,
)
from ._listener import ServingListener
from ._reaper import ConnectionReaper, listening_ports
from ._reaper import supported as reaper_supported
from .base import Handler, TransportConfig

__all__ = ["UcxTransport", "is_available"]

logger = logging.getLogger("shuffle.transport.ucx")

_UCX_ENV_DEFAULTS = {
    "UCX_MM_ERROR_HANDLING": "y",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_TCP_CM_REUSEADDR": "y",
}
#: ucxx's endpoint teardown waits for its progress thread at most this long (ns).
_ABORT_PERIOD_NS = 1_000_000_000


def _import_ucxx() -> ModuleType:
    # UCX reads these when a context is created, which happens after this import.
    for key, value in _UCX_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import ucxx

    module: ModuleType = ucxx
    return module


@functools.cache
def is_available() -> bool:
    """Whether ucxx (and its UCX libraries) can be imported; does not start UCX."""
    try:
        _import_ucxx()
    except Exception as e:  # noqa: BLE001 -- ImportError, or OSError from loading libucx
        logger.debug("ucxx is not usable: %r", e)
        return False
    return True


def _scrub_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and of the exceptions chained to it.

    ucxx's C++ requests keep a failed request's asyncio future, hence its exception,
    alive until the UCX worker is destroyed, and such exceptions often chain others.
    Their tracebacks would pin coroutine frames holding ucxx endpoints and the ucxx
    context: the UCX endpoints (and the listener that accepted them) would outlive
    their close, and ``ucxx.reset()`` would refuse to run.
    """
    for current in chained_exceptions(error):
        current.__traceback__ = None


class _UcxRuntime:
    """Owns ucxx's process-wide context (see the module docstring)."""

    def __init__(self) -> None:
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._owned = False
        self._foreign = False
        self._users = 0
        #: Bumped at every (re)initialisation, so transports from an earlier context
        #: do not release the current one.
        self._generation = 0
        self._resetting: concurrent.futures.Future[None] | None = None
        self._exit_hook_registered = False
        #: TCP ports UCX's own transports listen on in this process (found by comparing
        #: the process's listening sockets around ``ucxx.init``), guarded by the reaper.
        self.tcp_ports: frozenset[int] = frozenset()

    async def acquire(self) -> tuple[ModuleType, int]:
        """Make sure ucxx is initialised for the running loop; returns the module and
        the generation to pass to ``release``."""
        ucxx = _import_ucxx()
        loop = asyncio.get_running_loop()
        while self._resetting is not None:
            await asyncio.wrap_future(self._resetting)
        bound = self._loop() if self._loop is not None else None
        if self._owned and bound is not loop:
            if bound is not None and not bound.is_closed():
                raise TransportUsageError(
                    "ucxx is already in use by another running event loop; ucxx supports "
                    "one event loop per process"
                )
            logger.info("event loop changed since ucxx was initialised; resetting ucxx")
            self._reset(ucxx)
        if not self._owned and not self._foreign:
            self._init(ucxx, loop)
        self._users += 1
        return ucxx, self._generation

    async def release(self, generation: int) -> None:
        if generation != self._generation or not self._owned:
            return  # that context was reset already (or is not ours)
        self._users -= 1
        if self._users > 0:
            return
        ucxx = _import_ucxx()
        self._owned = False
        done = self._resetting = concurrent.futures.Future()
        try:
            # Joining the notifier thread takes up to its 1 s wake-up period: do it off
            # the event loop. The rest of the reset must happen here.
            await asyncio.to_thread(ucxx.stop_notifier_thread)
        finally:
            self._reset(ucxx)
            self._resetting = None
            done.set_result(None)

    def _init(self, ucxx: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
        before = listening_ports() if reaper_supported() else set()
        try:
            ucxx.init(progress_mode="thread", enable_python_future=True)
        except RuntimeError:
            # Someone else created the context first; use theirs and never reset it.
            self._foreign = True
            logger.warning(
                "ucxx was initialised outside shuffle._transport; its context is used as is "
                "(without the notifier thread, waiting for messages keeps a core busy)"
            )
            return
        self._owned = True
        self._users = 0
        self._generation += 1
        supported = reaper_supported()
        self.tcp_ports = frozenset(listening_ports() - before) if supported else frozenset()
        self._loop = weakref.ref(loop)
        if not self._exit_hook_registered:
            # Runs before the interpreter joins non-daemon threads (atexit runs after).
            register = getattr(threading, "_register_atexit", None)
            if register is None:
                import atexit

                register = atexit.register
            register(self._stop_at_exit)
            self._exit_hook_registered = True

    def _reset(self, ucxx: ModuleType) -> None:
        self._owned = False
        self._loop = None
        try:
            ucxx.reset()
        except ucxx.exceptions.UCXError as e:
            logger.warning("ucxx reset found objects still alive (leaked endpoints?): %s", e)

    def _stop_at_exit(self) -> None:
        if self._owned:
            ucxx = sys.modules.get("ucxx")
            if ucxx is not None:
                ucxx.stop_notifier_thread()


_RUNTIME = _UcxRuntime()


def _travels_as_multi(groups: list[tuple[int, ...]], memtypes: list[Any]) -> bool:
    """An all-host message of several wire buffers travels as one ucxx multi request.

    Each ucxx request costs a Python future and a wake-up through the notifier thread:
    ~0.1-0.2 ms per frame measured on the project's 2-core VM, which made a message of
    64 frames of 256 KiB 6x slower than one frame of 16 MiB. ``send_multi`` moves all
    wire buffers under one request; ucxx allocates their host receive buffers itself,
    so the configured allocator sees only device frames, coalesced small frames and
    empty ones then. Derived from the header alone, so both ends agree.
    """
    return len(groups) > 1 and all(m == "host" for m in memtypes)


class _UcxEndpoint(FramedEndpoint):
    supports_device = True

    def __init__(self, *, ep: Any, ucxx: ModuleType, name: str, config: TransportConfig) -> None:
        super().__init__(name=name, config=config)
        self.io_errors = (ucxx.exceptions.UCXError,)
        self._truncated = (ucxx.exceptions.UCXMessageTruncatedError,)
        self._ep = ep
        self._torn_down = False
        self._header = bytearray(frame_header_nbytes(self._limits.max_frames))

    def _limits_changed(self) -> None:
        self._header = bytearray(frame_header_nbytes(self._limits.max_frames))

    def _detach(self, error: BaseException) -> Exception:
        """Translate a ucxx error into one that keeps only its message (the original
        stays referenced from C++, see ``_scrub_tracebacks``)."""
        _scrub_tracebacks(error)
        if isinstance(error, self._truncated):
            return ProtocolError(f"message larger than announced or allowed: {error}")
        return ConnectionLost(f"{type(error).__name__}: {error}")

    async def _post(self, request: str, *args: Any) -> Any:
        """One ucxx request, ``self._ep.<request>(*args)``, its errors translated."""
        if self._torn_down:  # checked just before ucxx touches its endpoint
            raise ConnectionLost("closed")
        try:
            return await getattr(self._ep, request)(*args)
        except self.io_errors as e:
            raise self._detach(e) from None

    async def _post_send(self, buffer: Any) -> None:
        await self._post("send", buffer)

    async def _post_recv(self, buffer: Any) -> None:
        await self._post("recv", buffer)

    async def _post_send_multi(self, buffers: list[Any]) -> None:
        await self._post("send_multi", buffers)

    async def _post_recv_multi(self) -> list[Any]:
        return list(await self._post("recv_multi"))

    @staticmethod
    async def _all(operations: list[Any]) -> None:
        # gather() starts the operations in order and each posts its UCX request before
        # its first await, so UCX sees them in message order.
        if len(operations) == 1:
            await operations[0]
            return
        for result in await asyncio.gather(*operations, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _send_message(self, kind: int, frames: list[OutFrame]) -> None:
        sizes, memtypes = [f.nbytes for f in frames], [f.memory_type for f in frames]
        groups = coalesce_groups(sizes, memtypes)
        wire: list[Any] = []
        for group in groups:
            if len(group) == 1:
                wire.append(frames[group[0]].data)
            else:  # small host frames: one copy beats one UCX message each
                wire.append(b"".join([frames[i].data for i in group]))
        header = encode_frame_header(kind, frames)
        if _travels_as_multi(groups, memtypes):
            await self._all([self._post_send(header), self._post_send_multi(wire)])
        else:
            await self._all([self._post_send(b) for b in [header, *wire]])
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: sent %d frames", self._name, len(frames))

    async def _recv_message(self) -> tuple[int, list[Any]]:
        await self._post_recv(self._header)
        kind, nframes = decode_prefix(self._header, self._limits)
        sizes, memtypes = decode_sizes(self._header, nframes, self._limits, FRAME_PREFIX.size)
        groups = coalesce_groups(sizes, memtypes)
        allocate = self._config.allocator
        multi = _travels_as_multi(groups, memtypes)
        # Frames received alone in a multi request land in ucxx's own host buffers.
        alone = {g[0] for g in groups if len(g) == 1} if multi else set()
        frames: list[Any] = [
            None if i in alone else allocate(size, memtype)
            for i, (size, memtype) in enumerate(zip(sizes, memtypes, strict=True))
        ]
        for frame, size, memtype in zip(frames, sizes, memtypes, strict=True):
            if frame is not None and memtype == "host" and memoryview(frame).nbytes != size:
                raise TransportUsageError(f"allocator returned the wrong size for {size} bytes")
        joined: dict[tuple[int, ...], Any]
        if multi:
            wire = await self._post_recv_multi()
            got = [memoryview(b).nbytes for b in wire]
            expected = [sum(sizes[i] for i in g) for g in groups]
            if got != expected:
                raise ProtocolError(f"the header announced {expected} bytes per buffer, got {got}")
            joined = {}
            for group, buffer in zip(groups, wire, strict=True):
                if len(group) == 1:
                    frames[group[0]] = buffer
                else:
                    joined[group] = buffer
        else:
            joined = {g: bytearray(sum(sizes[i] for i in g)) for g in groups if len(g) > 1}
            posted = [self._post_recv(joined[g] if len(g) > 1 else frames[g[0]]) for g in groups]
            if posted:
                await self._all(posted)
        # Coalesced small host frames arrive in one buffer and are copied into theirs.
        for group, buffer in joined.items():
            view, offset = memoryview(buffer).cast("B"), 0
            for i in group:
                memoryview(frames[i]).cast("B")[:] = view[offset : offset + sizes[i]]
                offset += sizes[i]
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: received %d frames, %d bytes", self._name, nframes, sum(sizes))
        return kind, frames

    async def _close_transport(self) -> None:
        # The goodbye's send completed; ucxx's own close() only adds a progress step.
        self._abort_transport()

    def _abort_transport(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        # Cancels posted requests: our pending operations raise UCXCanceledError.
        self._ep.abort(period=_ABORT_PERIOD_NS)
        # ucxx keeps the UCX endpoint (and through it, for accepted endpoints, the UCX
        # listener) alive until its Python Endpoint is collected; do not extend that.
        self._ep = None


class _UcxListener(ServingListener):
    def __init__(
        self, *, ucxx: ModuleType, config: TransportConfig, handler: Handler, host: str, port: int
    ) -> None:
        self._ucxx = ucxx
        self._ucx_listener = ucxx.create_listener(
            self._on_connect,
            port=port,
            endpoint_error_handling=True,
            connect_timeout=config.connect_timeout,
        )
        address = format_address("ucx", host, self._ucx_listener.port)
        super().__init__(config=config, handler=handler, address=address)
        # Raw connections that never complete UCX's wire-up stay below ucxx; bound them.
        self._reaper = ConnectionReaper(
            listener_ports={self._ucx_listener.port},
            data_ports=_RUNTIME.tcp_ports,
            deadline=config.handshake_timeout,
            cap=config.max_pending,
            on_drop=self._drops.dropped,
        )
        self._reaper.start()

    def _on_connect(self, ep: Any) -> None:
        # Called by ucxx on our event loop once its own tag exchange is done.
        endpoint = _UcxEndpoint(
            ep=ep, ucxx=self._ucxx, name=f"{self._address}<-{ep.uid:#x}", config=self._config
        )
        self._accept(endpoint)

    async def _stop_accepting(self) -> None:
        await self._reaper.stop()
        listener = self._ucx_listener
        # ucxx runs a handler coroutine per connection attempt that holds its context;
        # let those that already started finish (they reach _accept, which refuses).
        deadline = time.monotonic() + self._config.connect_timeout
        while listener.active_clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        listener.close()


class UcxTransport(BaseTransport):
    """UCX transport. Addresses are ``ucx://host:port``."""

    scheme = "ucx"

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self._ucxx: ModuleType | None = None
        self._generation = 0

    async def _runtime(self) -> ModuleType:
        if self._ucxx is None:
            self._ucxx, self._generation = await _RUNTIME.acquire()
        return self._ucxx

    async def _listen(self, host: str, port: int, handler: Handler) -> _UcxListener:
        if not host or not 0 <= port < 65536:
            raise TransportUsageError(f"invalid host/port {host!r}:{port!r}")
        ucxx = await self._runtime()
        try:
            return _UcxListener(
                ucxx=ucxx, config=self._config, handler=handler, host=host, port=port
            )
        except ucxx.exceptions.UCXError as e:
            raise BrokenTransportError(f"cannot listen on ucx {host}:{port}: {e!r}") from e

    async def _open(self, address: str) -> _UcxEndpoint:
        host, port = parse_address(address, "ucx")
        ucxx = await self._runtime()
        timeout = self._config.connect_timeout
        try:
            ep = await asyncio.wait_for(
                ucxx.create_endpoint(
                    host, port, endpoint_error_handling=True, connect_timeout=timeout
                ),
                timeout + 1.0,  # ucxx's own timeout covers only part of the wire-up
            )
        except (TimeoutError, ucxx.exceptions.UCXError, OSError) as e:
            # ucxx's frames in these tracebacks hold its context (see _scrub_tracebacks).
            _scrub_tracebacks(e)
            failure = f"cannot connect to {address}: {e!r}"
        else:
            return _UcxEndpoint(
                ep=ep, ucxx=ucxx, name=f"{address}#{ep.uid:#x}", config=self._config
            )
        raise BrokenTransportError(failure)

    async def _shutdown(self) -> None:
        if self._ucxx is not None:
            self._ucxx = None
            await _RUNTIME.release(self._generation)
