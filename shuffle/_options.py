"""The options of a shuffle run, shared by its senders and its receivers.

Receivers (the runs of ``shuffle._run``) use the memory and spill settings; senders
(``shuffle._send``, in transfer tasks) the message size, send budget, concurrency,
the combining threshold and their process's malloc thresholds. One ``RunOptions``
travels with every run's handle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from shuffle._malloc import DEFAULT_MALLOC, MallocTuning

__all__ = ["AUTO_MEMORY_FRACTION", "DEFAULT_OPTIONS", "RunOptions", "auto_memory_limit"]


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Knobs of a run: its receivers' memory and spilling, its senders' batching."""

    #: Bytes of received shards held in memory before spilling to disk; ``None`` never
    #: spills, ``0`` spills everything, ``"auto"`` is a share of the memory of the
    #: machine the run lives on (``auto_memory_limit``), resolved there.
    memory_limit: int | Literal["auto"] | None = 256 * 2**20
    #: Where spill directories are created (default: the system's temporary directory).
    spill_directory: str | os.PathLike[str] | None = None
    #: Target size of one message; a single larger shard still travels alone.
    message_bytes: int = 16 * 2**20
    #: Bytes one sender (one ``shuffle`` call of a transfer task's client) keeps queued
    #: or in flight before it waits (back-pressure); ``None`` never waits.
    send_buffer_bytes: int | None = 512 * 2**20
    #: Seconds a sender waits for send budget before raising ``LimiterTimeoutError``;
    #: ``None`` waits indefinitely.
    limiter_timeout: float | None = 300.0
    #: Messages one sender has in flight at once, over all destinations.
    concurrency: int = 4
    #: A transfer task sends the dataframe inputs it computes in a row as one
    #: combined input once they reach this many bytes (``shuffle._combine``); ``0``
    #: sends every input on its own.
    combine_bytes: int = 16 * 2**20
    #: glibc malloc's thresholds set in each process that sends (``shuffle._malloc``);
    #: ``None`` leaves them alone.
    malloc: MallocTuning | None = DEFAULT_MALLOC

    def __post_init__(self) -> None:
        limit = self.memory_limit
        if limit != "auto" and limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"memory_limit must be >= 0, None or 'auto', got {limit!r}")
        if self.message_bytes < 1 or self.concurrency < 1:
            raise ValueError(
                f"message_bytes and concurrency must be >= 1, got {self.message_bytes} "
                f"and {self.concurrency}"
            )
        if self.send_buffer_bytes is not None and self.send_buffer_bytes < 1:
            raise ValueError(
                f"send_buffer_bytes must be >= 1 or None, got {self.send_buffer_bytes}"
            )
        if self.limiter_timeout is not None and self.limiter_timeout <= 0:
            raise ValueError(f"limiter_timeout must be > 0 or None, got {self.limiter_timeout}")
        if isinstance(self.combine_bytes, bool) or self.combine_bytes < 0:
            raise ValueError(f"combine_bytes must be >= 0, got {self.combine_bytes!r}")
        if self.malloc is not None and not isinstance(self.malloc, MallocTuning):
            raise TypeError(f"malloc must be a MallocTuning or None, got {self.malloc!r}")


DEFAULT_OPTIONS = RunOptions()

#: ``memory_limit="auto"``: this fraction of the machine's physical memory, per run
#: (the shuffle actors of one node split it: ``_actor.resolve_memory_limit``).
AUTO_MEMORY_FRACTION = 1 / 16
_AUTO_MEMORY_FLOOR = 64 * 2**20


def auto_memory_limit(fraction: float = AUTO_MEMORY_FRACTION) -> int:
    """``fraction`` of this machine's physical memory, at least 64 MiB.

    A share, not all of it: Ray's object store (30% by default), the workers and
    other runs live on the same machine, and a run beyond its budget spills rather
    than fails.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 256 * 2**20
    return max(_AUTO_MEMORY_FLOOR, int(total * fraction))
