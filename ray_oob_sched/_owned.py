"""Pure: make fetched results the caller's own (writeable, not aliasing Ray's store).

Ray hands out numpy arrays, and the numpy blocks of pandas objects, as read-only
zero-copy views of its object store (or of the bytes of a small inlined object).
dask's schedulers promise the caller a result they own, so every read-only array
in a result is copied once; arrays already writeable (made by deserialisation, or
owned) are left alone. Containers are walked as dask returns them (tuples, lists,
dicts), skipped in one C-level pass when they hold nothing array-like.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CONTAINERS = (tuple, list, dict)


def owned(value: Any) -> Any:
    """``value`` with every read-only numpy array in it (or in its pandas blocks)
    replaced by a writeable copy; lists and dicts are updated in place."""
    if isinstance(value, np.ndarray):
        return value if value.flags.writeable else value.copy()
    kind = type(value)
    if kind is list:
        if _may_hold_arrays(value):
            value[:] = [owned(v) for v in value]
        return value
    if kind is dict:
        if _may_hold_arrays(value.values()):
            for k, v in value.items():
                value[k] = owned(v)
        return value
    if isinstance(value, tuple):
        if not _may_hold_arrays(value):
            return value
        items = [owned(v) for v in value]
        if kind is tuple:
            return tuple(items)
        make = getattr(value, "_make", None)  # a namedtuple
        return make(items) if make is not None else value
    if _is_pandas(kind):
        _own_pandas(value)
    return value


def _may_hold_arrays(items: Any) -> bool:
    for t in set(map(type, items)):
        if issubclass(t, (np.ndarray, *_CONTAINERS)) or _is_pandas(t):
            return True
    return False


def _is_pandas(kind: type) -> bool:
    return kind.__module__.startswith("pandas")


def _own_pandas(value: Any) -> None:
    """Copy the read-only blocks of a DataFrame or Series in place (owned ones stay)."""
    mgr = getattr(value, "_mgr", None)
    for block in getattr(mgr, "blocks", ()):
        data = block.values
        if isinstance(data, np.ndarray):
            if not data.flags.writeable:
                block.values = data.copy()
        elif _read_only_extension(data):
            block.values = data.copy()


def _read_only_extension(data: Any) -> bool:
    # Masked arrays (Int64, boolean, ...) keep _data and _mask; datetime-like and
    # categorical arrays an _ndarray. Arrow-backed arrays are immutable anyway.
    for name in ("_data", "_mask", "_ndarray"):
        part = getattr(data, name, None)
        if isinstance(part, np.ndarray) and not part.flags.writeable:
            return True
    return False
