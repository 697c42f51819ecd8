"""A private single-node Ray cluster on loopback, for tests, benchmarks and demos."""

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from servecore.runtimes.ray.connection import keep_loopback

__all__ = ["LocalRayCluster"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRayCluster:
    """A single-node Ray head on loopback, private to its owner, stopped exactly.

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
    ) -> None:
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.resources = dict(resources or {})
        self.ray_executable = Path(ray_executable or Path(sys.executable).parent / "ray")
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
        env = dict(
            os.environ,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1, do not go outward
            RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_METRIC_PORT=str(_free_port()),
            DASHBOARD_METRIC_PORT=str(_free_port()),
        )
        env[self.MARKER] = self.temp_dir
        env.pop("RAY_ADDRESS", None)
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
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]
        if self.resources:
            command.append(f"--resources={json.dumps(self.resources)}")
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

    def pids(self) -> list[int]:
        """The processes of this cluster: marked ones, and their descendants."""
        import psutil

        if self.temp_dir is None:
            return []
        me = os.getpid()
        found: dict[int, Any] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == me:
                continue
            try:
                hit = self.temp_dir in " ".join(proc.info["cmdline"] or ())
                hit = hit or proc.environ().get(self.MARKER) == self.temp_dir
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

    def stop(self, timeout_s: float = 2.0) -> None:
        """Terminate exactly this cluster's processes, SIGKILL those left after
        ``timeout_s`` (a throwaway cluster has nothing to save: Ray's daemons can take
        10 s and more to go on SIGTERM), and remove its directory."""
        import psutil

        procs = []
        for pid in self.pids():
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
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.address = None

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
