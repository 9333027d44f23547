"""Typed shuffle errors: one class per failure kind, each naming what failed.

Exceptions cross process boundaries (Ray pickles them back to the caller), so each class
keeps its constructor arguments as ``args`` and builds its message in ``__str__``: that
way the default pickling, which calls ``cls(*args)``, reconstructs them intact. Where a
builtin base interprets ``args`` itself (``TimeoutError``), ``__reduce__`` does the job.
"""

from __future__ import annotations

__all__ = [
    "BufferClosedError",
    "FrameError",
    "InconsistentInputsError",
    "LimiterTimeoutError",
    "RemoteShuffleError",
    "ShuffleClosedError",
    "ShuffleError",
    "StaleRunError",
    "UnknownRunError",
]


class ShuffleError(Exception):
    """Base class of every error the shuffle raises on purpose."""


class StaleRunError(ShuffleError):
    """Work stamped with an older run id met a newer run of the same shuffle."""

    def __init__(self, shuffle_id: str, run_id: int, current_run_id: int) -> None:
        super().__init__(shuffle_id, run_id, current_run_id)
        self.shuffle_id = shuffle_id
        self.run_id = run_id
        self.current_run_id = current_run_id

    def __str__(self) -> str:
        return (
            f"shuffle {self.shuffle_id!r}: run {self.run_id} is stale, run "
            f"{self.current_run_id} superseded it; discard work stamped with run "
            f"{self.run_id} and redo it under run {self.current_run_id}"
        )


class ShuffleClosedError(ShuffleError):
    """A run was used after it completed, failed or was superseded."""

    def __init__(self, shuffle_id: str, run_id: int, reason: str = "") -> None:
        super().__init__(shuffle_id, run_id, reason)
        self.shuffle_id = shuffle_id
        self.run_id = run_id
        self.reason = reason

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"shuffle {self.shuffle_id!r} run {self.run_id} is closed{why} and accepts "
            "no more calls; if its output is still needed, restart the shuffle under a "
            "new run"
        )


class UnknownRunError(ShuffleError, LookupError):
    """A message or call named a run that was never created on this participant."""

    def __init__(self, shuffle_id: str, run_id: int, participant: str) -> None:
        super().__init__(shuffle_id, run_id, participant)
        self.shuffle_id = shuffle_id
        self.run_id = run_id
        self.participant = participant

    def __str__(self) -> str:
        return (
            f"shuffle {self.shuffle_id!r} run {self.run_id} does not exist on "
            f"{self.participant!r}; the driver must create a run on every participant "
            "before any participant sends to it"
        )


class FrameError(ShuffleError, ValueError):
    """Bytes received from a peer do not form a valid shuffle message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"malformed shuffle frame: {self.reason}; both ends must run the same "
            "shuffle protocol version, and nothing else may write to shuffle endpoints"
        )


class InconsistentInputsError(ShuffleError, ValueError):
    """Pieces of one run cover overlapping sets of input partitions: a retried
    transfer task computed other inputs than its first attempt, so keeping either
    would lose or double rows (``shuffle._combine``)."""


class LimiterTimeoutError(ShuffleError, TimeoutError):
    """A byte budget stayed exhausted for longer than the caller agreed to wait."""

    def __init__(self, name: str, timeout: float, acquired: int, limit: int) -> None:
        # TimeoutError is an OSError, which would read several arguments as
        # (errno, strerror, ...): give it one, and pickle through __reduce__.
        super().__init__(name)
        self.name = name
        self.timeout = timeout
        self.acquired = acquired
        self.limit = limit

    def __reduce__(self) -> tuple[type[LimiterTimeoutError], tuple[str, float, int, int]]:
        return type(self), (self.name, self.timeout, self.acquired, self.limit)

    def __str__(self) -> str:
        return (
            f"resource limiter {self.name!r} stayed full for {self.timeout:g} s "
            f"({self.acquired} bytes held, limit {self.limit}); whoever consumes this "
            "memory did not release it in time: check that the receiving peers are "
            "alive, or raise the limit or the timeout"
        )


class BufferClosedError(ShuffleError):
    """A shards buffer or shard store was used after this process closed it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (
            f"{self.name!r} is closed and accepts no more calls; it served one run, so "
            "a new run needs a new one"
        )


class RemoteShuffleError(ShuffleError):
    """A shuffle actor refused a message with an error that has no typed twin here.

    Typed shuffle errors travel back to senders as themselves (see ``_reply``); anything
    else (a bug, a full disk) arrives as this, naming the original type and message.
    """

    def __init__(self, peer: str, type_name: str, message: str) -> None:
        super().__init__(peer, type_name, message)
        self.peer = peer
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.peer} refused a message: {self.type_name}: {self.message}"
