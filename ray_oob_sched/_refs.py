"""The ObjectRef table: the scheduler's only handle on data in Ray.

Holding a ref here keeps its object alive; ``release`` drops the ref and lets Ray's
distributed reference counting free the object once the tasks already submitted
with it are done. ``clear`` at the end of every compute, failed or not, leaves no
reference of ours behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ray_oob_sched._graph import Key


class RefTable(Mapping[Key, Any]):
    def __init__(self) -> None:
        self._refs: dict[Key, Any] = {}

    def __getitem__(self, key: Key) -> Any:
        try:
            return self._refs[key]
        except KeyError:
            raise KeyError(
                f"no ObjectRef for key {key!r}: it was released or never produced"
            ) from None

    def __iter__(self) -> Iterator[Key]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, key: Key, ref: Any) -> None:
        self._refs[key] = ref

    def release(self, keys: Iterable[Key]) -> None:
        for k in keys:
            self._refs.pop(k, None)

    def clear(self) -> None:
        self._refs.clear()
