from __future__ import annotations

import time

import pytest

# One Ray for the whole session: starting Ray costs ~5 s on a 2-core machine.
# Bounded object store (the lifetime tests rely on it being small) and a dashboard,
# because ray.util.state (object and task listings) is served by it.
OBJECT_STORE_BYTES = 128 * 2**20


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(
        num_cpus=2,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(items):
    """Ship test modules' functions to Ray workers by value.

    Workers cannot import test modules (they are not on their path), and module-
    level helpers in them are otherwise pickled by reference.
    """
    try:
        from ray import cloudpickle
    except ImportError:
        return
    for module in {item.module for item in items if getattr(item, "module", None)}:
        cloudpickle.register_pickle_by_value(module)


def assert_dies(actor: object, *, wait: float) -> None:
    """Wait (bounded by ``wait`` seconds) until calls to ``actor`` fail: ``ray.kill``
    takes effect asynchronously, so a call made just after it may still be answered."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        try:
            ray.get(actor.runs.remote(), timeout=wait)  # type: ignore[attr-defined]
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, f"{actor} is still alive {wait:g} s after close"
        time.sleep(0.1)
