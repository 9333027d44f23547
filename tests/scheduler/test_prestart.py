"""The background start of the shuffle service (pure: a stand-in service)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ray_oob_sched._prestart import Prestart


class _Service:
    """Actors start at once; warming the senders ends as ``warm`` says."""

    def __init__(self, warm: BaseException) -> None:
        self.warm = warm

    def warm_imports(self, *, tasks: int) -> list[Any]:
        return []

    def actors(self) -> None:
        return None

    def warm_senders(self, *, tasks: int) -> list[Any]:
        raise self.warm


@pytest.mark.parametrize("ending", [SystemExit(0), RuntimeError("no worker")])
def test_warming_ends_quietly_when_ray_goes_away(monkeypatch, ending):
    """Ray raises SystemExit in a thread blocked on it when the driver disconnects
    (``ray.shutdown()`` while warming): the thread ends without an unhandled error."""
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    prestart = Prestart(_Service(ending), warm_tasks=lambda: 2, timeout=5)
    assert prestart.join(5)
    prestart.wait()  # the actors part finished
    assert prestart.error is None
    assert escaped == []
