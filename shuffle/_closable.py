"""``Closable``: the read-only ``closed`` flag of objects that close once, for good."""

from __future__ import annotations

__all__ = ["Closable"]


class Closable:
    """Mixin: ``closed`` reads the ``_closed`` flag that the class's own close sets.

    A mixin rather than an attribute, so that only the object itself can close itself;
    put it first among the bases so that it implements an abstract ``closed``.
    """

    _closed: bool

    @property
    def closed(self) -> bool:
        return self._closed
