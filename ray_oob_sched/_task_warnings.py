"""Pure: warnings raised in tasks, captured per group and re-emitted in the caller.

Under dask's local schedulers a ``RuntimeWarning`` raised by numpy in a task
reaches the user; in a Ray worker it would only reach the worker's log. The
worker records every warning of a group (``catch_warnings``, one per group, a few
microseconds) and ships the distinct ones back with the group's status; the
driver re-emits each distinct (category, message) once per compute with
``warnings.warn_explicit``, so the caller's filters, ``pytest.warns`` and
``warnings.catch_warnings`` see them. The message is kept; the key that raised it
is named in the reported file name.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ray_oob_sched._graph import Key


@dataclass(frozen=True, slots=True)
class TaskWarning:
    category: type[Warning]
    message: str
    key: str  # repr of the dask key whose task raised it
    filename: str
    lineno: int


class Recorder:
    """Records the warnings of one group, each with the key being computed."""

    def __init__(self) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._log: list[warnings.WarningMessage] = []
        self._found: dict[tuple[type[Warning], str], TaskWarning] = {}

    def __enter__(self) -> Self:
        self._log = self._context.__enter__()
        warnings.simplefilter("always")  # the caller's filters decide, not the worker's
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._context.__exit__(kind, exc, tb)

    def after(self, key: Key) -> None:
        """Attribute the warnings recorded since the last call to ``key``."""
        for w in self._log:
            found = (w.category, str(w.message))
            if found not in self._found:
                self._found[found] = TaskWarning(
                    w.category, found[1], repr(key), w.filename, w.lineno
                )
        self._log.clear()

    def warnings(self) -> tuple[TaskWarning, ...]:
        return tuple(self._found.values())


class Forwarder:
    """Re-emits task warnings in the caller's process, once per distinct warning."""

    def __init__(self) -> None:
        self._seen: set[tuple[type[Warning], str]] = set()

    def emit(self, found: Iterable[TaskWarning]) -> None:
        for w in found:
            if (w.category, w.message) in self._seen:
                continue
            self._seen.add((w.category, w.message))
            warnings.warn_explicit(
                w.message,
                w.category,
                f"{w.filename} (in dask key {w.key}, on a Ray worker)",
                w.lineno,
                module="ray_oob_sched.task",
            )
