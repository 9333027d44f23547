"""Pure: the tasks that give dask's results only in the caller's process.

dask's local schedulers run every task in the caller's process; Ray runs it in a
worker, on pickled copies of its functions and data. For almost every task that
gives the same result. For these it does not, so they run in the caller's process
(``RaySchedule``), or, with ``scheduler.run-in-caller: false``, are refused before
anything runs:

- **a function that rebinds a variable of its enclosing function** (``nonlocal``):
  a counter or a flag that the caller reads afterwards. In a worker the function
  rebinds a copy and the caller never sees the change;
- **a task that reads a store target in the caller's memory** through what
  ``da.store(..., return_stored=True, load_stored=False)`` returned: the driver
  writes such targets (``_store``), so only there does the task see the data
  (a consumer fused into the storing task runs there with the real target);
- **a group that cannot be pickled** (a generator or a lock in the graph): found when
  its submission fails (``RayExecutor.submit``), not here.

A task of the first two kinds gets its own options token, so fusion never puts it
into a group with tasks that can run in a worker.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import types
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from dask._task_spec import DataNode, GraphNode, Task, TaskRef, _execute_subgraph

from ray_oob_sched._graph import Key

#: The options token of tasks that run in the caller's process.
IN_CALLER = ("ray_oob_sched: in the caller's process",)

_STORE_FIX = "to run it in a worker, use load_stored=True, or compute the store first"
#: Items of one container searched for functions; larger ones are data.
_MAX_ITEMS = 256
#: Types that hold no function (the usual arguments: skipped at once).
_LEAVES = frozenset({TaskRef, int, float, str, bytes, bool, type(None), slice})
#: Objects searched per task, at most.
_MAX_VISITS = 10_000


class CallerOnlyTaskError(TypeError):
    """A task whose result is dask's only in the caller's process, with
    ``scheduler.run-in-caller`` off."""


def caller_keys(
    nodes: Mapping[Key, GraphNode],
    dependents: Mapping[Key, Iterable[Key]],
    *,
    stand_ins: Iterable[Key] = (),
    readers: Iterable[Key] = (),
    exclude: frozenset[Key] = frozenset(),
) -> dict[Key, str]:
    """The keys of ``nodes`` that run in the caller's process, each with why.

    ``stand_ins`` are keys that may return a store target's stand-in (``_store``):
    their dependents read the target; ``readers`` read one themselves. Keys in
    ``exclude`` (pinned to the node of a disk shuffle) stay in the workers whatever
    they hold."""
    found: dict[Key, str] = {}
    for key, node in nodes.items():
        if key in exclude:
            continue
        name = _rebinding_function(node)
        if name is not None:
            found[key] = (
                f"its function {name} rebinds a variable of the function that defined it "
                "(nonlocal), which the caller reads; to run it in a worker, return the "
                "value instead of setting a variable"
            )
    for key in readers:
        if key not in exclude:
            found.setdefault(
                key,
                "it reads the store target it writes (da.store(..., return_stored=True, "
                f"load_stored=False)), which the caller's process writes; {_STORE_FIX}",
            )
    for key in stand_ins:
        for dep in dependents.get(key, ()):
            if dep not in exclude and dep not in found:
                found[dep] = (
                    f"it reads the store target that {key!r} returned "
                    "(da.store(..., return_stored=True, load_stored=False)), which "
                    f"the caller's process writes; {_STORE_FIX}"
                )
    return found


def refusal(key: Key, reason: str) -> CallerOnlyTaskError:
    """The error for a task that must run in the caller's process, when that is off."""
    return CallerOnlyTaskError(
        f"dask key {key!r} gives dask's result only in the caller's process: {reason}; "
        "or set ray-oob-sched.scheduler.run-in-caller to true to run such tasks there"
    )


def _rebinding_function(node: GraphNode) -> str | None:
    """The qualified name of a function in ``node`` that rebinds an enclosing
    function's variable, if any.

    Searched: the task's function and arguments, nested tasks and fused subgraphs,
    ``functools.partial`` objects, bound methods, ``np.vectorize``'s function,
    decorated functions (``__wrapped__``), the functions a closure calls (its
    cells), and containers of up to ``_MAX_ITEMS`` (larger ones hold data); at most
    ``_MAX_VISITS`` objects per task."""
    stack: list[Any] = [node]
    seen: set[int] = set()  # functions and containers: closures may refer to themselves
    visits = 0
    while stack and visits < _MAX_VISITS:
        obj = stack.pop()
        visits += 1
        kind = type(obj)
        if kind in _LEAVES:
            continue
        if kind is types.FunctionType:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if rebinds_enclosing(obj):
                return str(obj.__qualname__)
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    stack.append(cell.cell_contents)
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:
                stack.append(wrapped)
        elif isinstance(obj, Task):
            stack.append(obj.func)
            if obj.func is _execute_subgraph and obj.args and type(obj.args[0]) is dict:
                stack.extend(obj.args[0].values())  # a fused subgraph: tasks, any number
                stack.extend(obj.args[1:])
            else:
                stack.extend(obj.args)
            stack.extend(obj.kwargs.values())
        elif isinstance(obj, DataNode):
            stack.append(obj.value)
        elif isinstance(obj, functools.partial):
            stack.append(obj.func)
            stack.extend(obj.args)
            stack.extend(obj.keywords.values())
        elif kind is types.MethodType:
            stack.append(obj.__func__)
        elif isinstance(obj, np.vectorize):
            stack.append(obj.pyfunc)
        elif kind in (tuple, list) and len(obj) <= _MAX_ITEMS and id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(obj)
        elif kind is dict and len(obj) <= _MAX_ITEMS and id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(obj.values())
    return None


def rebinds_enclosing(f: Any) -> bool:
    """Whether the Python function ``f`` assigns to (or deletes) a variable of an
    enclosing function: ``nonlocal x; x = ...``, also from a function nested in it."""
    code = getattr(f, "__code__", None)
    if not isinstance(code, types.CodeType) or not code.co_freevars:
        return False  # no enclosing variables: the common, cheap case
    return _rebinds(code, frozenset(code.co_freevars))


@functools.lru_cache(maxsize=4096)
def _rebinds(code: types.CodeType, names: frozenset[str]) -> bool:
    for ins in dis.get_instructions(code):
        if ins.opname in ("STORE_DEREF", "DELETE_DEREF") and ins.argval in names:
            return True
    return any(
        _rebinds(const, names & frozenset(const.co_freevars))
        for const in code.co_consts
        if isinstance(const, types.CodeType) and not names.isdisjoint(const.co_freevars)
    )
