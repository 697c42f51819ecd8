"""The live status page: ``/-/status.json``, the ``/-/events`` stream and
``/-/dashboard``, first through the ASGI app, then in a real headless Chromium against
a real ``servecore run``: the page shows the replicas, shows a new one after
``servecore apply``, and shows the replacement of a replica killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_cli import _http

import servecore
from cli_server import CliServer, free_port
from headless_browser import Browser, chromium_or_skip
from servecore._controller.replica_lifecycle import RECENT_EVENTS, ReplicaLifecycle
from servecore._serving.dashboard import end_streams
from servecore.http import HTTPIngress

ECHO = "servecore.testing.targets:echo"


@pytest.fixture
async def ctl() -> AsyncIterator[servecore.Controller]:
    async with servecore.open_controller(runtime="threads") as ctl:
        await ctl.create_backend("echo", ECHO)
        await ctl.create_endpoint("echo", route="/echo", methods=["GET", "POST"])
        await ctl.set_traffic("echo", {"echo": 1.0})
        yield ctl


async def get(
    app: HTTPIngress, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI app: status, headers, body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "query_string": b""}, receive, send)
    start, *bodies = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(b["body"] for b in bodies)


async def test_status_json_shows_replicas_traffic_events_and_queries(
    ctl: servecore.Controller,
) -> None:
    handle = ctl.get_handle("echo")
    for i in range(3):
        assert await handle.call(i) == i
    status, headers, body = await get(HTTPIngress(ctl), "/-/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    assert [ep["traffic"] for ep in data["endpoints"]] == [{"echo": 1.0}]
    [backend] = data["backends"]
    assert [(r["tag"], r["status"]) for r in backend["replicas"]] == [("echo#0", "RUNNING")]
    assert data["controller"]["ready"] and data["controller"]["stepped_down"] is None
    assert data["queries"]["echo"]["total"] == 3
    assert data["queries"]["echo"]["outcomes"] == {"ok": 3}
    assert [(e["event"], e["replica"]) for e in data["events"]][-2:] == [
        ("starting", "echo#0"),
        ("ready", "echo#0"),
    ]
    assert data["autoscaling"] == {}


async def test_status_json_shows_an_autoscaling_backends_decision(
    ctl: servecore.Controller,
) -> None:
    await ctl.create_backend("scaled", ECHO, autoscaling={"min_replicas": 1, "max_replicas": 3})
    data = json.loads((await get(HTTPIngress(ctl), "/-/status.json"))[2])
    scaled = data["autoscaling"]["scaled"]
    assert (scaled["min_replicas"], scaled["max_replicas"], scaled["replicas"]) == (1, 3, 1)
    assert scaled["pending"] is None


def test_recent_events_keep_the_newest_oldest_first() -> None:
    lifecycle = ReplicaLifecycle(runtime=None, clock=lambda: 12.5)
    for i in range(RECENT_EVENTS + 5):
        lifecycle.stopping(f"echo#{i}")
    events = lifecycle.recent()
    assert len(events) == RECENT_EVENTS
    assert (events[0].replica, events[-1].replica) == ("echo#5", f"echo#{RECENT_EVENTS + 4}")
    assert {(e.event, e.backend, e.at) for e in events} == {("stopping", "echo", 12.5)}


def test_the_sync_controller_reads_recent_events() -> None:
    with servecore.start() as ctl:
        ctl.create_backend("echo", ECHO)
        assert [e.event for e in ctl.recent_events()][-2:] == ["starting", "ready"]


async def test_the_event_stream_pushes_changes_and_ends_with_its_client(
    ctl: servecore.Controller,
) -> None:
    to_app, from_client = trio.open_memory_channel[dict[str, Any]](1)
    to_test, from_app = trio.open_memory_channel[dict[str, Any]](100)
    scope = {"type": "http", "method": "GET", "path": "/-/events", "query_string": b""}

    async def data() -> dict[str, Any]:
        """The next ``data:`` message of the stream, parsed."""
        while True:
            message = await from_app.receive()
            body = message.get("body", b"")
            if body.startswith(b"data: "):
                assert body.endswith(b"\n\n") and body.count(b"\n") == 2
                parsed: dict[str, Any] = json.loads(body[len(b"data: ") :])
                return parsed

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await to_app.send({"type": "http.request", "body": b"", "more_body": False})
            nursery.start_soon(HTTPIngress(ctl), scope, from_client.receive, to_test.send)
            start = await from_app.receive()
            headers = dict(start["headers"])
            assert (start["status"], headers[b"content-type"]) == (
                200,
                b"text/event-stream; charset=utf-8",
            )
            first = await data()
            assert [b["tag"] for b in first["backends"]] == ["echo"]
            await ctl.create_backend("late", ECHO)
            pushed = await data()
            while [b["tag"] for b in pushed["backends"]] != ["echo", "late"]:
                pushed = await data()
            assert pushed["seq"] > first["seq"]
            await to_app.send({"type": "http.disconnect"})
    # The app returned once its client went away: the nursery above closed.


async def test_shutting_down_ends_the_streams_and_refuses_new_ones(
    ctl: servecore.Controller,
) -> None:
    sent: list[dict[str, Any]] = []
    gone = trio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/-/events", "query_string": b""}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(HTTPIngress(ctl), scope, receive, send)
            while not any(m.get("body", b"").startswith(b"data: ") for m in sent):
                await trio.sleep(0.01)
            end_streams(ctl)
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    status, _, body = await get(HTTPIngress(ctl), "/-/events")
    assert status == 503 and "shutting down" in json.loads(body)["error"]


async def test_the_page_is_one_static_file_that_never_parses_data_as_html(
    ctl: servecore.Controller,
) -> None:
    status, headers, page = await get(HTTPIngress(ctl), "/-/dashboard")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    text = page.decode()
    assert 'new EventSource("events")' in text
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in text
    for external in ("<link", " src=", "@import", "http://", "https://"):
        assert external not in text
    assert (await get(HTTPIngress(ctl), "/-/dashboard", "POST"))[0] == 405


# -- in a real browser ------------------------------------------------------------------

#: A constructor error full of markup: the page must show it as text.
MARKUP = "<img src=x onerror=\"document.title='pwned'\"><b id=injected>bold</b>"

APP_V1 = f"""
[backends.echo]
target = "servecore.testing.targets:Echo"

[backends.broken]
target = "tests.support.operate_targets:FailsWith"
init_args = [{json.dumps(MARKUP)}]

[endpoints.echo]
methods = ["GET", "POST"]
traffic = {{ echo = 1.0 }}
"""

#: One more echo replica; the broken backend goes (apply deletes what the file omits).
APP_V2 = """
[backends.echo]
target = "servecore.testing.targets:Echo"
num_replicas = 2

[endpoints.echo]
methods = ["GET", "POST"]
traffic = { echo = 1.0 }
"""

#: The replicas the page shows, as ``tag status`` strings.
REPLICAS = (
    "Array.from(document.querySelectorAll('[data-backend=\"echo\"] [data-replica]'))"
    ".map(row => row.dataset.replica + ' ' + row.dataset.status)"
)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[CliServer]:
    d = CliServer(tmp_path)
    try:
        yield d
    finally:
        d.stop_everything()


def _running(deployment: CliServer) -> dict[str, int]:
    """The echo replicas ``servecore status`` reports RUNNING, with their pids."""
    [echo] = [b for b in deployment.status()["backends"] if b["tag"] == "echo"]
    return {r["tag"]: r["pid"] for r in echo["replicas"] if r["status"] == "RUNNING"}


def _shows(tags: set[str]) -> str:
    """JS: whether the page shows exactly ``tags``, all RUNNING."""
    wanted = json.dumps(sorted(f"{t} RUNNING" for t in tags))
    return f"JSON.stringify({REPLICAS}.sort()) === JSON.stringify({wanted})"


@pytest.mark.slow
def test_the_dashboard_shows_replicas_come_and_be_replaced_live(
    deployment: CliServer, tmp_path: Path
) -> None:
    chromium = chromium_or_skip()
    port = free_port()
    deployment.run(
        deployment.write("app.toml", APP_V1), port, "--runtime", "subprocess", "--workers", "0"
    )
    first = _running(deployment)
    assert len(first) == 1

    browser = Browser(chromium, tmp_path / "chromium", f"http://127.0.0.1:{port}/-/dashboard")
    try:
        browser.wait_for(_shows(set(first)), f"replica {sorted(first)}")
        assert browser.evaluate("document.getElementById('connection').textContent") == "live"
        # The constructor's error is shown as text: no element made of it, no script run.
        browser.wait_for(f"document.body.innerText.includes({json.dumps(MARKUP)})", "the error")
        assert browser.evaluate("document.querySelectorAll('img, #injected').length") == 0
        assert browser.evaluate("document.title") != "pwned"

        for text in ("a", "b", "c"):
            assert _http(port, "POST", "/echo", text) == (200, text)
        row = "document.querySelector('[data-endpoint=\"echo\"]').innerText"
        browser.wait_for(f"{row}.trim().endsWith('3')", "3 queries to echo")

        # The same page, not reloaded: a replica appears after apply.
        applied = deployment.cli("apply", str(deployment.write("app-v2.toml", APP_V2)))
        assert applied.returncode == 0, applied.stderr
        second = _running(deployment)
        assert len(second) == 2 and first.keys() < second.keys()
        browser.wait_for(_shows(set(second)), f"replicas {sorted(second)} after apply")
        browser.wait_for("!document.querySelector('[data-backend=\"broken\"]')", "broken gone")

        # A replica killed outside servecore's knowledge is replaced, and the page says so.
        killed, pid = sorted(second.items())[0]
        os.kill(pid, signal.SIGKILL)
        browser.wait_for(
            f"{REPLICAS}.length === 2 && {REPLICAS}.every(r => r.endsWith(' RUNNING')) && "
            f"!{REPLICAS}.some(r => r.startsWith({json.dumps(killed + ' ')}))",
            f"a replacement of {killed}",
        )
        third = _running(deployment)
        assert killed not in third and len(third) == 2
        browser.wait_for(_shows(set(third)), f"replicas {sorted(third)}")
        died = "document.querySelector('[data-event=\"dead\"]')?.innerText ?? ''"
        assert killed in browser.evaluate(died)
        if os.environ.get("SERVECORE_DASHBOARD_SCREENSHOT"):
            browser.screenshot(Path(os.environ["SERVECORE_DASHBOARD_SCREENSHOT"]))
    finally:
        browser.close()
