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

import dis
import functools
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dask._task_spec import DataNode, GraphNode, Task

from ray_oob_sched._graph import Key

#: The options token of tasks that run in the caller's process.
IN_CALLER = ("ray_oob_sched: in the caller's process",)

#: Items of one container searched for functions; larger ones are data.
_MAX_ITEMS = 256


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
                "(nonlocal), which the caller reads"
            )
    for key in readers:
        if key not in exclude:
            found.setdefault(
                key,
                "it reads the store target it writes (da.store(..., return_stored=True, "
                "load_stored=False)), which the caller's process writes",
            )
    for key in stand_ins:
        for dep in dependents.get(key, ()):
            if dep not in exclude and dep not in found:
                found[dep] = (
                    f"it reads the store target that {key!r} returned "
                    "(da.store(..., return_stored=True, load_stored=False)), which "
                    "the caller's process writes"
                )
    return found


def refusal(key: Key, reason: str) -> CallerOnlyTaskError:
    """The error for a task that must run in the caller's process, when that is off."""
    return CallerOnlyTaskError(
        f"dask key {key!r} gives dask's result only in the caller's process: {reason}. "
        "Set ray-oob-sched.scheduler.run-in-caller to true to run such tasks there, "
        "or change the task (return the value instead of setting a variable)"
    )


def _rebinding_function(node: GraphNode) -> str | None:
    """The qualified name of a function in ``node`` that rebinds an enclosing
    function's variable, if any."""
    for f in _functions(node, depth=0):
        if rebinds_enclosing(f):
            return getattr(f, "__qualname__", repr(f))
    return None


def _functions(obj: Any, *, depth: int) -> Iterator[Any]:
    """Python functions in a task: its function, its arguments', those of nested
    tasks and fused subgraphs, and those inside ``functools.partial`` objects."""
    if depth > 16:
        return
    if isinstance(obj, types.FunctionType):
        yield obj
    elif isinstance(obj, Task):
        yield from _functions(obj.func, depth=depth + 1)
        for arg in (*obj.args, *obj.kwargs.values()):
            yield from _functions(arg, depth=depth + 1)
    elif isinstance(obj, DataNode):
        yield from _functions(obj.value, depth=depth + 1)
    elif isinstance(obj, functools.partial):
        yield from _functions(obj.func, depth=depth + 1)
        for arg in (*obj.args, *obj.keywords.values()):
            yield from _functions(arg, depth=depth + 1)
    elif type(obj) in (tuple, list) and len(obj) <= _MAX_ITEMS:
        for item in obj:
            yield from _functions(item, depth=depth + 1)
    elif type(obj) is dict and len(obj) <= _MAX_ITEMS:
        for item in obj.values():
            yield from _functions(item, depth=depth + 1)


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
