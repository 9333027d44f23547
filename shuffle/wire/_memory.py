"""Kinds of memory a shuffle message can carry, and how each is handled.

A ``MemoryRegistry`` maps each ``MemoryType`` to ``MemoryHooks``: how an object of that
kind is recognised, wrapped for sending without a copy, measured, and received into.
Host memory is built in (``HOST_REGISTRY``); device memory (CuPy, RMM) plugs in by
extending a registry (``shuffle.device._cuda``), never by mutating a global.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "HOST_HOOKS",
    "HOST_REGISTRY",
    "MemoryHooks",
    "MemoryRegistry",
    "MemoryType",
    "host_nbytes",
]


class MemoryType(str, enum.Enum):  # noqa: UP042 -- StrEnum would change str() of members
    HOST = "host"
    CUDA = "cuda"


@dataclass(frozen=True)
class MemoryHooks:
    """How one kind of memory is recognised, sent, measured and received into."""

    owns: Callable[[Any], bool]  # does this object live in this kind of memory?
    wrap: Callable[[Any], Any]  # object -> buffer a transport can send, without copying
    nbytes: Callable[[Any], int]
    allocate: Callable[[int], Any]  # an uninitialised receive buffer of n bytes


def _host_owns(obj: Any) -> bool:
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


def _host_wrap(obj: Any) -> memoryview:
    view = memoryview(obj)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def host_nbytes(obj: Any) -> int:
    """Bytes of a host buffer (anything with the buffer protocol); ``TypeError`` else."""
    with memoryview(obj) as view:
        return view.nbytes


HOST_HOOKS = MemoryHooks(
    owns=_host_owns,
    wrap=_host_wrap,
    nbytes=host_nbytes,
    allocate=lambda n: memoryview(bytearray(n)),
)


class MemoryRegistry:
    """Immutable map from memory type to hooks; ``with_hooks`` returns an extended copy.

    Immutability lets ``HOST_REGISTRY`` be shared safely: plugging in device memory
    builds a new registry that its owner passes on, instead of mutating a global.
    """

    def __init__(self, hooks: Mapping[MemoryType, MemoryHooks]) -> None:
        if MemoryType.HOST not in hooks:
            raise ValueError("a memory registry needs host hooks")
        self._hooks = MappingProxyType(dict(hooks))

    # Plain strings ("host", "cuda", as the transports spell them) are accepted too.
    def with_hooks(self, memory_type: MemoryType | str, hooks: MemoryHooks) -> MemoryRegistry:
        return MemoryRegistry({**self._hooks, MemoryType(memory_type): hooks})

    def hooks(self, memory_type: MemoryType | str) -> MemoryHooks:
        memory_type = MemoryType(memory_type)
        try:
            return self._hooks[memory_type]
        except KeyError:
            raise LookupError(
                f"no hooks registered for {memory_type.value!r} memory; build the "
                "registry with MemoryRegistry.with_hooks to support it"
            ) from None

    def memory_type_of(self, obj: Any) -> MemoryType:
        """Device types are asked first, since device arrays may also be host-viewable."""
        for memory_type, hooks in self._hooks.items():
            if memory_type is not MemoryType.HOST and hooks.owns(obj):
                return memory_type
        if self._hooks[MemoryType.HOST].owns(obj):
            return MemoryType.HOST
        raise TypeError(
            f"cannot send a {type(obj).__name__}: it is neither a host buffer nor owned "
            f"by a registered memory type ({', '.join(m.value for m in self._hooks)})"
        )


HOST_REGISTRY = MemoryRegistry({MemoryType.HOST: HOST_HOOKS})
