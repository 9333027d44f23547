"""The one ``ShuffleClient`` of a process (``get_client``).

A transfer task is a plain function in a reused worker process: the only place a
client can outlive one task is process-wide state, held here.
"""

from __future__ import annotations

import atexit
import os
import threading

from shuffle.shell._client import ShuffleClient

__all__ = ["get_client"]


class _PerProcess:
    """Holds the one ``ShuffleClient`` of this process.

    A transfer task is a plain function in a reused worker process: the only place a
    client can outlive one task is process-wide state. This holder is that state, the
    single exception to "no module globals", and it re-creates the client in a forked
    child (whose copy of the loop thread does not exist).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: ShuffleClient | None = None
        self._pid = 0
        self._exit_hook = False

    def get(self) -> ShuffleClient:
        with self._lock:
            if self._client is None or self._pid != os.getpid() or self._client.closed:
                self._client = ShuffleClient()
                self._pid = os.getpid()
                if not self._exit_hook:
                    # Before the interpreter joins threads and stops executors: closing
                    # a UCX transport needs an executor thread (ucx.py does the same).
                    register = getattr(threading, "_register_atexit", atexit.register)
                    register(self._close_at_exit)
                    self._exit_hook = True
            return self._client

    def _close_at_exit(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close(graceful=False)


_PROCESS = _PerProcess()


def get_client() -> ShuffleClient:
    """This process's client, created on first use and closed at interpreter exit."""
    return _PROCESS.get()
