"""The subprocess runtime directory trusts nothing it did not make.

A hostile local user is simulated with a second uid (``nobody``, by ``chown``), which
needs root: those tests skip without it. Everything else runs as any user.
"""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from servecore import (
    InvalidConfig,
    RuntimeDirectoryLocked,
    RuntimeDirectoryStoreMismatch,
    RuntimeDirectoryUnsafe,
)
from servecore.runtimes import Query
from servecore.runtimes.subprocess import SubprocessRuntime, replica_key
from servecore.runtimes.subprocess.files import KEPT_LOG_BYTES, LOGS_DIR, ReplicaFiles
from subprocess_helpers import gone, kill_everything_under, replica_effect, replica_processes

pytestmark = pytest.mark.slow

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another uid needs root")


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def rt_dir(tmp_path: Path) -> Iterator[Path]:
    """A private runtime directory; every process started under it is killed after."""
    yield tmp_path / "rt"
    kill_everything_under(tmp_path)


@pytest.fixture
def default_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The base of default runtime directories without XDG_RUNTIME_DIR, in tmp_path."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path / f"servecore-{os.geteuid()}"
    kill_everything_under(tmp_path)


async def open_runtime(directory: Path | None, store_id: str | None = None) -> SubprocessRuntime:
    rt = SubprocessRuntime(directory)
    await rt.open(namespace="test", report=lambda event: None, store_id=store_id)
    return rt


@pytest.fixture
async def runtime(rt_dir: Path) -> AsyncIterator[SubprocessRuntime]:
    rt = await open_runtime(rt_dir)
    try:
        yield rt
    finally:
        await rt.close()


# -- ownership and mode -------------------------------------------------------------------


@needs_root
async def test_a_directory_owned_by_another_user_is_refused(rt_dir: Path) -> None:
    rt_dir.mkdir(mode=0o700)
    os.chown(rt_dir, *nobody())
    with pytest.raises(RuntimeDirectoryUnsafe, match=r"owned by uid 65534, not by this user"):
        await open_runtime(rt_dir)
    assert list(rt_dir.iterdir()) == []  # nothing read, nothing written


@needs_root
async def test_a_default_base_another_user_made_first_is_refused(default_base: Path) -> None:
    # The hostile user was first to create TMPDIR/servecore-0, open to everyone, and
    # left a link where the host would write its lock.
    default_base.mkdir(mode=0o777)
    os.chmod(default_base, 0o777)
    os.chown(default_base, *nobody())
    victim = default_base.parent / "victim"
    victim.write_text("precious")
    (default_base / "test").mkdir()
    (default_base / "test" / ".owner.lock").symlink_to(victim)
    with pytest.raises(RuntimeDirectoryUnsafe, match=str(default_base)):
        await open_runtime(None)
    assert victim.read_text() == "precious"


async def test_a_world_writable_directory_is_refused(rt_dir: Path) -> None:
    rt_dir.mkdir()
    os.chmod(rt_dir, 0o777)
    with pytest.raises(RuntimeDirectoryUnsafe, match=r"mode 0o777 lets other users write"):
        await open_runtime(rt_dir)
    assert list(rt_dir.iterdir()) == []


async def test_a_group_writable_default_base_is_refused(default_base: Path) -> None:
    default_base.mkdir()
    os.chmod(default_base, 0o770)
    with pytest.raises(RuntimeDirectoryUnsafe, match=r"mode 0o770"):
        await open_runtime(None)


async def test_a_link_in_place_of_the_default_directory_is_refused(
    default_base: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    default_base.symlink_to(elsewhere)
    with pytest.raises(RuntimeDirectoryUnsafe, match="not a directory"):
        await open_runtime(None)
    assert list(elsewhere.iterdir()) == []


async def test_directories_are_created_private(default_base: Path) -> None:
    rt = await open_runtime(None)
    try:
        for path in (default_base, rt.directory, rt.directory / "logs"):
            assert (path.stat().st_mode & 0o777) == 0o700, path
        await rt.start_replica(replica_effect("echo#1", "Echo"))
        for path in rt.directory.iterdir():
            if not path.is_dir():
                assert (path.stat().st_mode & 0o077) == 0, path
    finally:
        await rt.close()


# -- links planted in the directory -------------------------------------------------------


async def test_links_planted_at_replica_files_are_never_followed(
    runtime: SubprocessRuntime, rt_dir: Path, tmp_path: Path
) -> None:
    key = replica_key("echo#1")
    victims = {}
    for suffix in (".lock", ".spec.json", ".json", ".log", ".sock"):
        victim = tmp_path / f"victim{suffix}"
        victim.write_text("precious")
        (rt_dir / f"{key}{suffix}").symlink_to(victim)
        victims[suffix] = victim
    await runtime.start_replica(replica_effect("echo#1", "Echo", "p:"))
    assert await runtime.call("echo#1", [Query(args=("x",))]) == ["p:x"]
    await runtime.stop_replica("echo#1", 5.0)
    for victim in victims.values():
        assert victim.read_text() == "precious", victim
    assert not any(p.is_symlink() for p in rt_dir.rglob("*"))


async def test_links_planted_at_the_directory_records_are_never_followed(
    rt_dir: Path, tmp_path: Path
) -> None:
    rt_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (".namespace", ".store", ".owner.lock"):
        (rt_dir / name).symlink_to(victim)
    rt = await open_runtime(rt_dir, store_id="file:/srv/a.db")
    await rt.close()
    assert victim.read_text() == "precious"
    assert (rt_dir / ".namespace").read_text() == "test"
    assert json.loads((rt_dir / ".store").read_text())["store_id"] == "file:/srv/a.db"


# -- controller names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["..", ".", "a/b", "/etc", "", "a\0b", "tab\there", "x" * 200, "caf\udce9"]
)
async def test_names_that_could_escape_the_base_are_refused(
    default_base: Path, tmp_path: Path, name: str
) -> None:
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InvalidConfig, match="name=") as info:
        await SubprocessRuntime().open(namespace=name, report=lambda event: None)
    assert info.value.value == name
    assert repr(name)[:20] in str(info.value)  # named (a long one by its start)
    str(info.value).encode("utf-8")  # the message itself is encodable
    assert sorted(tmp_path.iterdir()) == before  # nothing was created


async def test_a_name_that_is_not_a_string_is_refused(default_base: Path) -> None:
    with pytest.raises(InvalidConfig, match="not list"):
        await SubprocessRuntime().open(namespace=["a"], report=lambda event: None)  # type: ignore[arg-type]


# -- one store per directory --------------------------------------------------------------


async def test_a_controller_on_another_store_neither_adopts_nor_stops_the_replicas(
    rt_dir: Path,
) -> None:
    first = await open_runtime(rt_dir, store_id="file:/srv/a.db")
    await first.start_replica(replica_effect("echo#1", "Echo"))
    pid = first.pid("echo#1")
    assert pid is not None
    await first.close()  # detached; the replica runs on

    second = SubprocessRuntime(rt_dir)
    with pytest.raises(RuntimeDirectoryStoreMismatch) as info:
        await second.open(namespace="test", report=lambda e: None, store_id="file:/srv/b.db")
    message = str(info.value)
    assert "'file:/srv/a.db'" in message and "'file:/srv/b.db'" in message
    assert "name=" in message  # the way out
    assert isinstance(info.value, RuntimeDirectoryLocked)
    assert not gone(pid)
    assert set(replica_processes(rt_dir)) == {replica_key("echo#1")}

    again = await open_runtime(rt_dir, store_id="file:/srv/a.db")  # its own store: fine
    try:
        assert await again.list_replicas() == {"echo#1"}
        assert again.pid("echo#1") == pid
        await again.stop_replica("echo#1", 5.0)
    finally:
        await again.close()
    # No live replica is left: the directory may serve another store now.
    other = await open_runtime(rt_dir, store_id="file:/srv/b.db")
    await other.close()


async def test_callers_without_a_store_id_are_accepted(rt_dir: Path) -> None:
    first = await open_runtime(rt_dir, store_id="file:/srv/a.db")
    await first.start_replica(replica_effect("echo#1", "Echo"))
    await first.close()
    legacy = await open_runtime(rt_dir)
    try:
        assert await legacy.list_replicas() == {"echo#1"}
        await legacy.stop_replica("echo#1", 5.0)
    finally:
        await legacy.close()


async def test_replicas_of_a_memory_store_whose_process_is_gone_are_adopted(
    rt_dir: Path,
) -> None:
    first = await open_runtime(rt_dir, store_id="memory:1")
    await first.start_replica(replica_effect("echo#1", "Echo"))
    await first.close()
    # Still this process: the first memory store may be opened again, so it is refused.
    with pytest.raises(RuntimeDirectoryStoreMismatch):
        await open_runtime(rt_dir, store_id="memory:2")
    # Pretend the process that held memory:1 has exited: its store is gone for good.
    record = json.loads((rt_dir / ".store").read_text())
    (rt_dir / ".store").write_text(json.dumps({**record, "create_time": 1.0}))
    second = await open_runtime(rt_dir, store_id="memory:2")
    try:
        assert await second.list_replicas() == {"echo#1"}
        await second.stop_replica("echo#1", 5.0)
    finally:
        await second.close()


async def test_a_store_mismatch_leaves_the_directory_free_for_the_right_controller(
    rt_dir: Path,
) -> None:
    first = await open_runtime(rt_dir, store_id="file:/srv/a.db")
    await first.start_replica(replica_effect("echo#1", "Echo"))
    await first.close()
    for _ in range(2):  # refused, and the refusal holds no lock
        with pytest.raises(RuntimeDirectoryStoreMismatch):
            await open_runtime(rt_dir, store_id="file:/srv/b.db")
    with trio.fail_after(30):
        rt = await open_runtime(rt_dir, store_id="file:/srv/a.db")
    try:
        await rt.stop_replica("echo#1", 5.0)
    finally:
        await rt.close()


def test_a_kept_log_is_cut_to_its_last_bytes(tmp_path: Path) -> None:
    # A replica that printed far more than the bound keeps only the end of its output.
    (tmp_path / LOGS_DIR).mkdir()
    files = ReplicaFiles(str(tmp_path), replica_key("loud#1"))
    files.write_record({"tag": "loud#1"})
    line = b"x" * 99 + b"\n"
    lines = 3 * KEPT_LOG_BYTES // len(line)
    with open(files.log, "wb") as f:
        f.write(line * (lines - 1) + b"the last line\n")
    kept = files.retire_log()
    assert kept is not None and not os.path.exists(files.log)
    data = Path(kept).read_bytes()
    assert len(data) <= KEPT_LOG_BYTES + 100
    first, _, rest = data.partition(b"\n")
    assert first.startswith(b"servecore: the first ") and first.endswith(
        b"bytes of this log were dropped"
    )
    assert rest.startswith(line) and rest.endswith(b"the last line\n")  # whole lines, the end
    small = ReplicaFiles(str(tmp_path), replica_key("quiet#1"))
    Path(small.log).write_bytes(b"short\n")
    assert Path(small.retire_log() or "").read_bytes() == b"short\n"  # under the bound: as is
