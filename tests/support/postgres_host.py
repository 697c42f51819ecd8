"""A host process for the PostgreSQL failover tests: a controller driven over stdin.

Usage::

    python tests/support/postgres_host.py DSN CHECKPOINT RUNTIME_DIR LEASE_S ROLE

It opens a controller on ``PostgresStore(DSN, checkpoint=CHECKPOINT, lease_s=LEASE_S)``
with ``SubprocessRuntime(RUNTIME_DIR)`` (or the threads runtime if RUNTIME_DIR is
``-``); as ROLE ``standby`` with ``standby=True``, so it waits for the lease. It prints
``TOOK <monotonic time>`` once it holds the lease and ``SERVING <state json>`` once it
recovered, then reads commands, one a line, and answers each:

* ``endpoint NAME`` / ``backend TAG N`` / ``route ENDPOINT BACKEND`` / ``call ENDPOINT
  VALUE`` -- one command or query; ``ACK ...``, ``RESULT <json>`` or ``ERR <type> <text>``;
* ``stream PREFIX`` -- create endpoints PREFIX0, PREFIX1, ... until killed, printing
  ``SENT <name>`` before each command and ``ACK <name>`` once it returned;
* ``state`` -- ``STATE <json>``: endpoints, backends, replicas and the runtime's live ones;
* ``rt-stop TAG`` / ``rt-kill TAG`` / ``rt-adopt`` -- order the runtime itself to stop
  or kill a replica, or to list (and so adopt) the live ones: what a controller that
  lost its place might still try; ``ACK`` or ``ERR``;
* ``stepped`` -- ``STEPPED <error type>`` once the controller stepped down, else
  ``STEPPED None``;
* ``exit`` -- close the controller, print ``BYE``.

``time.monotonic`` is the system's monotonic clock, the same in every process, so the
test can compare ``TOOK`` with the moment it killed the leader.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import trio

import servecore
from servecore import PostgresStore
from servecore.runtimes.subprocess import SubprocessRuntime

TARGET = "subprocess_targets:Echo"


def say(*parts: Any) -> None:
    print(*parts, flush=True)


async def describe(ctl: servecore.Controller) -> str:
    state = ctl.state
    return json.dumps(
        {
            "epoch": getattr(ctl.store, "epoch", None),
            "endpoints": sorted(state.endpoints),
            "backends": sorted(state.backends),
            "replicas": {t: r.status.name for t, r in state.replicas.items()},
            "live": sorted(await ctl.runtime.list_replicas()),
        }
    )


async def serve(ctl: servecore.Controller) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line or line.strip() == "exit":
            return
        word, *args = line.split()
        try:
            if word == "endpoint":
                await ctl.create_endpoint(args[0])
            elif word == "backend":
                await ctl.create_backend(
                    args[0], TARGET, num_replicas=int(args[1]), graceful_shutdown_timeout_s=1.0
                )
            elif word == "route":
                await ctl.set_traffic(args[0], {args[1]: 1.0})
            elif word == "call":
                say("RESULT", json.dumps(await ctl.get_handle(args[0]).call(args[1])))
                continue
            elif word == "rt-stop":
                await ctl.runtime.stop_replica(args[0], 1.0)
            elif word == "rt-kill":
                ctl.runtime.kill(args[0])  # type: ignore[attr-defined]
            elif word == "rt-adopt":
                await ctl.runtime.list_replicas()
            elif word == "stepped":
                say("STEPPED", type(ctl.stepped_down).__name__ if ctl.stepped_down else None)
                continue
            elif word == "state":
                say("STATE", await describe(ctl))
                continue
            elif word == "stream":
                for i in range(10**9):
                    name = f"{args[0]}{i}"
                    say("SENT", name)
                    await ctl.create_endpoint(name)
                    say("ACK", name)
            else:
                say("ERR", "UnknownCommand", word)
                continue
        except servecore.ServecoreError as exc:
            say("ERR", type(exc).__name__, " ".join(str(exc).split()))
            continue
        say("ACK", *args)


async def main() -> None:
    dsn, checkpoint, runtime_dir, lease_s, role = sys.argv[1:6]
    store = PostgresStore(dsn, checkpoint=checkpoint, lease_s=float(lease_s), holder=role)
    runtime: Any = "threads" if runtime_dir == "-" else SubprocessRuntime(runtime_dir)
    opener = store.open

    def open_and_tell(**kwargs: Any) -> None:
        opener(**kwargs)
        say("TOOK", repr(time.monotonic()))

    store.open = open_and_tell  # type: ignore[method-assign]
    say("WAITING" if role == "standby" else "OPENING")
    async with servecore.open_controller(
        runtime=runtime, store=store, name="failover", standby=role == "standby"
    ) as ctl:
        say("SERVING", await describe(ctl))
        await serve(ctl)
    say("BYE")


if __name__ == "__main__":
    trio.run(main)
