"""A private Ray cluster on loopback, for tests, benchmarks and demos: a head node, and
worker nodes (raylets of their own) on the same machine when a test needs more than
one node."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray

from servecore.runtimes.ray.connection import keep_loopback

__all__ = ["LocalRayCluster", "LocalRayNode"]

#: The script that runs ``ray start`` for a worker node on loopback (see its docstring).
_RAY_START = Path(__file__).with_name("_ray_start.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ports() -> list[str]:
    """Free ports for the per-node services Ray would otherwise put on fixed ports
    (two nodes on one machine must not share them)."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def _marked(marker: str, mark: str) -> list[int]:
    """The processes whose environment has ``marker=mark`` or whose command line names
    ``mark``, and their descendants (Ray renames its workers, which can hide their
    environment); never this process."""
    import psutil

    me = os.getpid()
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            hit = mark in " ".join(proc.info["cmdline"] or ())
            hit = hit or proc.environ().get(marker) == mark
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if hit:
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for child in proc.children(recursive=True):
                if child.pid != me:
                    found.setdefault(child.pid, child)
    return sorted(found)


def _terminate(pids: Iterable[int], timeout_s: float) -> None:
    """SIGTERM ``pids``, SIGKILL those left after ``timeout_s`` (a throwaway cluster has
    nothing to save: Ray's daemons can take 10 s and more to go on SIGTERM)."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10.0)


class LocalRayNode:
    """A worker node of a :class:`LocalRayCluster`: a raylet of its own (with its
    agents and workers) on the same machine, joined to the private head on loopback.
    Made by :meth:`LocalRayCluster.add_node`; stopped with the cluster, or on its own
    (:meth:`stop`), or crashed (:meth:`kill_raylet`)."""

    #: The environment variable that marks this node's processes with its directory.
    MARKER = "SERVECORE_RAY_NODE"

    def __init__(self, node_id: str, temp_dir: str) -> None:
        #: The node's Ray id (hex), as ``ray.nodes()`` and replicas report it.
        self.node_id = node_id
        #: The node's own temporary directory (inside the head's).
        self.temp_dir = temp_dir

    def __repr__(self) -> str:
        return f"LocalRayNode(node_id={self.node_id!r})"

    def pids(self) -> list[int]:
        """The processes of this node: its raylet, agents and workers."""
        return _marked(self.MARKER, self.temp_dir)

    def raylet_pid(self) -> int | None:
        """The process id of this node's raylet (``None`` once it is gone)."""
        import psutil

        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if psutil.Process(pid).name() == "raylet":
                    return pid
        return None

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet, as a crash of its machine would end it (its
        workers go with it; the GCS notices only by its own health checks). Return the
        pid killed. Raises ``RuntimeError`` if the raylet is already gone."""
        import psutil

        pid = self.raylet_pid()
        if pid is None:
            raise RuntimeError(f"{self!r} has no raylet running (already killed or stopped)")
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(timeout=10.0)
        return pid

    def stop(self, timeout_s: float = 2.0) -> None:
        """Terminate exactly this node's processes (the head and other nodes go on)."""
        _terminate(self.pids(), timeout_s)


class LocalRayCluster:
    """A Ray head on loopback, private to its owner, stopped exactly; worker nodes of
    its own on the same machine with :meth:`add_node`.

    It listens on free ports of 127.0.0.1 only, keeps its files in a fresh short
    temporary directory (Ray's socket paths must stay short), and marks the processes
    it starts with that directory in their environment. :meth:`stop` terminates exactly
    the processes that carry the mark or name the directory on their command line, and
    their descendants (Ray renames its workers, which can hide their environment) --
    never ``ray stop``, which stops every Ray process on the machine::

        with LocalRayCluster(num_cpus=2) as cluster:
            runtime = RayRuntime(address=cluster.address)

    A driver in this process connects with ``RayRuntime(address=cluster.address)``;
    child processes that should connect get :meth:`env` in their environment.
    """

    MARKER = "SERVECORE_RAY_CLUSTER"

    def __init__(
        self,
        *,
        num_cpus: int = 2,
        object_store_memory: int = 200 * 1024 * 1024,
        resources: Mapping[str, float] | None = None,
        ray_executable: str | os.PathLike[str] | None = None,
        system_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.resources = dict(resources or {})
        self.ray_executable = Path(ray_executable or Path(sys.executable).parent / "ray")
        #: Ray's internal settings for the whole cluster (``ray start --system-config``),
        #: e.g. ``{"health_check_failure_threshold": 100}`` to make Ray slow to declare
        #: a lost node dead.
        self.system_config = dict(system_config or {})
        #: The worker nodes added so far (:meth:`add_node`).
        self.nodes: list[LocalRayNode] = []
        #: The GCS address, ``"127.0.0.1:PORT"`` (once started).
        self.address: str | None = None
        #: The cluster's temporary directory (once started).
        self.temp_dir: str | None = None

    def env(self) -> dict[str, str]:
        """Environment variables for a child process that drives this cluster."""
        if self.address is None:
            raise RuntimeError("the cluster is not started")
        return {"RAY_ADDRESS": self.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def connect(self, **init_options: Any) -> None:
        """Connect this process to the cluster as a Ray driver (``ray.init``).

        :class:`RayRuntime` instances in this process then share that connection (and
        leave it open when they close); end it with ``ray.shutdown()``.
        """
        if self.address is None:
            raise RuntimeError("the cluster is not started")
        keep_loopback()
        init_options.setdefault("logging_level", logging.WARNING)
        ray.init(address=self.address, **init_options)

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the head node; return its address."""
        if self.address is not None:
            return self.address
        # Ray puts Unix socket paths under the temp dir; keep it short.
        self.temp_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp" if os.name == "posix" else None)
        port = _free_port()
        env = self._environment()
        command = [
            str(self.ray_executable),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=false",
            "--include-log-monitor=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-port={_free_port()}",
            *_ports(),
        ]
        if self.resources:
            command.append(f"--resources={json.dumps(self.resources)}")
        if self.system_config:
            command.append(f"--system-config={json.dumps(self.system_config)}")
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except BaseException:
            self.stop()
            raise
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"`ray start --head` failed (exit {done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        self.address = f"127.0.0.1:{port}"
        return self.address

    def _environment(self) -> dict[str, str]:
        """The environment of the processes ``ray start`` starts for this cluster."""
        assert self.temp_dir is not None
        env = dict(
            os.environ,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1, do not go outward
            RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_METRIC_PORT=str(_free_port()),
            DASHBOARD_METRIC_PORT=str(_free_port()),
        )
        env[self.MARKER] = self.temp_dir
        env.pop("RAY_ADDRESS", None)
        env.pop(LocalRayNode.MARKER, None)
        return env

    def add_node(
        self,
        *,
        num_cpus: int = 1,
        object_store_memory: int = 100 * 1024 * 1024,
        resources: Mapping[str, float] | None = None,
        labels: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
    ) -> LocalRayNode:
        """Start a worker node (a raylet of its own, on loopback, with free ports) and
        join it to this cluster's head; return it once the GCS lists it.

        Several raylets on one machine is how Ray's own multi-node tests run
        (``ray.cluster_utils``). The node's files live in a directory of its own inside
        the cluster's, and its processes carry both marks, so :meth:`stop` ends them
        too, and :meth:`LocalRayNode.stop` ends exactly them.
        """
        if self.address is None or self.temp_dir is None:
            raise RuntimeError("the cluster is not started: start() it before add_node()")
        node_dir = tempfile.mkdtemp(prefix="n", dir=self.temp_dir)
        id_file = os.path.join(node_dir, "node_id")
        env = self._environment()
        env[LocalRayNode.MARKER] = node_dir
        env["SERVECORE_RAY_NODE_ID_FILE"] = id_file
        python = self.ray_executable.parent / "python"
        command = [
            str(python if python.exists() else sys.executable),
            str(_RAY_START),
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={node_dir}",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_memory}",
            "--include-log-monitor=false",
            "--disable-usage-stats",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            *_ports(),
        ]
        if resources:
            command.append(f"--resources={json.dumps(dict(resources))}")
        if labels:
            command.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        node = LocalRayNode("", node_dir)
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"`ray start --address={self.address}` failed (exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                )
            node.node_id = Path(id_file).read_text(encoding="utf-8").strip()
        except BaseException:
            node.stop()
            raise
        self.nodes.append(node)
        return node

    def pids(self) -> list[int]:
        """The processes of this cluster (its nodes' too): marked ones, and their
        descendants."""
        if self.temp_dir is None:
            return []
        return _marked(self.MARKER, self.temp_dir)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Terminate exactly this cluster's processes (its worker nodes' too), SIGKILL
        those left after ``timeout_s``, and remove its directory."""
        _terminate(self.pids(), timeout_s)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.address = None
        self.nodes.clear()

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
