"""The ``servecore`` command end to end, as a user runs it: a real ``servecore run`` on a
free loopback port, HTTP requests, ``status``, ``apply`` of a changed (and of an
invalid) file, SIGINT, and a second run on the subprocess runtime that adopts the
replicas the first left running (same pids) instead of restarting them.

Every process the test starts is stopped by pid at the end, even on failure: the
servers it spawned, and any replica process whose command line names this test's own
runtime directory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


class Deployment:
    """A working directory with app files, and the processes started in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = directory / ".servecore" / "state.db"
        self.replica_dir = directory / ".servecore" / "replicas"
        self.servers: list[subprocess.Popen[str]] = []
        self.seen_pids: set[int] = set()

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "servecore", *args, "--store", str(self.store)],
            cwd=self.directory,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def run(self, app: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], Path]:
        log = self.directory / f"server-{len(self.servers)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "servecore", "run", str(app)),
                    *("--port", str(port), "--store", str(self.store), *extra),
                ],
                cwd=self.directory,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.servers.append(proc)
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    raise AssertionError(f"servecore run exited: {log.read_text()}") from None
                continue
            if line.startswith("servecore: serving"):
                return proc, log
        raise AssertionError(f"servecore run did not start serving: {log.read_text()}")

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        for b in data["backends"]:
            self.seen_pids.update(r["pid"] for r in b["replicas"] if r["pid"])
        return data

    def replica_pids(self) -> set[int]:
        """Live processes whose command line names this deployment's replica directory."""
        found = set()
        marker = str(self.replica_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
        return found

    def stop_everything(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for pid in self.replica_pids() | self.seen_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
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


def test_run_status_apply_sigint_and_adopt(deployment: Deployment) -> None:
    app = deployment.write("app.toml", APP_V1)
    port = _free_port()
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

    server, log = deployment.run(app.with_name("app-v2.toml"), port, "--runtime", "subprocess")
    adopted = deployment.status()
    assert _pids(adopted) == pids  # adopted, not restarted
    assert "2 replica(s) adopted, 0 restarted, 0 orphan(s) stopped" in log.read_text()
    assert "nothing to do" in log.read_text()
    assert _http(port, "POST", "/echo", "back") == (200, "v1:back")

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()


def test_stop_replicas_on_exit_and_restart_on_the_next_run(deployment: Deployment) -> None:
    app = deployment.write("app.toml", APP_V1)
    port = _free_port()
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


def test_threads_runtime_and_errors_a_user_meets(deployment: Deployment) -> None:
    missing = deployment.cli("status")
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr
    no_server = deployment.cli("apply", str(deployment.write("app.toml", APP_V1)))
    assert no_server.returncode == 1 and "no running servecore server" in no_server.stderr
    invalid = subprocess.run(
        [sys.executable, "-m", "servecore", "run", str(deployment.write("bad.toml", APP_INVALID))],
        cwd=deployment.directory,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert invalid.returncode == 1 and "backends.echo.num_replicas" in invalid.stderr
    port = _free_port()
    server, log = deployment.run(deployment.directory / "app.toml", port)
    assert _http(port, "POST", "/echo", "hi") == (200, "v1:hi")
    assert "replica echo#0 ready" in log.read_text()
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 0, log.read_text()
