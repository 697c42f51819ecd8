"""The ``servecore`` command end to end, as a user runs it: a real ``servecore run`` on a
free loopback port, HTTP requests, ``status``, ``apply`` of a changed (and of an
invalid) file, SIGINT, and a second run on the subprocess runtime that adopts the
replicas the first left running (same pids) instead of restarting them.

Every process the test starts is stopped by pid at the end, even on failure: the
servers it spawned, and any replica process whose command line names this test's own
runtime directory.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import servecore
from cli_server import CliServer, free_port, servecore_env

pytestmark = pytest.mark.slow

APP_V1 = """
[backends.echo]
target = "servecore.testing.targets:Echo"
init_kwargs = { prefix = "v1:" }

[endpoints.echo]
methods = ["GET", "POST"]
traffic = { echo = 1.0 }
"""

APP_V2 = """
[backends.echo]
target = "servecore.testing.targets:Echo"
init_kwargs = { prefix = "v1:" }
num_replicas = 2

[endpoints.echo]
methods = ["GET", "POST"]
traffic = { echo = 1.0 }

[endpoints.shout]
route = "/shout"
methods = ["POST"]
traffic = { echo = 1.0 }
"""

APP_INVALID = APP_V2.replace("num_replicas = 2", 'num_replicas = "many"')


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[CliServer]:
    d = CliServer(tmp_path)
    try:
        yield d
    finally:
        d.stop_everything()


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _pids(status: dict[str, Any]) -> dict[str, int]:
    return {r["tag"]: r["pid"] for b in status["backends"] for r in b["replicas"]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()


def test_run_status_apply_sigint_and_adopt(deployment: CliServer) -> None:
    app = deployment.write("app.toml", APP_V1)
    port = free_port()
    server, log = deployment.run(app, port, "--runtime", "subprocess")

    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    assert _http(port, "GET", "/echo?x=1") == (200, "v1:{'x': '1'}")
    assert _http(port, "GET", "/-/healthz") == (200, {"status": "ok"})
    control = deployment.store.parent / "control.sock"
    assert stat.S_ISSOCK(control.stat().st_mode) and stat.S_IMODE(control.stat().st_mode) == 0o600
    assert stat.S_IMODE(deployment.store.parent.stat().st_mode) == 0o700

    text = deployment.cli("status")
    assert text.returncode == 0, text.stderr
    for word in ("echo", "/echo", "HEALTHY", "RUNNING", "live", "servecore.testing.targets:Echo"):
        assert word in text.stdout
    first = deployment.status()
    assert first["live"] and first["healthy"]
    assert len(_pids(first)) == 1 and all(_pids(first).values())

    applied = deployment.cli("apply", str(deployment.write("app-v2.toml", APP_V2)))
    assert applied.returncode == 0, applied.stderr
    assert "update backend 'echo' (2 replica(s))" in applied.stdout
    assert "create endpoint 'shout' at /shout" in applied.stdout
    assert _http(port, "POST", "/shout", "hey") == (200, "v1:hey")
    second = deployment.status()
    assert [b["running_replicas"] for b in second["backends"]] == [2]
    pids = _pids(second)
    assert len(pids) == 2 and all(pids.values())
    assert _pids(first).items() <= pids.items()  # scaling up kept the first replica

    again = deployment.cli("apply", str(deployment.write("app-v2.toml", APP_V2)))
    assert again.returncode == 0 and "nothing to do" in again.stdout

    bad = deployment.cli("apply", str(deployment.write("bad.toml", APP_INVALID)))
    assert bad.returncode == 1
    assert "bad.toml: backends.echo.num_replicas = 'many'" in bad.stderr
    assert deployment.status()["seq"] == second["seq"]  # nothing changed

    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, log.read_text()
    assert "SIGINT" in log.read_text()
    assert all(_alive(pid) for pid in pids.values())  # kept for the next run
    offline = deployment.cli("status")
    assert offline.returncode == 0 and "from the checkpoint" in offline.stdout
    # Subprocess replicas outlive the server: offline status shows their pids.
    assert _pids(deployment.status()) == pids

    server, log = deployment.run(app.with_name("app-v2.toml"), port, "--runtime", "subprocess")
    adopted = deployment.status()
    assert _pids(adopted) == pids  # adopted, not restarted
    assert "2 replica(s) adopted, 0 restarted, 0 orphan(s) stopped" in log.read_text()
    assert "nothing to do" in log.read_text()
    assert _http(port, "POST", "/echo", "back") == (200, "v1:back")

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()


def test_stop_replicas_on_exit_and_restart_on_the_next_run(deployment: CliServer) -> None:
    app = deployment.write("app.toml", APP_V1)
    port = free_port()
    server, log = deployment.run(app, port, "--runtime", "subprocess", "--stop-replicas")
    [pid] = _pids(deployment.status()).values()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    server, log = deployment.run(app, port, "--runtime", "subprocess")
    [new_pid] = _pids(deployment.status()).values()
    assert new_pid != pid
    assert "0 replica(s) adopted, 1 restarted" in log.read_text()
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")


def test_threads_runtime_and_errors_a_user_meets(deployment: CliServer) -> None:
    missing = deployment.cli("status")
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr
    no_server = deployment.cli("apply", str(deployment.write("app.toml", APP_V1)))
    assert no_server.returncode == 1 and "no running servecore server" in no_server.stderr
    invalid = subprocess.run(
        [sys.executable, "-m", "servecore", "run", str(deployment.write("bad.toml", APP_INVALID))],
        cwd=deployment.directory,
        env=servecore_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert invalid.returncode == 1 and "backends.echo.num_replicas" in invalid.stderr
    port = free_port()
    server, log = deployment.run(deployment.directory / "app.toml", port)
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    assert "replica echo#0 ready" in log.read_text()
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, log.read_text()


# ---------------------------------------------------------------------------------------
# The edges: hostile input and a running server.

HANG = """
import time


class Hang:
    def __init__(self) -> None:
        time.sleep(3600)  # a constructor that never returns

    def __call__(self, request):
        return request
"""

APP_HANG = (
    APP_V1
    + """
[backends.stuck]
target = "hang:Hang"
"""
)


def _one_paragraph(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error:") or "Error:" in result.stderr, result.stderr
    for text in expected:
        assert text in " ".join(result.stderr.split()), result.stderr


def test_a_running_server_is_safe_from_bad_apply_input(deployment: CliServer) -> None:
    port = free_port()
    server, log = deployment.run(deployment.write("app.toml", APP_V1), port)
    before = deployment.status()

    # Over the server's limits at the last backend: not even the first one is created.
    over = APP_V1 + '[backends.a]\ntarget = "m:f"\n[backends.z]\ntarget = "m:f"\n'
    over += "num_replicas = 20000\n"
    refused = deployment.cli("apply", str(deployment.write("over.toml", over)))
    _one_paragraph(refused, "the server refused it", "backends.z.num_replicas = 20000")
    assert "nothing was applied" in refused.stderr
    assert deployment.status()["seq"] == before["seq"]

    # A pipe (as <(cat app.toml) gives) and a FIFO are refused, never read as empty.
    read_end, write_end = os.pipe()
    os.write(write_end, b"")
    os.close(write_end)
    try:
        piped = subprocess.run(
            [
                *(sys.executable, "-m", "servecore", "apply", f"/dev/fd/{read_end}"),
                *("--store", str(deployment.store)),
            ],
            cwd=deployment.directory,
            env=servecore_env(),
            capture_output=True,
            text=True,
            timeout=120,
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
    _one_paragraph(piped, "is a pipe or FIFO; an app file must be a regular file")
    fifo = deployment.directory / "fifo.toml"
    os.mkfifo(fifo)
    _one_paragraph(deployment.cli("apply", str(fifo)), "is a pipe or FIFO")

    # Too large: said so, not "no server".
    huge = deployment.directory / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(4 * 1024 * 1024 + 1)
    too_large = deployment.cli("apply", str(huge))
    _one_paragraph(too_large, "bytes an app file may have")
    assert "no running servecore server" not in too_large.stderr

    # A route under /-/ would never be reached: refused with the key and value.
    ops = APP_V1.replace('methods = ["GET", "POST"]', 'route = "/-/predict"')
    _one_paragraph(
        deployment.cli("apply", str(deployment.write("ops.toml", ops))),
        'endpoints.echo.route = "/-/predict"'.replace('"', "'"),
        "pick a route outside /-/",
    )

    # A second server on the same state directory: one paragraph, nothing started.
    second = _servecore(
        deployment.directory,
        *("run", "app.toml", "--store", str(deployment.store), "--port", str(free_port())),
    )
    _one_paragraph(second, "another servecore server is already running on")

    assert deployment.status()["seq"] == before["seq"]
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()


def _servecore(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servecore", *args],
        cwd=cwd,
        env=servecore_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_checks_its_edges_before_any_replica_starts(tmp_path: Path) -> None:
    app = tmp_path / "app.toml"
    app.write_text(APP_V1)
    store = tmp_path / "state" / "state.db"

    def run(*extra: str, store: Path = store) -> subprocess.CompletedProcess[str]:
        return _servecore(tmp_path, "run", str(app), "--store", str(store), *extra)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        in_use = run("--port", str(taken.getsockname()[1]))
    _one_paragraph(in_use, "cannot listen on 127.0.0.1:", "nothing was started")
    assert not store.exists()  # no checkpoint, so no replica was ever started
    _one_paragraph(run("--port", "70000"), "--port", "70000")
    for bad in ("nan", "-1", "0", "inf"):
        _one_paragraph(run("--timeout", bad), "--timeout", "finite number of seconds")

    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state.db"
    _one_paragraph(run(store=deep), "over the 107 a Unix socket may have")
    assert not deep.exists()

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    _one_paragraph(_servecore(tmp_path, "run", str(fifo), "--store", str(store)), "pipe or FIFO")

    # A shared directory (as /tmp) is refused, and its mode left as it was.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    _one_paragraph(run(store=shared / "state.db"), "group or other users may write to it")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert not store.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_state_directory_of_another_user_is_refused_before_sending_the_app(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app.toml"
    app.write_text(APP_V1 + '\n[backends.secret]\ntarget = "m:f"\ninit_kwargs = {key = "s3"}\n')
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    # Their own socket, listening where the server's would be: it must hear nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as spy:
        spy.bind(str(theirs / "control.sock"))
        spy.listen(8)
        spy.settimeout(0)
        os.chown(theirs / "control.sock", 65534, 65534)
        os.chown(theirs, 65534, 65534)
        store = str(theirs / "state.db")
        applied = _servecore(tmp_path, "apply", str(app), "--store", store)
        _one_paragraph(applied, "refusing to use the state directory", "owned by", "not by you")
        with pytest.raises(BlockingIOError):
            spy.accept()  # nobody connected
        _one_paragraph(_servecore(tmp_path, "status", "--store", store), "not by you")
        _one_paragraph(_servecore(tmp_path, "run", str(app), "--store", store), "not by you")


class _FakeController:
    """Just what the control socket uses; a submitted command never finishes (as a
    replica whose constructor hangs)."""

    def __init__(self) -> None:
        import servecore

        self.state = servecore.State()
        self.limits = servecore.Limits()

    async def status(self) -> Any:
        from servecore._controller.status import status_of

        return status_of(self.state, 0)

    async def submit(self, command: Any) -> None:
        import trio

        await trio.sleep_forever()


def _private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "s"
    directory.mkdir(mode=0o700)
    return directory


async def test_the_control_socket_queues_a_burst_while_the_server_is_busy(
    tmp_path: Path,
) -> None:
    import trio

    from servecore.cli._control import serve_control

    path = _private_dir(tmp_path) / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, _FakeController(), path)
        clients = []
        # Not awaited: the server's loop is busy for the whole burst, so only the
        # listen queue holds the 50 clients (16 used to fit, the rest were refused).
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect(str(path))  # BlockingIOError here: the queue was full
            s.setblocking(True)
            s.sendall(b'{"op": "status"}\n')
            clients.append(s)

        def replies() -> list[Any]:
            return [json.loads(s.makefile().readline()) for s in clients]

        answers = await trio.to_thread.run_sync(replies)
        assert [a["ok"] for a in answers] == [True] * 50
        for s in clients:
            s.close()
        nursery.cancel_scope.cancel()


def test_a_full_queue_is_reported_as_busy_not_as_no_server(tmp_path: Path) -> None:
    from servecore.cli._control import ControlBusy, ControlUnavailable, request

    path = _private_dir(tmp_path) / "control.sock"
    with pytest.raises(ControlUnavailable, match="no control socket"):
        request(path, {"op": "status"})
    clients = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(0)  # a server that never accepts
        try:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(s)
                s.setblocking(False)
                s.connect(str(path))
        except BlockingIOError:
            pass
        with pytest.raises(ControlBusy, match="running but too busy"):
            request(path, {"op": "status"}, busy_retry_s=0.05)
    for s in clients:
        s.close()
    with pytest.raises(ControlUnavailable, match="Connection refused"):
        request(path, {"op": "status"})  # the socket is left, nothing listens


async def test_an_apply_stuck_on_a_hung_constructor_does_not_wedge_the_next(
    tmp_path: Path,
) -> None:
    import trio

    from servecore.cli._control import serve_control

    path = _private_dir(tmp_path) / "control.sock"
    apply = {"op": "apply", "text": APP_V1, "source": "app.toml"}
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_control, apply_wait_s=0.05)
        await nursery.start(serve, _FakeController(), path)
        first = await trio.open_unix_socket(str(path))
        await first.send_all(json.dumps(apply).encode() + b"\n")
        second = await trio.open_unix_socket(str(path))
        await second.send_all(json.dumps({**apply, "source": "again.toml"}).encode() + b"\n")
        answer = json.loads(await second.receive_some(65536))
        assert (answer["ok"], answer["type"]) == (False, "Busy")
        assert "busy applying app.toml" in answer["error"]
        assert "nothing of again.toml was applied" in answer["error"]
        # Status still answers while the first apply hangs.
        third = await trio.open_unix_socket(str(path))
        await third.send_all(b'{"op": "status"}\n')
        assert json.loads(await third.receive_some(65536))["ok"]
        for stream in (first, second, third):
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_sigterm_during_apply_exits_non_zero_and_stops_the_replicas(
    deployment: CliServer,
) -> None:
    deployment.write("hang.py", HANG)
    app = deployment.write("app.toml", APP_HANG)
    log = deployment.directory / "server.log"
    with open(log, "w") as err:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "servecore", "run", str(app)),
                *("--port", str(free_port()), "--store", str(deployment.store)),
                *("--runtime", "subprocess", "--stop-replicas"),
            ],
            cwd=deployment.directory,
            env=servecore_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    deployment.servers.append(server)
    # Wait until both replica processes exist: 'echo' running, 'stuck' in its constructor.
    deadline = time.monotonic() + 120
    while len(deployment.replica_pids()) < 2 and server.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    pids = deployment.replica_pids()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    text = " ".join(log.read_text().split())
    assert "interrupted while applying" in text and "Traceback" not in text
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


APP_OPS = """
[backends.echo]
target = "servecore.testing.targets:Echo"
init_kwargs = { prefix = "v1:" }

[backends.bad]
target = "no_such_module_anywhere:Model"

[endpoints.echo]
methods = ["GET", "POST"]
traffic = { echo = 1.0 }
"""


def test_every_operator_action_is_a_command(deployment: CliServer) -> None:
    app = deployment.write("app.toml", APP_OPS)
    port = free_port()
    server, log = deployment.run(app, port)

    # A FAILED backend no endpoint uses: alive and ready; its hint names the real fix.
    assert _http(port, "GET", "/-/healthz") == (200, {"status": "ok"})
    assert _http(port, "GET", "/-/readyz") == (200, {"status": "ready"})
    text = deployment.cli("status")
    assert text.returncode == 0, text.stderr
    assert "FAILED" in text.stdout and "--app-dir" in text.stdout
    assert "servecore retry bad" in text.stdout and "retry_backend(" not in text.stdout
    live = deployment.status()
    assert [(b["queued"], b["running"]) for b in live["backends"]] == [(0, 0), (0, 0)]

    retried = deployment.cli("retry", "bad")
    assert retried.returncode == 1 and "No module named" in retried.stdout
    assert "servecore retry bad" in retried.stdout and "Traceback" not in retried.stderr

    # Changed init_kwargs: the plan rolls the backend in place; a dry run changes nothing.
    v2 = deployment.write("app-v2.toml", APP_OPS.replace('"v1:"', '"v2:"'))
    seq = deployment.status()["seq"]
    dry = deployment.cli("apply", "--dry-run", str(v2))
    assert dry.returncode == 0, dry.stderr
    assert "roll backend 'echo'" in dry.stdout and "delete" not in dry.stdout
    assert "retry backend 'bad'" in dry.stdout  # restating a FAILED backend retries it
    assert deployment.status()["seq"] == seq
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    applied = deployment.cli("apply", str(v2))
    assert "roll backend 'echo'" in applied.stdout, applied.stderr
    assert _http(port, "POST", "/echo", "hi") == (200, "v2:hi")

    in_use = deployment.cli("delete", "backend", "echo")
    assert in_use.returncode == 1 and "error:" in in_use.stderr and "'echo'" in in_use.stderr
    assert "Traceback" not in in_use.stderr
    debug = deployment.cli("--debug", "logs", "nothing")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    no_logs = deployment.cli("logs", "echo")
    assert no_logs.returncode == 1 and "threads runtime" in no_logs.stderr
    assert "Traceback" not in no_logs.stderr
    assert deployment.cli("delete", "backend", "bad").returncode == 0
    assert deployment.cli("delete", "endpoint", "echo").returncode == 0
    assert _http(port, "POST", "/echo", "hi")[0] == 404
    assert [b["tag"] for b in deployment.status()["backends"]] == ["echo"]

    stopped = deployment.cli("shutdown")
    assert stopped.returncode == 0, stopped.stderr
    assert server.wait(timeout=60) == 0, log.read_text()
    # Offline: the threads replicas stopped with the server, and status says so.
    offline = deployment.cli("status", "--json")
    data = json.loads(offline.stdout)
    assert not data["live"] and "no replica is running" in data["note"]
    assert [r["status"] for b in data["backends"] for r in b["replicas"]] == ["STOPPED"]
    assert "RUNNING" not in deployment.cli("status").stdout


def test_logs_of_a_backend_without_a_server_kept_then_live(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from servecore.cli._logs import NoLogs, show_logs
    from servecore.runtimes.subprocess.files import replica_key

    state_dir = tmp_path / ".servecore"
    kept = state_dir / "replicas" / "logs"
    kept.mkdir(parents=True)
    state_dir.chmod(0o700)
    group = replica_key("echo")
    (kept / f"{group}~{1:020d}~{replica_key('echo#0')}.log").write_text("first death\n")
    (kept / f"{group}~{2:020d}~{replica_key('echo#1')}.log").write_text("second death\n")
    other = replica_key("other")
    (kept / f"{other}~{3:020d}~{replica_key('other#2')}.log").write_text("not echo\n")
    live = state_dir / "replicas" / f"{replica_key('echo#3')}.log"
    live.write_text("serving\n")
    live.with_suffix(".json").write_text(json.dumps({"tag": "echo#3", "phase": "ready"}))

    out = io.StringIO()
    show_logs("echo", state_dir / "state.db", follow=False, console=Console(file=out, width=300))
    text = out.getvalue()
    assert text.index("first death") < text.index("second death") < text.index("serving")
    assert "not echo" not in text and "echo#3 (live)" in text
    out = io.StringIO()
    show_logs("echo#1", state_dir / "state.db", follow=False, console=Console(file=out))
    assert "second death" in out.getvalue() and "first death" not in out.getvalue()
    with pytest.raises(NoLogs, match="no logs of 'nothing'"):
        show_logs("nothing", state_dir / "state.db", follow=False, console=Console(file=out))


def _worker_pids_of(log: Path) -> set[int]:
    """The ingress workers' pids ``servecore run --workers`` recorded in its state."""
    record = json.loads((log.parent / ".servecore" / "workers.json").read_text())
    return set(record["pids"])


@pytest.mark.parametrize("stack", ["default", "uvicorn", "asyncio", "trio"])
def test_ingress_workers_serve_and_survive_a_killed_controller(
    deployment: CliServer, stack: str
) -> None:
    app = deployment.write("app.toml", APP_V2)
    port = free_port()
    workers_options = ("--runtime", "subprocess", "--workers", "2")
    if stack != "default":
        workers_options += ("--worker-stack", stack)
    server, log = deployment.run(app, port, *workers_options)
    workers = _worker_pids_of(log)
    assert len(workers) == 2 and workers == deployment.worker_pids()
    assert server.pid not in workers

    # The same ingress as --workers 0: routes, JSON in and out, the error mapping.
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    assert _http(port, "GET", "/echo?x=1") == (200, "v1:{'x': '1'}")
    assert _http(port, "POST", "/shout", "hey") == (200, "v1:hey")
    assert _http(port, "GET", "/shout")[0] == 405
    assert _http(port, "GET", "/nowhere") == (
        404,
        {"error": "no endpoint serves /nowhere", "type": "NotFound"},
    )
    assert _http(port, "GET", "/-/readyz") == (200, {"status": "ready"})
    assert _http(port, "GET", "/-/routes") == (200, {"/echo": "echo", "/shout": "shout"})

    # SIGKILL the controller only: the workers keep answering from the replicas.
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    for i in range(20):  # a new connection each: the kernel spreads them over the workers
        assert _http(port, "POST", "/echo", f"q{i}") == (200, f"v1:q{i}")
    assert deployment.worker_pids() == workers

    # A worker that dies is started again (by a server: start one on the same store,
    # which takes over the listening socket of the workers the killed one left behind,
    # and stops them once its own serve).
    server, log = deployment.run(app, port, *workers_options)
    assert "took over the HTTP socket of 2 ingress worker(s)" in log.read_text()
    fresh = _worker_pids_of(log)
    assert not fresh & workers
    deadline = time.monotonic() + 60
    while deployment.worker_pids() != fresh and time.monotonic() < deadline:
        time.sleep(0.1)
    assert deployment.worker_pids() == fresh, log.read_text()
    victim = min(fresh)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    # Until exactly 2: a worker starting a subprocess shows its command line in the
    # child for the instant between fork and exec, which would count as a third.
    while len(deployment.worker_pids() - {victim}) != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(deployment.worker_pids() - {victim}) == 2, log.read_text()
    assert _http(port, "POST", "/echo", "after") == (200, "v1:after")

    # SIGTERM stops the server and its workers.
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()
    assert deployment.worker_pids() == set()


def test_workers_are_refused_where_replicas_live_in_the_server(deployment: CliServer) -> None:
    app = deployment.write("app.toml", APP_V1)
    result = deployment.cli("run", str(app), "--workers", "2")
    assert result.returncode == 1
    _one_paragraph(result, "--workers 2 needs --runtime subprocess", "threads of this process")
    assert not deployment.store.exists()  # nothing was started


def test_the_server_table_is_honoured_flags_override_it_and_a_wrong_runtime_is_refused(
    deployment: CliServer,
) -> None:
    port = free_port()
    app = deployment.write(
        "app.toml",
        APP_V1
        + f"""
[server]
runtime = "subprocess"
workers = 0
port = {port}
store = "state/app.db"
name = "project"
""",
    )
    # The store named by the table, relative to the app file (not to the command's
    # working directory), and its runtime directory beside it.
    deployment.store = deployment.directory / "state" / "app.db"
    deployment.replica_dir = deployment.directory / "state" / "replicas"
    deployment.store_args = ()
    server, log = deployment.run(app, None)
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    assert deployment.store.exists()
    store_args = ("--store", str(deployment.store))
    deployment.store_args = store_args
    pids = _pids(deployment.status())
    assert len(pids) == 1 and deployment.replica_pids() == set(pids.values())
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, log.read_text()

    # --runtime overrides the table: threads would not find the subprocess replicas,
    # so the run is refused before any replica is touched.
    deployment.store_args = ()
    refused = deployment.cli("run", str(app), "--runtime", "threads")
    assert refused.returncode == 1
    assert "error:" in refused.stderr and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "runtime 'subprocess'" in message and "runtime 'threads'" in message
    assert "--runtime subprocess" in message
    assert all(_alive(pid) for pid in pids.values())

    # --port overrides the table's port; the table's runtime adopts the replicas.
    other = free_port()
    server, log = deployment.run(app, other)
    assert _http(other, "POST", "/echo", "again") == (200, "v1:again")
    deployment.store_args = store_args
    assert _pids(deployment.status()) == pids  # adopted, not restarted
    assert deployment.cli("shutdown", "--stop-replicas").returncode == 0
    assert server.wait(timeout=60) == 0, log.read_text()


def test_an_invalid_server_table_is_one_paragraph_naming_the_key(
    deployment: CliServer,
) -> None:
    app = deployment.write("app.toml", APP_V1 + '\n[server]\nport = "eighty"\n')
    result = deployment.cli("run", str(app))
    assert result.returncode == 1
    assert "app.toml: server.port = 'eighty'" in result.stderr
    assert not deployment.store.exists()


def test_a_plugin_runtime_is_chosen_by_name(deployment: CliServer) -> None:
    pytest.importorskip("servecore_mp")
    app = deployment.write("app.toml", APP_V1)
    port = free_port()
    server, log = deployment.run(app, port, "--runtime", "mp")
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, log.read_text()
    unknown = deployment.cli("run", str(app), "--runtime", "nope")
    assert unknown.returncode == 1
    assert "no runtime named 'nope'" in unknown.stderr and "mp" in unknown.stderr


def test_a_standby_on_postgresql_takes_over_from_a_killed_server(
    deployment: CliServer, postgres_server: Any, checkpoint_name: str
) -> None:
    dsn = f"{postgres_server.dsn}{'&' if '?' in postgres_server.dsn else '?'}"
    dsn += f"checkpoint={checkpoint_name}&lease_s=2"
    deployment.store_args = ("--store", dsn)
    app = deployment.write("app.toml", APP_V1)
    port, standby_port = free_port(), free_port()
    leader, _ = deployment.run(app, port)
    assert _http(port, "POST", "/echo", "one") == (200, "v1:one")
    first = deployment.cli("status", "--json")
    assert first.returncode == 0, first.stderr
    lease = json.loads(first.stdout)["lease"]
    assert lease["holder"] and lease["epoch"] == 1 and lease["expires_in_s"] > 0

    # A standby on the same host: its own state directory and port.
    standby, standby_log, serving = deployment.spawn(
        app, standby_port, "--standby", "--state-dir", "standby-state"
    )
    deadline = time.monotonic() + 60
    while "waiting for the lease" not in standby_log.read_text():
        assert time.monotonic() < deadline and standby.poll() is None, standby_log.read_text()
        time.sleep(0.1)
    assert not serving.is_set()
    leader.kill()
    leader.wait(timeout=30)
    deployment.wait_serving(standby, standby_log, serving)
    assert "took the lease (epoch 2)" in standby_log.read_text()
    assert _http(standby_port, "POST", "/echo", "two") == (200, "v1:two")
    shown = deployment.cli("status", "--state-dir", "standby-state")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "lease: leader" in text and "epoch 2" in text and "live" in text
    standby.send_signal(signal.SIGINT)
    assert standby.wait(timeout=60) == 0, standby_log.read_text()


def _ask(port: int, body: str) -> tuple[int, Any]:
    """One POST on a connection of its own (so no keep-alive connection a draining
    server closes is ever reused: each request stands for a new client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/echo", body=json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class Traffic:
    """Queries sent without a pause from threads, over HTTP and through a connected
    client, until stopped; every answer and every failure is kept."""

    def __init__(self, port: int, client: Any) -> None:
        self.port = port
        self.client = client
        self.answered = {"http": 0, "client": 0}
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), daemon=True)
            for kind in ("http", "http", "client")
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, kind: str) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            body = f"{kind}-{threading.get_ident()}-{i}"
            try:
                if kind == "http":
                    got = _ask(self.port, body)
                    ok = got == (200, f"v1:{body}")
                else:
                    got = self.client.get_handle("echo").call(body)
                    ok = got == f"v1:{body}"
            except Exception as exc:
                got, ok = repr(exc), False
            if ok:
                self.answered[kind] += 1
            else:
                self.failed.append(f"{kind} {body}: {got!r}")

    def wait_for(self, kind: str, more: int, timeout_s: float = 60) -> None:
        target = self.answered[kind] + more
        deadline = time.monotonic() + timeout_s
        while self.answered[kind] < target:
            assert time.monotonic() < deadline, (kind, self.answered, self.failed[:5])
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_a_standby_takes_over_from_a_killed_leader_without_a_failed_query(
    deployment: CliServer, postgres_server: Any, checkpoint_name: str
) -> None:
    """Leader and standby on one host and one state directory (so one runtime
    directory and one port). HTTP requests go to the leader's ingress workers and
    queries through a connected client, without a pause; the leader is SIGKILLed. Its
    workers and the client route on (their table comes from PostgreSQL), the standby
    takes the lease, adopts the same replica processes, takes the workers' listening
    socket and starts its own workers on it, then stops the old ones: every query is
    answered, and the replicas are the same processes."""
    dsn = f"{postgres_server.dsn}{'&' if '?' in postgres_server.dsn else '?'}"
    dsn += f"checkpoint={checkpoint_name}&lease_s=2"
    # A short state directory: the pytest directory is long for Unix socket paths.
    deployment.store_args = ("--store", dsn, "--state-dir", "st")
    state_dir = deployment.directory / "st"
    # What the cleanup looks for: this state directory's workers and replicas.
    deployment.store = state_dir / "postgres"
    deployment.replica_dir = state_dir / "replicas"
    app = deployment.write(
        "app.toml", APP_V1.replace("[backends.echo]", "[backends.echo]\nnum_replicas = 2")
    )
    port = free_port()
    args = ("--runtime", "subprocess", "--workers", "1")
    leader, _ = deployment.run(app, port, *args)
    old_workers = deployment.worker_pids()
    assert len(old_workers) == 1
    replicas = _pids(deployment.status())
    assert len(replicas) == 2
    standby, standby_log, serving = deployment.spawn(app, port, *args, "--standby")
    deadline = time.monotonic() + 60
    while "waiting for the lease" not in standby_log.read_text():
        assert time.monotonic() < deadline and standby.poll() is None, standby_log.read_text()
        time.sleep(0.1)

    with servecore.connect(dsn, state_dir=state_dir) as client:
        assert client.client.feed_source == "postgresql"
        traffic = Traffic(port, client)
        try:
            traffic.wait_for("http", 20)
            traffic.wait_for("client", 20)
            leader.kill()
            leader.wait(timeout=30)
            deployment.wait_serving(standby, standby_log, serving)
            assert "took the lease (epoch 2)" in standby_log.read_text()
            # The old workers go once the standby's serve, and traffic goes on.
            deadline = time.monotonic() + 60
            while deployment.worker_pids() & old_workers:
                assert time.monotonic() < deadline, standby_log.read_text()
                time.sleep(0.1)
            new_workers = deployment.worker_pids()
            assert len(new_workers) == 1 and not new_workers & old_workers
            traffic.wait_for("http", 50)
            traffic.wait_for("client", 50)
            assert client.table is not None and client.table.epoch == 2
        finally:
            traffic.stop()
    assert traffic.failed == [], traffic.failed[:10]
    assert "took over the HTTP socket" in standby_log.read_text()
    assert _pids(deployment.status()) == replicas
    standby.send_signal(signal.SIGINT)
    assert standby.wait(timeout=60) == 0, standby_log.read_text()
