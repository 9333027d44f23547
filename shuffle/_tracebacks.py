"""Break the reference cycles a failure leaves behind, without the garbage collector.

A failed transfer's traceback holds the frames it ran through, and their locals hold
input partitions (views of Ray's object store) and objects that keep the failure:
a cycle only the garbage collector frees, which an idle Ray worker rarely runs, so
each failed compute kept its inputs pinned in the store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["PACKAGE_DIR", "chained_exceptions", "drop_frame_locals"]

#: The ``shuffle`` package's folder, for ``drop_frame_locals``'s ``dirs``.
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def drop_frame_locals(error: BaseException, *, dirs: tuple[str, ...]) -> None:
    """Drop the locals of finished frames of code under ``dirs`` in ``error``'s tracebacks.

    A failed send's traceback runs through the loop's coroutines, whose frames hold
    the pieces being sent (views of the input partition: Ray's object store memory)
    and the send buffer, which keeps the failure to raise it: a reference cycle that
    only the garbage collector frees, and an idle Ray worker rarely runs it, so each
    failed transfer kept its input pinned in the store. The traceback stays printable
    (it needs code and line numbers, not locals). Frames still running (the caller's
    own) cannot be cleared and are skipped. Called once the call's coroutine is done
    (or, on the loop's timeout, with no loop frame in the tracebacks), so no frame
    cleared here belongs to a coroutine that could still resume.
    """
    for current in chained_exceptions(error):
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(dirs):
                with contextlib.suppress(RuntimeError):  # still executing
                    tb.tb_frame.clear()
            tb = tb.tb_next


def chained_exceptions(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the members of exception groups, each once.

    Visited before their tracebacks change, so callers may clear or drop them as they go.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            pending += current.exceptions
