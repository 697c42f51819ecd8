"""The runtime directory: one per controller, private to its user, bound to its store.

By default it is beside the controller's store when the store is a file
(``state.db`` -> ``state.db.replicas/NAME``), so two projects never share one; for other
stores ``$XDG_RUNTIME_DIR/servecore/NAME``, or ``TMPDIR/servecore-UID/NAME`` without
``XDG_RUNTIME_DIR``; ``directory=`` chooses it (used as is). Opening it
(:meth:`RuntimeDirectory.open`) checks, in this order:

* the controller name: no path separators, not ``.`` or ``..``, no NUL, printable,
  at most :data:`MAX_NAME_LENGTH` characters (:class:`~servecore.InvalidConfig`);
* the directory, and the default base above it, are created mode 0700, are real
  directories (a link is refused where servecore chose the path), are owned by this
  process's user and are not writable by group or others; a directory another local
  user created first, or made world-writable, is refused
  (:class:`~servecore.RuntimeDirectoryUnsafe`) before anything is read from it;
* ``.owner.lock``: an ``flock`` held while the runtime is open, so that a second
  runtime on the directory fails at once (:class:`~servecore.RuntimeDirectoryLocked`)
  instead of adopting, and stopping, the first one's replicas -- unless the second
  one leads a newer *epoch* of the same store (below);
* ``.fence``: the owner's store and lease epoch (stores with a lease,
  :class:`~servecore.PostgresStore`), read and written under the short lock
  ``.fence.lock``. Ownership follows the store's lease, not the liveness of a
  process that may only be frozen: a runtime opened with a newer epoch of the same
  store takes the directory over even while the old owner (SIGSTOPped, a frozen VM)
  still holds ``.owner.lock``, and the old owner, when it wakes, finds the newer
  epoch here and refuses to act (:class:`~servecore.RuntimeFenced`); an older epoch
  is refused at open. Without an epoch nothing is recorded, and an open directory
  whose fence names a live owner is refused as locked;
* ``.namespace``: the controller name the directory belongs to;
* ``.store``: the store the directory's replicas belong to. A controller on another
  store is refused (:class:`~servecore.RuntimeDirectoryStoreMismatch`) while any of
  those replicas is alive: it would stop them as orphans. A ``memory:`` store lives
  only as long as the process that opened it, so once that process is gone its
  replicas belong to nobody and the next controller adopts (and stops) them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from servecore._core.errors import (
    InvalidConfig,
    RuntimeDirectoryLocked,
    RuntimeDirectoryStoreMismatch,
    RuntimeDirectoryUnsafe,
    RuntimeFenced,
)
from servecore.runtimes.subprocess.files import (
    LOGS_DIR,
    open_lock,
    process_create_time,
    read_nofollow,
    write_atomically,
)

__all__ = ["MAX_NAME_LENGTH", "RuntimeDirectory", "default_base", "directory_name"]

log = logging.getLogger("servecore.runtimes.subprocess")

#: The owner's store and lease epoch (see the module doc), and the lock it is changed under.
FENCE_FILE = ".fence"
FENCE_LOCK = ".fence.lock"

#: The longest controller name a runtime directory is made for.
MAX_NAME_LENGTH = 128
#: Store ids of this form name stores that die with the process that opened them.
EPHEMERAL_STORE_PREFIX = "memory:"
#: Two start times closer than this are the same process (btime can drift a little).
_CREATE_TIME_TOLERANCE_S = 1.0


def directory_name(namespace: object) -> str:
    """The directory name of controller ``namespace``, refusing names that could
    reach outside the base directory or that no file system can hold."""

    def refuse(why: str) -> InvalidConfig:
        return InvalidConfig(
            "name", namespace, f"{why}; name the controller with printable characters, "
            f"without '/', at most {MAX_NAME_LENGTH} long",
        )  # fmt: skip

    if not isinstance(namespace, str):
        raise refuse(f"a controller name is a str, not {type(namespace).__name__}")
    if not namespace:
        raise refuse("it is empty")
    if len(namespace) > MAX_NAME_LENGTH:
        raise refuse(f"it is {len(namespace)} characters long")
    if namespace in (".", ".."):
        raise refuse("it names a directory above or at the base")
    if "/" in namespace or "\\" in namespace or (os.altsep and os.altsep in namespace):
        raise refuse("it holds a path separator")
    if not namespace.isprintable():  # NUL, control characters, lone surrogates
        raise refuse("it holds unprintable characters")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", namespace)


#: Store ids (``store_id``) that name a file: the default directory goes beside it.
_FILE_STORE_SCHEMES = ("sqlite:", "file:")


def store_base(store_id: str | None) -> Path | None:
    """Beside a file store, the base of its runtime directories: ``state.db`` ->
    ``state.db.replicas/``, so each checkpoint (each project) has its own; ``None``
    for a store that is not a file (memory, PostgreSQL) or is not named."""
    if store_id is None:
        return None
    for scheme in _FILE_STORE_SCHEMES:
        if store_id.startswith(scheme):
            path = Path(store_id[len(scheme) :])
            if path.is_absolute() and path.name:
                return path.parent / f"{path.name}.replicas"
    return None


def default_base() -> Path:
    """Where the default runtime directories of a store without a file are made (see
    the module doc)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "servecore"
    return Path(tempfile.gettempdir()) / f"servecore-{os.geteuid()}"


def _open_private_dir(path: Path, *, follow: bool) -> int:
    """Make ``path`` (mode 0700) if missing; open it and check that it is private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RuntimeDirectoryUnsafe(str(path), "it is not a directory (a link?)") from None
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise RuntimeDirectoryUnsafe(
                str(path), f"it is owned by uid {info.st_uid}, not by this user (uid "
                f"{os.geteuid()})",
            )  # fmt: skip
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeDirectoryUnsafe(
                str(path), f"its mode {stat.S_IMODE(info.st_mode):#o} lets other users "
                f"write to it (it must not be group- or world-writable; chmod 700 it)",
            )  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return fd


class RuntimeDirectory:
    """An opened runtime directory: its path, an fd on it, and its owner lock.

    ``epoch`` is the store's lease epoch this runtime acts for (``None`` without a
    lease); ``holds_owner_lock`` is false for a directory taken over from a frozen
    owner that still holds ``.owner.lock``.
    """

    def __init__(
        self,
        path: Path,
        dir_fd: int,
        owner_fd: int,
        fence_fd: int | None,
        *,
        store_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self.owner_fd = owner_fd
        self.fence_fd = fence_fd
        self.store_id = store_id
        self.epoch = epoch
        self.holds_owner_lock = False

    @classmethod
    def open(
        cls,
        requested: Path | None,
        namespace: str,
        store_id: str | None,
        epoch: int | None = None,
    ) -> RuntimeDirectory:
        """Check and take the directory of ``namespace`` (see the module doc)."""
        name = directory_name(namespace)
        if requested is None:
            base = store_base(store_id) or default_base()
            base.parent.mkdir(parents=True, exist_ok=True)
            os.close(_open_private_dir(base, follow=False))
            path = base / name
            dir_fd = _open_private_dir(path, follow=False)
        else:
            path = requested
            path.parent.mkdir(parents=True, exist_ok=True)
            dir_fd = _open_private_dir(path, follow=True)
        leased = epoch if store_id is not None else None
        fds: list[int] = []
        try:
            fds.append(open_lock(str(path / ".owner.lock")))
            if leased is not None:  # (only leaders of a leased store write the fence)
                fds.append(open_lock(str(path / FENCE_LOCK)))
        except BaseException:
            for fd in fds:
                os.close(fd)
            os.close(dir_fd)
            raise
        fence_fd = fds[1] if len(fds) > 1 else None
        opened = cls(path, dir_fd, fds[0], fence_fd, store_id=store_id, epoch=leased)
        try:
            with opened._fence_locked():
                opened._take(namespace, store_id)
        except BaseException:
            opened.close()
            raise
        return opened

    @contextlib.contextmanager
    def _fence_locked(self) -> Iterator[None]:
        """Hold ``.fence.lock`` while the fence is read and written: a few file
        operations (a runtime without an epoch writes no fence, and takes no lock)."""
        if self.fence_fd is None:
            yield
            return
        fcntl.flock(self.fence_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fence_fd, fcntl.LOCK_UN)

    def _take(self, namespace: str, store_id: str | None) -> None:
        fence = self.read_fence()
        self._refuse_if_stale(fence)
        try:
            fcntl.flock(self.owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.holds_owner_lock = True
        except BlockingIOError:
            if not self._newer_than(fence):
                raise RuntimeDirectoryLocked(str(self.path)) from None
            assert fence is not None
            log.warning(
                "runtime directory %s: taking it over from the owner of epoch %s (pid %s), "
                "which still holds its lock (frozen?); this controller holds epoch %s of "
                "store %s",
                self.path, fence.get("epoch"), fence.get("pid"), self.epoch, store_id,
            )  # fmt: skip
        else:
            # A taker-over holds no .owner.lock: its fence, naming a live process, is
            # what keeps others out once the frozen owner it fenced let go of the lock.
            if fence is not None and _alive(fence) and not self._newer_than(fence):
                raise RuntimeDirectoryLocked(str(self.path))
        self._claim_namespace(namespace)
        if store_id is not None:
            self._claim_store(store_id)
        self._make_logs_dir()
        if self.epoch is not None:
            self._write_fence(os.getpid(), process_create_time())

    def read_fence(self) -> dict[str, object] | None:
        """The recorded owner's store and epoch (``None`` when none is recorded)."""
        data = read_nofollow(str(self.path / FENCE_FILE))
        if data is None:
            return None
        with contextlib.suppress(ValueError):
            found = json.loads(data)
            if isinstance(found, dict):
                return found
        return None

    def fenced(self) -> RuntimeFenced | None:
        """Why this runtime must not act any more (a newer epoch of its store owns the
        directory now), or ``None``. Cheap: one small file read, no lock."""
        if self.epoch is None or self.store_id is None:
            return None
        return self._stale_by(self.read_fence())

    def _refuse_if_stale(self, fence: dict[str, object] | None) -> None:
        stale = self._stale_by(fence)
        if stale is not None:
            raise stale

    def _stale_by(self, fence: dict[str, object] | None) -> RuntimeFenced | None:
        """The refusal due when ``fence`` names a newer epoch of this runtime's store."""
        if fence is None or self.epoch is None or self.store_id is None:
            return None
        newer = fence.get("epoch")
        if fence.get("store_id") == self.store_id and isinstance(newer, int) and newer > self.epoch:
            return RuntimeFenced(str(self.path), self.store_id, self.epoch, newer)
        return None

    def _newer_than(self, fence: dict[str, object] | None) -> bool:
        """Whether this runtime leads a newer epoch of the store the fence names."""
        if fence is None or self.epoch is None or self.store_id is None:
            return False
        recorded = fence.get("epoch")
        return (
            fence.get("store_id") == self.store_id
            and isinstance(recorded, int)
            and recorded < self.epoch
        )

    def _write_fence(self, pid: int | None, create_time: float | None) -> None:
        record = {
            "store_id": self.store_id,
            "epoch": self.epoch,
            "pid": pid,
            "create_time": create_time,
        }
        write_atomically(str(self.path / FENCE_FILE), json.dumps(record).encode("utf-8"))

    def close(self) -> None:
        """Let go of the directory (the replicas in it are left alone). The fence keeps
        its epoch (older owners stay fenced) but no longer names this process."""
        try:
            if self.epoch is not None:
                with contextlib.suppress(OSError), self._fence_locked():
                    fence = self.read_fence()
                    if (
                        fence is not None
                        and fence.get("epoch") == self.epoch
                        and fence.get("store_id") == self.store_id
                        and fence.get("pid") == os.getpid()
                    ):
                        self._write_fence(None, None)
        finally:
            os.close(self.dir_fd)
            os.close(self.owner_fd)
            if self.fence_fd is not None:
                os.close(self.fence_fd)

    def _claim_namespace(self, namespace: str) -> None:
        marker = str(self.path / ".namespace")
        data = read_nofollow(marker)
        if data is None:
            write_atomically(marker, namespace.encode("utf-8"))
            return
        owner = data.decode("utf-8", "replace")
        if owner != namespace:
            raise InvalidConfig(
                "name",
                namespace,
                f"runtime directory {self.path} belongs to the controller named {owner!r}, "
                f"not {namespace!r}; give this controller its own directory",
            )

    def _claim_store(self, store_id: str) -> None:
        marker = str(self.path / ".store")
        data = read_nofollow(marker)
        recorded = None
        if data is not None:
            with contextlib.suppress(ValueError):
                recorded = json.loads(data)
        if isinstance(recorded, dict) and recorded.get("store_id") not in (None, store_id):
            recorded_id = str(recorded["store_id"])
            if self.live_keys() and not self._store_is_gone(recorded):
                raise RuntimeDirectoryStoreMismatch(str(self.path), recorded_id, store_id)
        record = {"store_id": store_id, "pid": os.getpid(), "create_time": process_create_time()}
        write_atomically(marker, json.dumps(record).encode("utf-8"))

    @staticmethod
    def _store_is_gone(recorded: dict[str, object]) -> bool:
        """Whether the recorded store can never be opened again: an ephemeral store
        whose process has exited."""
        if not str(recorded.get("store_id")).startswith(EPHEMERAL_STORE_PREFIX):
            return False
        pid, created = recorded.get("pid"), recorded.get("create_time")
        if not isinstance(pid, int) or not isinstance(created, (int, float)):
            return True
        try:
            return abs(process_create_time(pid) - created) >= _CREATE_TIME_TOLERANCE_S
        except Exception:  # no such process
            return True

    def _make_logs_dir(self) -> None:
        os.close(_open_private_dir(self.path / LOGS_DIR, follow=False))

    def live_keys(self) -> list[str]:
        """Keys of the replicas whose lock a live process holds."""
        alive = []
        for entry in os.scandir(self.path):
            if entry.name.startswith(".") or not entry.name.endswith(".lock"):
                continue
            try:
                fd = open_lock(entry.path)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alive.append(entry.name[: -len(".lock")])
            finally:
                os.close(fd)  # closing drops a lock taken here
        return alive


def _alive(fence: dict[str, object]) -> bool:
    """Whether the process a fence names is alive (the same process: its start time
    matches), and is not this one."""
    pid, created = fence.get("pid"), fence.get("create_time")
    if not isinstance(pid, int) or not isinstance(created, (int, float)) or pid == os.getpid():
        return False
    try:
        return abs(process_create_time(pid) - created) < _CREATE_TIME_TOLERANCE_S
    except Exception:  # no such process
        return False
