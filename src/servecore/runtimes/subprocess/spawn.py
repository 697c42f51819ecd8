"""Starting one replica process: its options, its spec, the spawn, and the wait until
it is ready (or has failed, timed out, or been stopped while starting)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from servecore._core.errors import InvalidConfig, ReplicaDiedError
from servecore._core.transitions import StartReplica
from servecore.runtimes._remote_errors import decode_reply
from servecore.runtimes.subprocess.channel import read_frame
from servecore.runtimes.subprocess.files import ReplicaFiles
from servecore.runtimes.subprocess.process import Process
from servecore.runtimes.subprocess.replica import rebuild_remote_exception
from servecore.runtimes.subprocess.wire import ERROR, OK

__all__ = ["RUNTIME_OPTIONS", "Starting", "check_options", "launch", "replica_spec"]

#: The ``BackendConfig.runtime_options`` keys this runtime understands.
RUNTIME_OPTIONS = frozenset({"env", "startup_timeout_s"})

REPLICA_MAIN = str(Path(__file__).with_name("replica_main.py"))
#: How long SIGKILL may take to end a process (it cannot be caught; a safety net).
KILL_WAIT_S = 10.0


class Starting:
    """A start in flight, which :meth:`SubprocessRuntime.stop_replica` may cut short.

    The stop sets ``stop_requested`` and signals ``process`` once there is one; the
    start then fails with :class:`~servecore.ReplicaDiedError` instead of serving.
    ``done`` is set when the start has returned or raised, its process gone or owned
    by a watcher.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.process: Process | None = None
        self.stop_requested = False
        self.done = trio.Event()

    def stopped_error(self, why: str) -> ReplicaDiedError:
        """The error the start raises once a stop has cut it short."""
        return ReplicaDiedError(self.tag, f"stop_replica stopped it before it was ready ({why})")


def check_options(effect: StartReplica) -> tuple[dict[str, str], float | None]:
    """The ``env`` and ``startup_timeout_s`` of the backend's ``runtime_options``;
    :class:`~servecore.InvalidConfig` for any other key or a bad value."""
    options = effect.config.runtime_options
    unknown = sorted(set(options) - RUNTIME_OPTIONS)
    if unknown:
        raise InvalidConfig(
            "runtime_options",
            options,
            f"the subprocess runtime does not know key(s) {unknown}; "
            f"it understands {sorted(RUNTIME_OPTIONS)}",
            backend=effect.backend,
        )
    env = options.get("env", {})
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidConfig(
            "runtime_options['env']", env, "must map names to strings", backend=effect.backend
        )
    timeout = options.get("startup_timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidConfig(
            "runtime_options['startup_timeout_s']",
            timeout,
            "must be a finite number of seconds > 0",
            backend=effect.backend,
        )
    return dict(env), (float(timeout) if timeout is not None else None)


def replica_spec(
    effect: StartReplica,
    startup_timeout_s: float,
    health_check_period_s: float,
    control_socket: str | None = None,
) -> dict[str, Any]:
    """What the replica process reads to know what to run."""
    return {
        "tag": effect.tag,
        "backend": effect.backend,
        "target": effect.target,
        "init_args": list(effect.init_args),
        "init_kwargs": dict(effect.init_kwargs),
        "concurrency": effect.config.max_concurrent_queries,
        "max_batch_size": effect.config.max_batch_size,
        "user_config": effect.config.user_config,
        "startup_timeout_s": startup_timeout_s,
        "health_check_period_s": health_check_period_s,
        # The host's liveness probe (BackendConfig), read again when it adopts the replica.
        "probe_period_s": effect.config.health_check_period_s,
        "probe_timeout_s": effect.config.health_check_timeout_s,
        "sys_path": [os.path.abspath(p or ".") for p in sys.path],
        # Where replica code's servecore.get_handle connects (None: nowhere).
        "control_socket": control_socket,
    }


async def launch(
    *,
    files: ReplicaFiles,
    lock_fd: int,
    python: str,
    env: Mapping[str, str],
    timeout: float,
    starting: Starting,
) -> Process:
    """Spawn the replica of ``files`` (its spec written) holding ``lock_fd``, and
    return once it is constructed and listens.

    Raises the replica's own exception if it failed to start, ``TimeoutError`` after
    ``timeout``, ``RuntimeError`` if it exited first, and ``ReplicaDiedError`` if a stop
    cut it short; then it may still run: the caller kills it.
    """
    status_read, status_write = os.pipe()
    command = [
        python, "-P", REPLICA_MAIN, "--dir", files.directory, "--key", files.key,
        "--lock-fd", str(lock_fd), "--status-fd", str(status_write),
    ]  # fmt: skip
    try:
        log_fd = files.create_log()
        try:
            popen = await trio.to_thread.run_sync(
                lambda: subprocess.Popen(
                    command,
                    pass_fds=(lock_fd, status_write),
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                )
            )
        finally:
            os.close(log_fd)
    except BaseException:
        os.close(status_read)
        raise
    finally:
        # The child holds the lock now (same open file); the host lets go of its copy.
        os.close(lock_fd)
        os.close(status_write)
    process = starting.process = Process(popen.pid, popen)
    status = trio.lowlevel.FdStream(status_read)
    try:
        if starting.stop_requested:
            raise starting.stopped_error("the stop came as it was spawned")
        with trio.move_on_after(timeout) as waited:
            answer = await read_frame(status)
    finally:
        with trio.CancelScope(shield=True):
            await status.aclose()
    if starting.stop_requested:
        raise starting.stopped_error(process.exit_reason())
    if waited.cancelled_caught:
        raise TimeoutError(
            f"replica {starting.tag!r} was not ready after {timeout}s (startup_timeout_s); "
            f"it was killed. Last lines of its log:\n{files.log_tail()}"
        )
    if answer is not None and answer[0] == ERROR:
        info = decode_reply(answer[2], starting.tag, "subprocess")
        exc = rebuild_remote_exception(info, starting.tag)
        printed = files.log_tail(before_failure=True)
        if printed:
            exc.add_note(f"last lines the replica printed before it failed:\n{printed}")
        raise exc
    if answer is None or answer[0] != OK:
        with trio.move_on_after(KILL_WAIT_S):
            await process.wait()
        raise RuntimeError(
            f"replica {starting.tag!r}: {process.exit_reason()} before it was ready. "
            f"Last lines of its log:\n{files.log_tail()}"
        )
    return process
