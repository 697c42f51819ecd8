"""Helpers shared by the Ray runtime tests (the cluster itself is a fixture in
``tests/runtimes/conftest.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import trio

import servecore
from servecore._core.transitions import BackendConfig, ReplicaStatus, StartReplica
from servecore._core.values import backend_of
from servecore.runtimes import Query

TESTS = Path(__file__).resolve().parent
# Workers import the targets, and the same servecore as this process (not whichever
# one their interpreter would find first).
WORKER_PATH = os.pathsep.join([str(TESTS), str(Path(servecore.__file__).resolve().parents[1])])
WAIT = 60.0  # seconds; only ever a guard against hanging
NO_CPU = {"num_cpus": 0}  # replicas need no CPU slot: 2 CPUs would fit only 2 of them


#: The namespace of the test driver's own connection (each test works in one of its own).
DRIVER_NAMESPACE = "servecore-tests"


def connect_driver(cluster: Any) -> None:
    """Connect this process to ``cluster`` (a ``LocalRayCluster``) as the test driver,
    its workers importing the test targets."""
    cluster.connect(
        namespace=DRIVER_NAMESPACE, runtime_env={"env_vars": {"PYTHONPATH": WORKER_PATH}}
    )


def named_actors(ns: str) -> set[str]:
    """What Ray itself lists alive in namespace ``ns``."""
    return {
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == ns
    }


async def alive_in(ns: str) -> set[str]:
    return await trio.to_thread.run_sync(named_actors, ns)


def running(ctl: servecore.Controller) -> set[str]:
    return {tag for tag, r in ctl.state.replicas.items() if r.status is ReplicaStatus.RUNNING}


def effect(tag: str, target: str, *init_args: Any, **config: Any) -> StartReplica:
    config.setdefault("runtime_options", NO_CPU)
    return StartReplica(
        tag=tag,
        backend=backend_of(tag),
        target=f"ray_driver:{target}",
        init_args=tuple(init_args),
        init_kwargs={},
        config=BackendConfig(**config),
    )


def q(*args: Any) -> Query:
    return Query(args=args)


def pid_of(ns: str, tag: str) -> int:
    """The process id of replica ``tag`` (asked of the actor itself)."""
    info = ray.get(ray.get_actor(tag, namespace=ns).ready.remote(), timeout=WAIT)
    pid: int = info["pid"]
    return pid
