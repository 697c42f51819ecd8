"""Failover on one PostgreSQL: a leader and a standby controller in separate processes.

* SIGKILL the leader while it streams commands: the standby takes the lease within the
  lease time, every acknowledged command is in its state, the one in flight is all or
  nothing, and the subprocess replicas are adopted (the same processes), not restarted.
* SIGSTOP the leader until its lease expires; the standby takes over; SIGCONT the old
  leader: its next command is fenced (LeaseLost) and runs no effect.
* The same on one subprocess runtime directory: the standby takes the runtime over from
  the frozen leader that still holds its lock, adopts the replicas (the same pids) and
  serves; the old leader, awake, can neither stop, kill nor adopt them
  (RuntimeFenced), and steps down.
* Stop the database under a running controller: commands fail with CheckpointError while
  it is down and succeed once it is back; nothing acknowledged is lost.

Every process started here is stopped by its pid, on failure too.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from postgres_setup import postgres_or_skip
from servecore import CheckpointError, LeaseLost, PostgresStore, open_controller
from servecore.testing import InMemoryRuntime
from servecore.testing.postgres import PostgresServer
from subprocess_helpers import kill_everything_under, replica_processes

pytestmark = pytest.mark.slow

HOST = Path(__file__).resolve().parents[1] / "support" / "postgres_host.py"
LEASE_S = 2.0
#: Bounded waits: only so that a broken build fails instead of hanging.
WAIT_S = 60.0
#: What "within the lease time" allows on top of it: the standby's poll and a busy box.
SLACK_S = 2.0


class Host:
    """One host process and the lines it printed (read by a thread, so never blocking)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOST), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = WAIT_S) -> str:
        """The next line starting with ``prefix`` (earlier lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} within {timeout}s; saw {self.seen[-5:]}"
                ) from None
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"host exited before {prefix!r}: {self.seen[-5:]}\n{err}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def drain(self) -> list[str]:
        """Every line left, once the process is dead."""
        self.proc.wait(WAIT_S)
        while (line := self.lines.get(timeout=WAIT_S)) is not None:
            self.seen.append(line)
        return self.seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies only awake
            self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for host in started:
        host.kill()
    kill_everything_under(tmp_path)  # the replicas, by pid


def start_host(
    hosts: list[Host], server: PostgresServer, checkpoint: str, runtime_dir: str, role: str
) -> Host:
    host = Host([server.dsn, checkpoint, runtime_dir, str(LEASE_S), role])
    hosts.append(host)
    return host


def test_sigkill_of_the_leader_mid_command_the_standby_adopts_and_serves(
    postgres_server: PostgresServer, hosts: list[Host], tmp_path: Path
) -> None:
    checkpoint = f"kill-{uuid.uuid4().hex[:8]}"
    runtime_dir = tmp_path / "rt"
    leader = start_host(hosts, postgres_server, checkpoint, str(runtime_dir), "leader")
    leader.expect("SERVING")
    for line in ("backend echo 2", "endpoint api", "route api echo"):
        leader.send(line)
        leader.expect("ACK")
    pids = {key: p.pid for key, p in replica_processes(runtime_dir).items()}
    assert len(pids) == 2

    standby = start_host(hosts, postgres_server, checkpoint, str(runtime_dir), "standby")
    standby.expect("WAITING")
    leader.send("stream n")
    for _ in range(15):
        leader.expect("ACK n")
    leader.proc.send_signal(signal.SIGKILL)  # mid-command: it streams without a pause
    killed_at = time.monotonic()
    lines = leader.drain()
    acked = {line.split()[1] for line in lines if line.startswith("ACK n")}
    sent = {line.split()[1] for line in lines if line.startswith("SENT n")}
    in_flight = sent - acked
    assert len(in_flight) <= 1

    took = float(standby.expect("TOOK"))
    state = json.loads(standby.expect("SERVING"))
    assert killed_at <= took <= killed_at + LEASE_S + SLACK_S, f"took {took - killed_at:.2f}s"
    endpoints = set(state["endpoints"]) - {"api"}
    assert acked <= endpoints, f"acknowledged but lost: {sorted(acked - endpoints)}"
    assert endpoints <= acked | in_flight, f"never sent: {sorted(endpoints - acked - sent)}"
    # The replicas were adopted: RUNNING, and the very same processes.
    assert state["replicas"] == {"echo#0": "RUNNING", "echo#1": "RUNNING"}
    assert {key: p.pid for key, p in replica_processes(runtime_dir).items()} == pids
    standby.send("call api hello")
    assert json.loads(standby.expect("RESULT")) == "hello"
    standby.send("endpoint after-failover")
    assert standby.expect("ACK") == "after-failover"


def test_a_paused_leader_is_fenced_when_it_wakes(
    postgres_server: PostgresServer, hosts: list[Host]
) -> None:
    checkpoint = f"pause-{uuid.uuid4().hex[:8]}"
    leader = start_host(hosts, postgres_server, checkpoint, "-", "leader")
    leader.expect("SERVING")
    leader.send("backend a 1")
    leader.expect("ACK")
    standby = start_host(hosts, postgres_server, checkpoint, "-", "standby")
    standby.expect("WAITING")

    leader.proc.send_signal(signal.SIGSTOP)  # a GC pause, a frozen VM: renewals stop
    paused_at = time.monotonic()
    took = float(standby.expect("TOOK"))
    state = json.loads(standby.expect("SERVING"))
    assert state["backends"] == ["a"] and state["epoch"] >= 2
    # Renewed about a third of a lease before the pause, it had about two thirds left
    # (less if the renewer ran late on a busy machine): the standby waited it out.
    assert took - paused_at >= LEASE_S / 4, "the standby did not wait for the lease"
    standby.send("endpoint new-leader")
    standby.expect("ACK")

    leader.proc.send_signal(signal.SIGCONT)
    leader.send("backend late 2")
    err = leader.expect("ERR")
    assert err.startswith("LeaseLost") and "nothing was written" in err
    leader.send("state")
    old = json.loads(leader.expect("STATE"))
    assert old["live"] == ["a#0"], "the fenced leader started a replica"
    assert "late" not in old["backends"]
    standby.send("state")
    now = json.loads(standby.expect("STATE"))
    assert "late" not in now["backends"] and "new-leader" in now["endpoints"]


def test_a_standby_takes_the_runtime_over_from_a_frozen_leader_which_wakes_fenced(
    postgres_server: PostgresServer, hosts: list[Host], tmp_path: Path
) -> None:
    checkpoint = f"takeover-{uuid.uuid4().hex[:8]}"
    runtime_dir = tmp_path / "rt"
    leader = start_host(hosts, postgres_server, checkpoint, str(runtime_dir), "leader")
    leader.expect("SERVING")
    for line in ("backend echo 2", "endpoint api", "route api echo"):
        leader.send(line)
        leader.expect("ACK")
    pids = {key: p.pid for key, p in replica_processes(runtime_dir).items()}
    assert len(pids) == 2
    standby = start_host(hosts, postgres_server, checkpoint, str(runtime_dir), "standby")
    standby.expect("WAITING")

    # Frozen, the leader still holds the runtime directory's lock: the lease decides.
    leader.proc.send_signal(signal.SIGSTOP)
    standby.expect("TOOK")
    state = json.loads(standby.expect("SERVING"))
    assert state["replicas"] == {"echo#0": "RUNNING", "echo#1": "RUNNING"}
    assert state["live"] == ["echo#0", "echo#1"]
    assert {key: p.pid for key, p in replica_processes(runtime_dir).items()} == pids
    standby.send("call api hello")
    assert json.loads(standby.expect("RESULT")) == "hello"

    leader.proc.send_signal(signal.SIGCONT)
    for order in ("rt-stop echo#0", "rt-kill echo#1", "rt-adopt"):
        leader.send(order)
        err = leader.expect("ERR")
        assert err.startswith("RuntimeFenced") and f"epoch {state['epoch']}" in err, err
    deadline = time.monotonic() + WAIT_S
    while True:
        leader.send("stepped")
        if leader.expect("STEPPED") == "SteppedDown" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leader.send("stepped")
    assert leader.expect("STEPPED") == "SteppedDown"
    leader.send("backend late 1")
    assert leader.expect("ERR").startswith("LeaseLost")

    # Nothing of the new leader's was touched: the same processes serve.
    assert {key: p.pid for key, p in replica_processes(runtime_dir).items()} == pids
    standby.send("call api again")
    assert json.loads(standby.expect("RESULT")) == "again"
    standby.send("backend more 1")
    standby.expect("ACK")
    standby.send("state")
    now = json.loads(standby.expect("STATE"))
    assert now["live"][:2] == ["echo#0", "echo#1"] and len(now["live"]) == 3


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, since the test stops it."""
    postgres_or_skip()
    with PostgresServer() as server:
        yield server


async def test_a_database_restart_under_a_running_controller(own_server: PostgresServer) -> None:
    runtime = InMemoryRuntime()
    store = PostgresStore(own_server.dsn, lease_s=LEASE_S)
    acked: list[str] = []
    async with open_controller(runtime=runtime, store=store, resync_interval_s=None) as ctl:
        for name in ("a", "b"):
            await ctl.create_endpoint(name)
            acked.append(name)
        await ctl.create_backend("x", "servecore.testing.targets:Echo", num_replicas=1)
        own_server.stop()
        for name in ("down1", "down2"):
            with pytest.raises(CheckpointError) as info:
                await ctl.create_endpoint(name)
            assert not isinstance(info.value, LeaseLost)
            assert "not applied" in str(info.value) and own_server.dsn[13:] in str(info.value)
        with pytest.raises(CheckpointError):
            await ctl.update_backend_config("x", num_replicas=2)
        assert set(runtime.live) == {"x#0"}  # no effect ran while the store was down
        own_server.start()
        await ctl.create_endpoint("c")
        acked.append("c")
        await ctl.update_backend_config("x", num_replicas=2)
        assert set(runtime.live) == {"x#0", "x#1"}
    async with open_controller(
        runtime=runtime, store=PostgresStore(own_server.dsn), resync_interval_s=None
    ) as ctl:
        assert sorted(ctl.state.endpoints) == sorted(acked)
        assert ctl.state.backends["x"].config.num_replicas == 2
