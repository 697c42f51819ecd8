"""The subprocess runtime: each replica is a child Python process (docs/design.md §6).

Replicas outlive their host. Each one runs in its own session (``start_new_session``),
so a SIGKILL of the host, or a Ctrl-C in its terminal, leaves it running; the next
controller on the same store finds it again in the *runtime directory* and adopts it::

    async with servecore.open_controller(
        runtime="subprocess",
        runtime_kwargs={"directory": "/var/run/myapp/replicas"},
        store=servecore.SQLiteStore("state.db"),
    ) as ctl:
        await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2)

The runtime directory (``directory.py``)
    One directory per controller namespace. By default it is beside a file store
    (``SQLiteStore("state.db")``: ``state.db.replicas/NAMESPACE``), so two projects
    never share one; for other stores (memory, PostgreSQL)
    ``$XDG_RUNTIME_DIR/servecore/NAMESPACE``, or ``TMPDIR/servecore-UID/NAMESPACE``
    without ``XDG_RUNTIME_DIR``; pass ``directory=`` to choose it (it is then used as is).
    It is created with mode 0700, and refused (:class:`~servecore.RuntimeDirectoryUnsafe`)
    if another user owns it or may write to it. It holds, per replica, a lock, a spec, a
    record, a Unix socket and a log (``files.py``), none ever written through a link.
    The runtime holds an ``flock`` on ``.owner.lock`` while it is open, so a second
    controller on the same directory fails at once with
    :class:`~servecore.RuntimeDirectoryLocked` instead of adopting (and stopping) the
    first one's replicas; ``.namespace`` records the namespace the directory belongs
    to, and ``.store`` the store (:class:`~servecore.RuntimeDirectoryStoreMismatch`).

Liveness (``process.py``)
    A replica is alive while it holds its lock file (the kernel drops an ``flock`` when
    the process dies, whatever happens to its pid). Its pid is checked against the
    recorded start time before any signal, and signals go through a ``pidfd``, so a
    reused pid is never signalled. Files of dead replicas are removed by
    :meth:`SubprocessRuntime.list_replicas` and on the way through ``start_replica``;
    their logs are kept in ``logs/`` (the last few per backend).

Start and stop (``spawn.py``, ``replica_main.py``)
    ``start_replica`` writes the replica's spec, spawns ``replica_main.py`` holding the
    tag's lock, and waits on a status pipe: the replica answers once its target is
    imported and constructed and its socket listens, or sends its own exception, which
    is raised here with its type (an import error, a constructor's ``ValueError``...). A
    replica not ready within ``startup_timeout_s`` is killed. ``stop_replica`` lets the
    calls in flight finish, sends SIGTERM (the replica takes no new call, finishes its
    own, and exits), and sends SIGKILL once ``timeout_s`` has passed since the stop
    began. A stop that comes while the start is still running (a constructor that
    hangs) signals the starting process at once, SIGKILLs it at the same deadline, and
    the start raises :class:`~servecore.ReplicaDiedError`: a stop never waits on a
    start longer than its own timeout.

User code
    A replica runs its target under the threads runtime's rules (``servecore.runtimes.toolkit``):
    ``@servecore.batch`` targets, ``max_batch_size``, ``reconfigure(user_config)``, and
    ``check_health()`` every ``health_check_period_s``. Up to
    ``max_concurrent_queries`` calls run at once, on that many threads.

Deaths
    A watcher per replica waits on the process (``pidfd``) and on its connection; a
    replica that dies other than by ``stop_replica`` is reported as
    :class:`~servecore.ReplicaDied` at once (with the reason the replica left in its
    record, if it ended itself, and the last lines of its log), and calls in flight on it raise
    :class:`~servecore.ReplicaDiedError`. :meth:`SubprocessRuntime.kill` SIGKILLs a
    replica as a crash would (for tests and operators).

Wire format (``wire.py``, ``channel.py``, ``replica.py``)
    Length-prefixed frames over one Unix socket per replica; query arguments, results
    and exceptions are pickled (only this user can reach the socket; the controller's
    state never travels this way, it is checkpointed as JSON). A user exception
    is raised on the caller's side with its own type when that type can be imported
    (else as :class:`RemoteError`), and the replica's traceback text is kept as its
    ``__cause__`` (:class:`RemoteTraceback`), as :mod:`concurrent.futures` does. All
    text a replica sends is made valid UTF-8 on the way (a lone surrogate becomes an
    escape), so it can never break the controller's checkpoint.

``runtime_options`` (per backend) this runtime understands: ``env`` (a mapping of extra
environment variables for the replica processes) and ``startup_timeout_s`` (how long a
replica may take to import and construct its target; default: the runtime's). Any other
key makes the start fail with :class:`~servecore.InvalidConfig`.

Replicas import their target with the host's ``sys.path`` and working directory, so a
target importable in the host is importable in its replicas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from servecore._core.errors import (
    RemoteError,
    RuntimeDirectoryLocked,
    RuntimeDirectoryStoreMismatch,
    RuntimeDirectoryUnsafe,
)

if TYPE_CHECKING:
    from servecore.runtimes.subprocess.files import replica_key
    from servecore.runtimes.subprocess.replica import RemoteTraceback
    from servecore.runtimes.subprocess.runtime import SubprocessRuntime
    from servecore.runtimes.subprocess.spawn import RUNTIME_OPTIONS

__all__ = [
    "RUNTIME_OPTIONS",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeDirectoryLocked",
    "RuntimeDirectoryStoreMismatch",
    "RuntimeDirectoryUnsafe",
    "SubprocessRuntime",
    "replica_key",
]

# Imported on first use (PEP 562): the replica process imports this package for its
# wire format and files, and must not pay for trio and psutil.
_LAZY = {
    "RUNTIME_OPTIONS": "servecore.runtimes.subprocess.spawn",
    "RemoteTraceback": "servecore.runtimes.subprocess.replica",
    "SubprocessRuntime": "servecore.runtimes.subprocess.runtime",
    "replica_key": "servecore.runtimes.subprocess.files",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
