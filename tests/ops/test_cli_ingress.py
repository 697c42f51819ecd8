"""``servecore ingress`` end to end: ingress worker processes with no controller of
their own, for a ``servecore run`` on the same store, as a user runs them.

A real controller (``servecore run --runtime subprocess --workers 0``) and a real
``servecore ingress`` on another port: HTTP through the ingress answers; it follows a
new deploy; it keeps answering while the controller is SIGKILLed, and a restarted
controller neither takes its workers over nor stops them; SIGTERM of the ingress
leaves no worker behind; and every refusal is one paragraph. Every process started is
stopped by pid at the end, even on failure.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_server import CliServer, free_port

pytestmark = pytest.mark.slow

APP = """
[server]
runtime = "subprocess"
workers = 0

[backends.echo]
target = "servecore.testing.targets:Echo"
init_kwargs = { prefix = "v1:" }

[endpoints.echo]
methods = ["GET", "POST"]
traffic = { echo = 1.0 }
"""


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[CliServer]:
    d = CliServer(tmp_path)
    try:
        yield d
    finally:
        d.stop_everything()


def _http(port: int, body: str) -> tuple[int, Any]:
    """One POST /echo on a connection of its own (the kernel hands each new connection
    to one of the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/echo", body=json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _one_paragraph(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error:") or "Error:" in result.stderr, result.stderr
    for text in expected:
        assert text in " ".join(result.stderr.split()), result.stderr


def _ingress(deployment: CliServer, port: int, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    """Start ``servecore ingress`` on ``port`` and wait until it says it serves; it is
    stopped with the deployment's servers (its workers by their command line)."""
    proc, log, serving = deployment.spawn_command("ingress", "ingress", "--port", str(port), *extra)
    deployment.wait_serving(proc, log, serving)
    return proc, log


def _until(check: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_an_ingress_serves_follows_and_outlives_the_controller(deployment: CliServer) -> None:
    app = deployment.write("app.toml", APP)
    port, ingress_port = free_port(), free_port()
    controller, controller_log = deployment.run(app, port)
    assert deployment.worker_pids() == set()  # --workers 0: the controller serves itself

    ingress, log = _ingress(deployment, ingress_port, "--workers", "2")
    record = deployment.store.parent / f"ingress-127.0.0.1-{ingress_port}.json"
    workers = set(json.loads(record.read_text())["pids"])
    assert len(workers) == 2 and workers == deployment.worker_pids()
    assert not (deployment.store.parent / "workers.json").exists()  # not servecore run's
    for i in range(6):
        assert _http(ingress_port, f"q{i}") == (200, f"v1:q{i}")

    # A second ingress on the same address is refused while this one runs, and one on
    # the controller's own port cannot listen; neither disturbs what serves.
    again = deployment.cli("ingress", "--port", str(ingress_port), "--workers", "1")
    _one_paragraph(again, "another servecore ingress already serves", "nothing was started")
    taken = deployment.cli("ingress", "--port", str(port), "--workers", "1")
    _one_paragraph(taken, f"cannot listen on 127.0.0.1:{port}", "--port")
    assert deployment.worker_pids() == workers

    # A deploy reaches the ingress: its workers follow the controller's table.
    deployment.write("app.toml", APP.replace('"v1:"', '"v2:"'))
    applied = deployment.cli("apply", str(app))
    assert applied.returncode == 0, applied.stderr
    _until(lambda: _http(ingress_port, "x") == (200, "v2:x"), "the ingress never saw v2")

    # SIGKILL the controller: the ingress answers on the last table it holds.
    controller.kill()
    controller.wait(timeout=30)
    for i in range(10):
        assert _http(ingress_port, f"down{i}") == (200, f"v2:down{i}")

    # A controller started again on the store neither takes the ingress's workers over
    # nor stops them (they are not its own), and the ingress follows it again.
    controller, controller_log = deployment.run(app, port)
    assert "took over" not in controller_log.read_text()
    assert deployment.worker_pids() == workers
    deployment.write("app.toml", APP.replace('"v1:"', '"v3:"'))
    applied = deployment.cli("apply", str(app))
    assert applied.returncode == 0, applied.stderr
    _until(lambda: _http(ingress_port, "y") == (200, "v3:y"), "the ingress never saw v3")

    # SIGTERM drains and stops the workers: none is left, nor the record.
    ingress.send_signal(signal.SIGTERM)
    assert ingress.wait(timeout=60) == 0, log.read_text()
    assert deployment.worker_pids() == set()
    assert not record.exists()
    assert _http(port, "z") == (200, "v3:z")  # the controller serves on
    controller.send_signal(signal.SIGTERM)
    assert controller.wait(timeout=60) == 0, controller_log.read_text()


def test_a_killed_ingress_leaves_its_workers_serving_for_the_next_one(
    deployment: CliServer,
) -> None:
    app = deployment.write("app.toml", APP)
    controller, _ = deployment.run(app, free_port())
    ingress_port = free_port()
    first, _ = _ingress(deployment, ingress_port, "--workers", "1")
    old = deployment.worker_pids()
    assert len(old) == 1
    first.kill()
    first.wait(timeout=30)
    assert _http(ingress_port, "orphaned") == (200, "v1:orphaned")

    # The next ingress on that address takes their socket, then stops them.
    second, log = _ingress(deployment, ingress_port, "--workers", "1")
    assert "took over the HTTP socket of 1 ingress worker(s)" in log.read_text()
    _until(lambda: not deployment.worker_pids() & old, "the old worker was never stopped")
    assert len(deployment.worker_pids()) == 1
    assert _http(ingress_port, "next") == (200, "v1:next")
    second.send_signal(signal.SIGINT)
    assert second.wait(timeout=60) == 0, log.read_text()
    assert deployment.worker_pids() == set()
    controller.send_signal(signal.SIGTERM)
    assert controller.wait(timeout=60) == 0


def test_ingress_refusals_are_one_paragraph(deployment: CliServer) -> None:
    missing = deployment.cli("ingress", "--workers", "1")
    _one_paragraph(missing, f"no store at {deployment.store}", "servecore run")
    assert not deployment.store.parent.exists()  # nothing was created

    bad = deployment.cli("ingress", "--workers", "0")
    _one_paragraph(bad, "--workers")

    # A store whose controller is not running: no table to follow.
    deployment.store.parent.mkdir(mode=0o700)
    deployment.store.write_bytes(b"")
    absent = deployment.cli("ingress", "--workers", "1")
    _one_paragraph(absent, "no servecore run answers at", "must be running on this host")

    # Threads replicas live inside the controller: no worker can reach them.
    deployment.store.unlink()
    app = deployment.write("app.toml", APP.replace('"subprocess"', '"threads"'))
    controller, _ = deployment.run(app, free_port())
    threads = deployment.cli("ingress", "--workers", "1", "--port", str(free_port()))
    _one_paragraph(threads, "'threads' runtime", "--runtime subprocess")
    assert deployment.worker_pids() == set()
    controller.send_signal(signal.SIGTERM)
    assert controller.wait(timeout=60) == 0


def test_an_ingress_on_postgresql_follows_the_database_and_outlives_the_controller(
    deployment: CliServer, postgres_server: Any, checkpoint_name: str
) -> None:
    dsn = f"{postgres_server.dsn}{'&' if '?' in postgres_server.dsn else '?'}"
    dsn += f"checkpoint={checkpoint_name}"
    # A checkpoint no controller has served: nothing to follow yet.
    deployment.store_args = ("--store", dsn, "--state-dir", "st")
    fresh = deployment.cli("ingress", "--workers", "1")
    _one_paragraph(fresh, "names no runtime", "nothing was started")

    # A short state directory: the pytest directory is long for Unix socket paths.
    state_dir = deployment.directory / "st"
    deployment.store = state_dir / "postgres"  # what the cleanup looks for
    deployment.replica_dir = state_dir / "replicas"
    app = deployment.write("app.toml", APP)
    controller, _ = deployment.run(app, free_port())
    ingress_port = free_port()
    ingress, log = _ingress(deployment, ingress_port, "--workers", "1")
    assert _http(ingress_port, "pg") == (200, "v1:pg")
    controller.kill()
    controller.wait(timeout=30)
    for i in range(5):
        assert _http(ingress_port, f"down{i}") == (200, f"v1:down{i}")
    ingress.send_signal(signal.SIGTERM)
    assert ingress.wait(timeout=60) == 0, log.read_text()
    assert deployment.worker_pids() == set()
