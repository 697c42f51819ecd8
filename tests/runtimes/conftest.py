"""The private Ray cluster of the Ray runtime tests: one head node on loopback for the
whole session, started only when a test asks for it (:class:`LocalRayCluster`: free
ports on 127.0.0.1, a fresh temporary directory; at the end exactly its own processes
are stopped -- never ``ray stop``)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A Ray head node for the session; this process is connected to it as a driver."""
    ray = pytest.importorskip(
        "ray", reason="the Ray runtime tests need the 'ray' extra: pip install 'servecore[ray]'"
    )
    from ray_helpers import connect_driver
    from servecore.runtimes.ray import LocalRayCluster

    head = LocalRayCluster(num_cpus=2, object_store_memory=200 * 1024 * 1024)
    head.start()
    try:
        connect_driver(head)
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.stop()
        assert not head.pids(), "processes of the test cluster survived its stop"


@pytest.fixture
def namespace(cluster: Any) -> Iterator[str]:
    """A fresh Ray namespace; whatever the test leaves alive in it is killed."""
    import ray

    from ray_helpers import named_actors

    ns = f"t-{uuid.uuid4().hex[:8]}"
    yield ns
    for name in named_actors(ns):
        with contextlib.suppress(ValueError):  # it died meanwhile
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
