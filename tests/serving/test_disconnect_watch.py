"""An asyncio ingress's request cancels its query when its client leaves, and only
then: no watcher for a request answered at once, a server's own cancellation kept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from servecore._serving.disconnect_watch import GONE, WATCH_AFTER_S, DisconnectWatches


class _Client:
    """An ASGI ``receive`` whose next message is the disconnect, once ``leave()``."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.reads = 0

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        await self.left.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left.set()


def test_a_request_answered_at_once_starts_no_watcher() -> None:
    async def main() -> None:
        watches = DisconnectWatches(asyncio.get_running_loop())
        client = _Client()

        async def answer(x: int) -> int:
            return x + 1

        before = len(asyncio.all_tasks())
        assert await watches.unless_gone(client.receive, answer, 1) == 2
        await asyncio.sleep(3 * WATCH_AFTER_S)
        assert client.reads == 0  # nobody read its connection
        assert len(asyncio.all_tasks()) == before

    asyncio.run(main())


def test_a_client_that_leaves_a_slow_request_cancels_its_query() -> None:
    async def main() -> None:
        watches = DisconnectWatches(asyncio.get_running_loop())
        client = _Client()
        cancelled = asyncio.Event()

        async def slow(x: int) -> int:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return x

        request = asyncio.ensure_future(watches.unless_gone(client.receive, slow, 1))
        await asyncio.sleep(3 * WATCH_AFTER_S)  # long enough to be watched
        assert client.reads == 1
        client.leave()
        assert await asyncio.wait_for(request, 10) is GONE
        assert cancelled.is_set()
        assert not request.cancelled()

    asyncio.run(main())


def test_a_server_that_cancels_a_request_is_not_told_gone() -> None:
    async def main() -> None:
        watches = DisconnectWatches(asyncio.get_running_loop())
        client = _Client()

        async def slow(x: int) -> int:
            await asyncio.sleep(60)
            return x

        request = asyncio.ensure_future(watches.unless_gone(client.receive, slow, 1))
        await asyncio.sleep(3 * WATCH_AFTER_S)
        request.cancel()  # a server shutting down, say
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0)
        # Its watcher went with it.
        assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()

    asyncio.run(main())


def test_a_server_cancel_beside_a_disconnect_still_cancels() -> None:
    async def main() -> None:
        watches = DisconnectWatches(asyncio.get_running_loop())
        client = _Client()
        entered = asyncio.Event()

        async def slow(x: int) -> int:
            entered.set()
            try:
                await asyncio.sleep(60)
            finally:
                # Both arrive before the query sees either.
                request.cancel()
            return x

        request = asyncio.ensure_future(watches.unless_gone(client.receive, slow, 1))
        await asyncio.sleep(3 * WATCH_AFTER_S)
        client.leave()
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(main())
