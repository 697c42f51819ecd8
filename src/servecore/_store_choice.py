"""Which store a command means by ``--store``, and where its state directory is.

``--store PATH`` is a SQLite checkpoint; its directory is the state directory (the
control socket, ``replicas/``, the run record). ``--store postgresql://...`` (or
``postgres://``) is a :class:`~servecore.PostgresStore`: the DSN as libpq takes it, plus
two query parameters of servecore's own, taken out before it reaches libpq:
``checkpoint`` (the checkpoint's name in the database, default ``servecore``) and
``lease_s`` (how long the lease lasts unrenewed, default 10). The state directory of a
PostgreSQL store is ``--state-dir`` or, by default, ``.servecore/postgres-CHECKPOINT``
under the current directory: each host running a server has its own, since the
control socket is local to the host; a standby on the leader's host shares the
leader's (so it finds the same replicas, control socket path and ingress workers).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

import attrs

from servecore._core.errors import InvalidConfig
from servecore.stores import SQLiteStore

__all__ = [
    "DEFAULT_STORE",
    "PG_ANCHOR",
    "STORE_ENV",
    "StoreChoice",
    "choose_store",
    "is_dsn",
    "store_environment",
    "store_from_environment",
]

DEFAULT_STORE = Path(".servecore") / "state.db"
#: The name, in a PostgreSQL store's state directory, that stands for the store where a
#: path is expected (ingress workers, ``servecore.connect``): only its directory counts.
PG_ANCHOR = "postgres"
_SCHEMES = ("postgresql://", "postgres://")
_OWN_PARAMS = ("checkpoint", "lease_s")


def is_dsn(store: str) -> bool:
    """Whether ``--store`` names a PostgreSQL database rather than a SQLite file."""
    return store.startswith(_SCHEMES)


@attrs.frozen(kw_only=True)
class StoreChoice:
    """A ``--store`` resolved: what to open, and the state directory beside it."""

    #: The SQLite file, or None for PostgreSQL.
    path: Path | None = None
    #: The DSN for libpq (servecore's own parameters taken out), or None for SQLite.
    dsn: str | None = None
    checkpoint: str = "servecore"
    lease_s: float | None = None
    state_dir: Path

    @property
    def is_postgres(self) -> bool:
        return self.dsn is not None

    @property
    def anchor(self) -> Path:
        """A path whose directory is the state directory: the SQLite file, or
        :data:`PG_ANCHOR` in the state directory (what workers and clients are given)."""
        return self.path if self.path is not None else self.state_dir / PG_ANCHOR

    @property
    def label(self) -> str:
        """The store for messages (never a password)."""
        if self.path is not None:
            return str(self.path)
        return f"{_without_password(self.dsn or '')} (checkpoint {self.checkpoint!r})"

    def open(self, **options: Any) -> Any:
        """A new store object (not opened yet)."""
        if self.path is not None:
            return SQLiteStore(self.path)
        from servecore.stores.postgres import PostgresStore

        if self.lease_s is not None:
            options.setdefault("lease_s", self.lease_s)
        assert self.dsn is not None
        return PostgresStore(self.dsn, checkpoint=self.checkpoint, **options)


def _without_password(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def choose_store(store: str | Path | None, state_dir: Path | None = None) -> StoreChoice:
    """``--store`` (``None``: :data:`DEFAULT_STORE`) and ``--state-dir`` resolved.

    ``--state-dir`` is for a PostgreSQL store only: a SQLite store's state directory
    is its own directory, and naming another is refused rather than ignored.
    """
    text = str(DEFAULT_STORE if store is None else store)
    if not is_dsn(text):
        path = Path(text)
        if state_dir is not None and Path(state_dir).absolute() != path.absolute().parent:
            raise InvalidConfig(
                "--state-dir",
                str(state_dir),
                f"is for a PostgreSQL --store only: the state directory of the SQLite "
                f"store {path} is its own directory, {path.parent}; leave --state-dir out",
            )
        return StoreChoice(path=path, state_dir=path.parent)
    parts = urllib.parse.urlsplit(text)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in _OWN_PARAMS}
    rest = [(k, v) for k, v in query if k not in _OWN_PARAMS]
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    checkpoint = own.get("checkpoint", "servecore")
    if not checkpoint:
        raise InvalidConfig("--store checkpoint", checkpoint, "must be a non-empty name")
    lease_s: float | None = None
    if "lease_s" in own:
        try:
            lease_s = float(own["lease_s"])
        except ValueError:
            lease_s = float("nan")
        if not 0 < lease_s < float("inf"):
            raise InvalidConfig(
                "--store lease_s", own["lease_s"], "must be a positive number of seconds"
            )
    if state_dir is None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", checkpoint).lstrip(".") or "_"
        state_dir = Path(".servecore") / f"postgres-{safe}"
    return StoreChoice(dsn=dsn, checkpoint=checkpoint, lease_s=lease_s, state_dir=state_dir)


#: The environment variable a worker process finds a PostgreSQL store in (a DSN may
#: hold a password: the environment is private to its user, the command line is not).
STORE_ENV = "SERVECORE_WORKER_STORE"


def store_environment(choice: StoreChoice) -> dict[str, str]:
    """What to add to a worker's environment for it to open ``choice`` (nothing for
    SQLite: its path is given on the command line)."""
    if choice.dsn is None:
        return {}
    found = {"dsn": choice.dsn, "checkpoint": choice.checkpoint}
    return {STORE_ENV: json.dumps({**found, "state_dir": str(choice.state_dir.absolute())})}


def store_from_environment() -> StoreChoice | None:
    """The PostgreSQL store :func:`store_environment` put in this process's
    environment, if any."""
    text = os.environ.get(STORE_ENV)
    if not text:
        return None
    data = json.loads(text)
    return StoreChoice(
        dsn=str(data["dsn"]), checkpoint=str(data["checkpoint"]), state_dir=Path(data["state_dir"])
    )
