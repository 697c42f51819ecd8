"""A replica process seen from the host: pinned by a pidfd, adopted by pid and start
time, watched until it exits.

A pid alone names a replica only until it exits: the kernel may hand the same pid to
another process. So a process is adopted only if its start time matches the one its
replica recorded (and its command line names the replica's key), and signals go
through a ``pidfd`` where the system has them, which keeps naming the very process it
was opened on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import psutil
import trio

__all__ = ["Process", "reap_finished"]

log = logging.getLogger("servecore.runtimes.subprocess")

#: Two start times closer than this are the same process (btime can drift a little).
_CREATE_TIME_TOLERANCE_S = 1.0

#: Children this process spawned whose runtime closed while they ran; reaped later so
#: they do not linger as zombies of a long-lived host.
_unreaped: list[subprocess.Popen[bytes]] = []


def reap_finished() -> None:
    """Reap the children left to :data:`_unreaped` that have exited since."""
    _unreaped[:] = [p for p in _unreaped if p.poll() is None]


class Process:
    """A replica process, pinned by a pidfd so that a reused pid is never signalled."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.pidfd: int | None = None
        self.exited = trio.Event()
        self._watching = False
        self._watch_scope = trio.CancelScope()
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(pid)

    @classmethod
    def adopt(cls, pid: int, create_time: float, key: str) -> Process | None:
        """The process ``pid`` if it is still the replica ``key`` started at
        ``create_time``; ``None`` if it is gone or the pid now belongs to another."""
        proc = cls(pid)
        try:
            ps = psutil.Process(pid)
            same = (
                abs(ps.create_time() - create_time) < _CREATE_TIME_TOLERANCE_S
                and ps.status() != psutil.STATUS_ZOMBIE
                and key in " ".join(ps.cmdline())
            )
        except (psutil.Error, OSError):
            same = False
        if not same:
            proc.close()
            return None
        return proc

    def alive(self) -> bool:
        """Whether the process still runs (a zombie does not)."""
        if self.exited.is_set():
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return bool(psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def signal(self, signum: int) -> None:
        """Send ``signum``; a process that already exited is left alone."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            elif self.alive():
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def exit_reason(self) -> str:
        """How the process ended, as far as this host knows."""
        if self.popen is not None:
            code = self.popen.poll()
            if code is not None and code < 0:
                return f"process {self.pid} was killed by {signal.Signals(-code).name}"
            if code is not None:
                return f"process {self.pid} exited with code {code}"
        return f"process {self.pid} exited"

    async def wait(self) -> None:
        """Return once the process has exited (a zombie counts as exited)."""
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watch, name=f"pid {self.pid} watcher")
        await self.exited.wait()

    async def _watch(self) -> None:
        # A system task: nothing but Cancelled may escape it.
        with self._watch_scope:
            try:
                if self.pidfd is None:
                    raise OSError("no pidfd on this system")
                await trio.lowlevel.wait_readable(self.pidfd)
            except (OSError, trio.ClosedResourceError, trio.BusyResourceError):
                while self.alive():
                    await trio.sleep(0.1)
            except Exception:
                log.exception("watching process %s failed", self.pid)
                return
            if self.popen is not None:
                self.popen.poll()  # reap it
            self.exited.set()

    def close(self) -> None:
        """Stop watching; the process itself is left alone."""
        self._watch_scope.cancel()
        if self.pidfd is not None:
            fd, self.pidfd = self.pidfd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if self.popen is not None and self.popen.poll() is None:
            _unreaped.append(self.popen)
