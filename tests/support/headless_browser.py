"""A real headless browser for tests: Debian's Chromium, driven over the DevTools
protocol (a websocket; wsproto, which hypercorn brings, frames it).

Why not ``chromium --dump-dom --virtual-time-budget``: virtual time waits for the
network to go idle, and a page that holds an EventSource open never does. Over the
DevTools protocol the test keeps one page open, as a user would, and reads its DOM
as it updates.

:func:`chromium_or_skip` skips a test when there is no Chromium (and fails it in CI,
where ``.ci/run`` installs it). :class:`Browser` starts one with a private profile
directory and stops exactly that process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

#: Names Debian and others give the browser.
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium on ``PATH``, or ``None``."""
    for name in NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def chromium_or_skip() -> str:
    """The Chromium to use; skip without one (fail in CI, where .ci/run installs it)."""
    found = find_chromium()
    if found is None:
        why = "needs a headless Chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs it")
        pytest.skip(why)
    return found


class Browser:
    """One headless Chromium showing one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, profile: Path, url: str, *, timeout_s: float = 60) -> None:
        self.profile = profile
        self.timeout_s = timeout_s
        self._log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                # Containers (CI runs as root) have no user namespaces for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,1000",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                url,
            ],
            stdout=self._log,
            stderr=self._log,
            # Its own process group: close() stops the browser and its helper processes
            # (renderer, zygote) together, and nothing else.
            start_new_session=True,
        )
        try:
            port = self._devtools_port()
            self._socket, self._ws = self._connect(port)
        except BaseException:
            self.close()
            raise
        self._next_id = 0
        self._buffer: list[Any] = []

    def _devtools_port(self) -> int:
        """Chromium writes the port it chose to ``DevToolsActivePort`` in its profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with {self.process.returncode}: {self.log}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            time.sleep(0.1)
        raise AssertionError(f"chromium did not open its DevTools port: {self.log}")

    def _connect(self, port: int) -> tuple[socket.socket, Any]:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        deadline = time.monotonic() + self.timeout_s
        page = None
        while page is None and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next((t for t in json.load(r) if t.get("type") == "page"), None)
            if page is None:
                time.sleep(0.1)
        assert page is not None, "chromium shows no page"
        target = page["webSocketDebuggerUrl"].split(f":{port}", 1)[1]
        sock = socket.create_connection(("127.0.0.1", port), timeout=self.timeout_s)
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=f"127.0.0.1:{port}", target=target)))
        while True:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return sock, ws
                raise AssertionError(f"DevTools refused the websocket: {event!r}")

    def _call(self, method: str, **params: Any) -> Any:
        from wsproto.events import Message, Ping, TextMessage

        self._next_id += 1
        call_id = self._next_id
        payload = json.dumps({"id": call_id, "method": method, "params": params})
        self._socket.sendall(self._ws.send(TextMessage(data=payload)))
        parts: list[str] = []
        while True:
            data = self._socket.recv(1 << 20)
            if not data:
                raise AssertionError(f"DevTools closed the connection: {self.log}")
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, Ping):
                    self._socket.sendall(self._ws.send(event.response()))
                elif isinstance(event, Message):
                    parts.append(str(event.data))
                    if event.message_finished:
                        reply = json.loads("".join(parts))
                        parts = []
                        if reply.get("id") == call_id:
                            if "error" in reply:
                                raise AssertionError(f"DevTools {method}: {reply['error']}")
                            return reply["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page (JSON-able)."""
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = 60) -> Any:
        """Poll ``expression`` until it is truthy; fail saying ``what`` did not appear."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        text = self.evaluate("document.body.innerText")
        raise AssertionError(f"the page never showed {what} (last {value!r}); it reads:\n{text}")

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the page (for a person to look at)."""
        data = self._call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    @property
    def log(self) -> str:
        self._log.flush()
        return (self.profile.parent / "chromium.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        """Stop this browser (by its pid) and its connection."""
        with contextlib.suppress(AttributeError, OSError):
            self._socket.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self._log.close()
