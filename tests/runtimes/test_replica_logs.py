"""What subprocess replicas print reaches the host's logging, line by line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import servecore
from servecore.replica_logs import forward_replica_logs

pytestmark = pytest.mark.slow


async def test_replica_output_is_forwarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="servecore.replica")

    def lines() -> list[tuple[str, str]]:
        return [
            (r.replica, r.getMessage())  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "servecore.replica"
        ]

    async with (
        servecore.open_controller(
            "subprocess", runtime_options={"directory": str(tmp_path / "replicas")}
        ) as ctl,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(forward_replica_logs, ctl)
        try:
            await ctl.create_backend("chatty", "operate_targets:Chatty")
            await ctl.create_endpoint("chatty")
            await ctl.set_traffic("chatty", {"chatty": 1.0})
            assert await ctl.get_handle("chatty").call("x") == "x"
            with trio.fail_after(30):
                while ("chatty#0", "[chatty#0] serving x") not in lines():
                    await trio.sleep(0.05)
        finally:
            await ctl.delete_endpoint("chatty")
            await ctl.delete_backend("chatty")
            nursery.cancel_scope.cancel()
    assert ("chatty#0", "[chatty#0] loading weights") in lines()
