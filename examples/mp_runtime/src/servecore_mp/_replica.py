"""The replica's side: the main function of each spawned process.

It imports only :mod:`servecore.runtimes.toolkit` (no trio, no controller), builds the
replica exactly as the built-in runtimes do, says ``ready`` (or why not), then serves
calls in arrival order until told to stop, checking health between calls.

Messages, host to replica: ``("call", id, queries)``, ``("stop",)``. Replica to host:
``("ready",)``, ``("failed", error, text)``, ``("ok", id, results)``,
``("error", id, error, text)``, ``("died", reason)``. ``results`` is the pickled list
of results and ``error`` the pickled exception (``None`` when it does not pickle;
``text`` always describes it): bytes inside a message of plain values, so that the
host reads every message whatever the user's values are, and unpickles those values
where a failure can be told apart (see ``_runtime.decode``).
"""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

from servecore import StartReplica, UnpicklableResult
from servecore.runtimes.toolkit import build_replica


def _portable(exc: BaseException) -> tuple[bytes | None, str]:
    text = f"{type(exc).__name__}: {exc}"
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:
        return None, text
    return data, text


def _results(tag: str, results: list[Any]) -> tuple[Any, ...]:
    """The answer for ``results``: pickled, or the typed error saying which did not."""
    try:
        return ("ok", pickle.dumps(results))
    except Exception as exc:
        culprit = next((r for r in results if not _pickles(r)), results)
        cls = type(culprit)
        error = UnpicklableResult(
            tag,
            f"{cls.__module__}.{cls.__qualname__}",
            f"{type(exc).__name__}: {exc}",
            runtime="mp",
        )
        return ("error", *_portable(error))


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


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
            results = code.run(queries)
        except Exception as exc:
            conn.send(("error", request, *_portable(exc)))
            continue
        kind, *rest = _results(effect.tag, results)
        conn.send((kind, request, *rest))
