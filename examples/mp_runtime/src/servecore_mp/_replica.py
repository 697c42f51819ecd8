"""The replica's side: the main function of each spawned process.

It imports only :mod:`servecore.runtimes.toolkit` (no trio, no controller), builds the
replica exactly as the built-in runtimes do, says ``ready`` (or why not), then serves
calls in arrival order until told to stop, checking health between calls.

Messages, host to replica: ``("call", id, queries)``, ``("stop",)``. Replica to host:
``("ready",)``, ``("failed", error, text)``, ``("ok", id, results)``,
``("error", id, error, text)``, ``("died", reason)``. ``error`` is the exception
itself when it pickles, else ``None`` (``text`` always describes it).
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

from servecore._core.transitions import StartReplica
from servecore.runtimes.toolkit import build_replica


def _portable(exc: BaseException) -> tuple[BaseException | None, str]:
    text = f"{type(exc).__name__}: {exc}"
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None, text
    return exc, text


def main(conn: Connection, effect: StartReplica, health_check_period_s: float) -> None:
    """Build the replica, then serve ``conn`` until ``("stop",)`` or EOF."""
    niceness = effect.config.runtime_options.get("niceness")
    try:
        if niceness:
            os.nice(int(niceness))
        code = build_replica(effect)
    except Exception as exc:
        conn.send(("failed", *_portable(exc)))
        return
    conn.send(("ready",))
    next_check = time.monotonic() + health_check_period_s
    while True:
        if code.check_health is not None:
            wait = max(0.0, next_check - time.monotonic())
            if not conn.poll(wait) or time.monotonic() >= next_check:
                try:
                    code.check_health()
                except Exception as exc:
                    conn.send(("died", f"health check failed: {type(exc).__name__}: {exc}"))
                    return
                next_check = time.monotonic() + health_check_period_s
                if not conn.poll():
                    continue
        try:
            message: Any = conn.recv()
        except EOFError:  # the host is gone
            return
        if message[0] == "stop":
            return
        _, request, queries = message
        try:
            conn.send(("ok", request, code.run(queries)))
        except Exception as exc:
            conn.send(("error", request, *_portable(exc)))
