"""A ``servecore.connect`` handle in another process, beside a raw socket round trip.

A real ``servecore run --runtime subprocess`` (its own process, a private directory and
port) serves one replica of ``bench_targets:echo``. This process -- not the
controller's -- measures, on that same replica:

* ``raw socket`` -- a blocking Unix socket to the replica's socket, one framed call at
  a time (the wire format's frame and pickle, nothing else): the floor.
* ``connect handle`` -- ``servecore.connect(store).get_handle("echo").call(x)``: the
  client's router, its trio thread and the replica connection.

Sequential round trips, in interleaved rounds (load from elsewhere weighs on both);
p50/p99 are over all round trips of a row, ``p50/raw`` the median of the per-round
ratios. Every process it starts is stopped by pid before it exits, on error too.
Results print as a table and go to ``benchmarks/results/bench_connect.json``.
Run: ``.venv/bin/python benchmarks/bench_connect.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import servecore  # noqa: E402
from servecore.runtimes.subprocess.files import replica_key  # noqa: E402
from servecore.runtimes.subprocess.wire import CALL, HEADER, OK, PING, frame  # noqa: E402

APP = """
[backends.echo]
target = "bench_targets:echo"

[endpoints.echo]
traffic = { echo = 1.0 }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(directory: Path) -> subprocess.Popen[str]:
    (directory / "app.toml").write_text(APP)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE)])
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "servecore", "run", "app.toml", "--runtime", "subprocess"),
            *("--port", str(_free_port()), "--store", str(directory / "s" / "state.db")),
        ],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("servecore: serving"):
            return proc
    raise SystemExit("servecore run did not start")


def _receive(sock: socket.socket) -> tuple[int, bytes]:
    header = sock.recv(HEADER.size, socket.MSG_WAITALL)
    length, kind, _ = HEADER.unpack(header)
    return kind, sock.recv(length, socket.MSG_WAITALL) if length else b""


def _raw_socket(replica_dir: Path, tag: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(replica_dir, os.O_RDONLY | os.O_DIRECTORY)
    sock.connect(f"/proc/self/fd/{dir_fd}/{replica_key(tag)}.sock")
    sock.sendall(frame(PING, 0, b""))
    assert _receive(sock)[0] == OK
    return sock


def _raw_call(sock: socket.socket, value: Any, request_id: int) -> Any:
    sock.sendall(frame(CALL, request_id, pickle.dumps([((value,), {})], protocol=5)))
    kind, body = _receive(sock)
    assert kind == OK, kind
    return pickle.loads(body)[0]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(quick: bool) -> dict[str, Any]:
    rounds, per_round = (3, 300) if quick else (7, 2000)
    with tempfile.TemporaryDirectory(prefix="bench-connect-") as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o700)
        server = _start_server(directory)
        try:
            with servecore.connect(directory / "s" / "state.db") as client:
                handle = client.get_handle("echo")
                (tag,) = client.routing_table.backends["echo"].replicas
                raw = _raw_socket(directory / "s" / "replicas", tag)
                samples: dict[str, list[float]] = {"raw socket": [], "connect handle": []}
                ratios = []
                for _ in range(rounds):
                    medians = {}
                    for name in samples:
                        taken = []
                        for i in range(per_round):
                            started = time.perf_counter()
                            if name == "raw socket":
                                assert _raw_call(raw, i, i + 1) == i
                            else:
                                assert handle.call(i) == i
                            taken.append(time.perf_counter() - started)
                        samples[name] += taken
                        medians[name] = statistics.median(taken)
                    ratios.append(medians["connect handle"] / medians["raw socket"])
                raw.close()
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            for entry in Path("/proc").iterdir():  # the replica, by its directory
                with contextlib.suppress(OSError):
                    if entry.name.isdigit() and tmp.encode() in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
    rows = [
        {
            "name": name,
            "p50_us": statistics.median(taken) * 1e6,
            "p99_us": _percentile(taken, 0.99) * 1e6,
            "p50_vs_raw": 1.0 if name == "raw socket" else statistics.median(ratios),
        }
        for name, taken in samples.items()
    ]
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": rounds,
        "per_round": per_round,
        "round_trips": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'round trip':<20}{'p50 us':>9}{'p99 us':>9}{'p50/raw':>9}")
    for row in result["round_trips"]:
        print(
            f"{row['name']:<20}{row['p50_us']:>9.1f}{row['p99_us']:>9.1f}{row['p50_vs_raw']:>8.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and queries")
    args = parser.parse_args()
    result = main(args.quick)
    print_table(result)
    out = HERE / "results" / "bench_connect.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
