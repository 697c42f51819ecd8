"""Targets for the Ray runtime tests, and a controller process to crash.

Ray replicas run in Ray worker processes, which import their target by path; these
targets are importable there as ``ray_driver:NAME``: the test session puts ``tests/``
on its workers' ``PYTHONPATH``, and Ray puts a driver script's own directory on the
path of that driver's workers.

Run as a script, this is a *driver*: a controller on the Ray runtime with an SQLite
store, which creates a backend and then scales it up, printing what it is doing, so
that a test can SIGKILL it in the middle::

    python tests/support/ray_driver.py --address 127.0.0.1:6379 --namespace ns --db state.db
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import types
from typing import Any

from servecore.runtimes.toolkit import batch


class Echo:
    """Returns ``prefix + value``; ``"__identity__"`` tells replicas apart."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.identity = f"{os.getpid()}-{id(self)}"

    def __call__(self, value: Any = None) -> Any:
        if value == "__identity__":
            return self.identity
        return f"{self.prefix}{value}"


class Slow:
    """Sleeps ``seconds`` (the query's argument), then returns it."""

    def __call__(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class SlowInit:
    """A constructor that takes ``delay`` seconds (a replica that is slow to start)."""

    def __init__(self, delay: float = 1.0) -> None:
        time.sleep(delay)
        self.pid = os.getpid()

    def __call__(self, value: Any = None) -> Any:
        return value


class Pid:
    """Returns the replica's process id."""

    def __call__(self, _value: Any = None) -> int:
        return os.getpid()


class BatchSizes:
    """A batch target: each query gets ``(value, size of the batch it came in)``."""

    @batch
    def __call__(self, values: list[Any]) -> list[Any]:
        return [[value, len(values)] for value in values]


class Configurable:
    """Returns its ``user_config`` (set through ``reconfigure``)."""

    def __init__(self) -> None:
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, _value: Any = None) -> Any:
        return self.config


class Unhealthy:
    """Healthy until it is asked ``"poison"``; from then on ``check_health()`` raises."""

    def __init__(self) -> None:
        self.poisoned = False

    def check_health(self) -> None:
        if self.poisoned:
            raise RuntimeError("poisoned on purpose")

    def __call__(self, value: Any = None) -> Any:
        if value == "poison":
            self.poisoned = True
        return value


class Boom(Exception):
    """A user exception type, to check that it comes back as itself."""


class Raises:
    """Raises :class:`Boom` with the query's value."""

    def __call__(self, value: Any = None) -> Any:
        raise Boom(value)


#: A file name that is not UTF-8, as Python decodes it (``surrogateescape``).
NOT_UTF8_PATH = b"/data/caf\xe9.bin".decode("utf-8", "surrogateescape")


class NotUTF8Error(Exception):
    """A user exception whose ``str()`` is computed, and holds a lone surrogate."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def __str__(self) -> str:
        return f"cannot read {self.path}"


class FailsWithNotUTF8:
    """A constructor failing with a message that holds a lone surrogate."""

    def __init__(self, custom: bool = False) -> None:
        if custom:
            raise NotUTF8Error(NOT_UTF8_PATH)
        raise FileNotFoundError(f"no model at {NOT_UTF8_PATH}")


class _ExitsWhenRebuilt:
    """Pickles fine; unpickling it calls ``sys.exit(3)`` (in the host, which rebuilds it)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (3,))


def refuse_to_rebuild() -> None:
    """Called by unpickling :class:`_FailsWhenRebuilt`: its rebuilding fails."""
    raise ValueError("this object refuses to be rebuilt")


class _FailsWhenRebuilt:
    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse_to_rebuild, ())


class HostileResults:
    """Answers with a result the host cannot rebuild, or that cannot be pickled at all:
    ``"exit"`` raises SystemExit as it is rebuilt, ``"fails"`` a ValueError,
    ``"replica_only"`` is an instance of a class whose module only the replica has,
    ``"lock"`` a lock (pickle refuses it); anything else comes back as it is."""

    def __call__(self, kind: Any = None) -> Any:
        if kind == "exit":
            return _ExitsWhenRebuilt()
        if kind == "fails":
            return _FailsWhenRebuilt()
        if kind == "lock":
            return threading.Lock()
        if kind != "replica_only":
            return kind
        module = sys.modules.setdefault(
            "replica_only_module", types.ModuleType("replica_only_module")
        )

        class Secret:
            pass

        Secret.__module__ = module.__name__
        Secret.__qualname__ = "Secret"
        module.Secret = Secret  # type: ignore[attr-defined]
        return Secret()


class ReplicaOfProtocol:
    """A stand-in for the replica actor of another servecore version: ``ready()``
    reports ``protocol`` (none for ``None``, as actors before versions did), and
    ``run()`` returns the results list itself, as those actors did."""

    def __init__(self, protocol: int | None) -> None:
        self.protocol = protocol

    def ready(self) -> dict[str, Any]:
        info: dict[str, Any] = {"pid": os.getpid(), "health_check": False}
        if self.protocol is not None:
            info["protocol"] = self.protocol
        return info

    def run(self, batch: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        return [f"old:{args[0]}" for args, _kwargs in batch]

    def watch(self, period_s: float) -> bool:
        time.sleep(period_s)
        return True


class ReplicaOfProtocol4:
    """A stand-in for a replica actor of the servecore before deadlines (protocol 4):
    its ``run()`` takes no deadlines, and says whether it got any extra argument."""

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "health_check": False, "protocol": 4}

    def run(
        self, batch: list[tuple[tuple[Any, ...], dict[str, Any]]], request_id: str | None = None
    ) -> bytes:
        from servecore.runtimes.subprocess.wire import encode_results

        return encode_results("four#3", [f"four:{args[0]}" for args, _kwargs in batch], "ray")

    def watch(self, period_s: float) -> bool:
        time.sleep(period_s)
        return True


# ---------------------------------------------------------------------------------------
# The driver


async def _drive(address: str, namespace: str, db: str, scale_to: int, delay: float) -> None:
    import trio

    import servecore
    from servecore.runtimes.ray import RayRuntime

    runtime = RayRuntime(address=address)
    async with servecore.open_controller(
        runtime=runtime, store=servecore.SQLiteStore(db), name=namespace
    ) as ctl:
        await ctl.create_backend(
            "slow",
            "ray_driver:SlowInit",
            init_kwargs={"delay": delay},
            num_replicas=1,
            runtime_options={"num_cpus": 0},
        )
        await ctl.create_endpoint("slow")
        await ctl.set_traffic("slow", {"slow": 1.0})
        print("READY", flush=True)
        print("SCALING", flush=True)
        await ctl.update_backend_config("slow", num_replicas=scale_to)
        print("SCALED", flush=True)
        await trio.sleep_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--scale-to", type=int, default=4)
    parser.add_argument("--delay", type=float, default=2.0)
    args = parser.parse_args(argv)

    import trio

    trio.run(_drive, args.address, args.namespace, args.db, args.scale_to, args.delay)


if __name__ == "__main__":
    sys.exit(main())
