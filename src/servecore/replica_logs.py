"""Forward what replicas print to the host's :mod:`logging`.

Runtimes that run replicas out of process keep each replica's output in a log file
(the subprocess runtime: ``<runtime directory>/<replica key>.log``; its path is in
``servecore status`` and in the "ready" lifecycle record). :func:`forward_replica_logs`
follows those files and logs every new line on the ``servecore.replica`` logger, with
``replica`` and ``backend`` in ``extra``, so that one log stream shows the host and its
replicas::

    async with servecore.open_controller("subprocess") as ctl, trio.open_nursery() as n:
        n.start_soon(servecore.replica_logs.forward_replica_logs, ctl)

``servecore run`` does this unless ``--no-replica-logs`` is given. Replicas of the
threads runtime print into the host's own output already; Ray forwards its actors'
output to the driver itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from servecore._controller.replica_lifecycle import replica_info
from servecore._core.values import backend_of

__all__ = ["forward_replica_logs"]

#: Bytes read from one replica's log per poll: a replica that prints faster is caught
#: up over the next polls rather than stalling the loop.
_CHUNK = 64 * 1024


class _Follower:
    """One log file, read from where the last read stopped."""

    def __init__(self, path: str, *, from_start: bool) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        if not from_start:
            try:
                self.offset = os.stat(path).st_size  # an adopted replica: only what is new
            except OSError:
                self.offset = 0

    def read_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(_CHUNK)
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


async def forward_replica_logs(
    controller: Any,
    *,
    logger: logging.Logger | None = None,
    period_s: float = 0.25,
    level: int = logging.INFO,
) -> None:
    """Log every line replicas of ``controller`` write to their log files, until
    cancelled. Output from before this call is skipped; a replica started later is
    followed from its first line."""
    log = logger or logging.getLogger("servecore.replica")
    followers: dict[str, _Follower] = {}
    known_at_start = set(controller.state.replicas)
    while True:
        replicas = controller.state.replicas
        for tag in replicas:
            if tag not in followers:
                path = replica_info(controller.runtime, tag).log_path
                if path is None:
                    continue
                followers[tag] = _Follower(path, from_start=tag not in known_at_start)
        for tag in list(followers):
            follower = followers[tag]
            for line in follower.read_lines():
                if line:
                    backend = backend_of(tag)
                    log.log(level, "[%s] %s", tag, line, extra={"replica": tag, "backend": backend})
            if tag not in replicas:
                del followers[tag]  # gone: its last lines were just read
        await trio.sleep(period_s)
