"""Stepping down on any store with a lease (here a memory store that can say it lost
one), through the synchronous facade: the same contract as on PostgreSQL
(tests/stores/test_postgres_step_down.py), without a database."""

from __future__ import annotations

import time

import pytest

import servecore
from servecore import LeaseLost, MemoryStore, SteppedDown
from servecore._serving.ops_http import healthz

ECHO = "servecore.testing.targets:Echo"


class LeasedMemoryStore(MemoryStore):
    """A memory store with the lease hooks a controller looks for."""

    lease_s = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.beats = 0
        self.loss: LeaseLost | None = None

    def heartbeat(self) -> None:
        self.beats += 1

    def lease_lost(self) -> LeaseLost | None:
        return self.loss


def test_a_synchronous_host_is_told_once_and_its_handles_refuse() -> None:
    store = LeasedMemoryStore()
    told: list[SteppedDown] = []
    with servecore.start(store=store, on_step_down=told.append) as ctl:
        ctl.create_backend("a", ECHO)
        ctl.create_endpoint("api")
        ctl.set_traffic("api", {"a": 1.0})
        handle = ctl.get_handle("api")
        assert handle.call("hi") == "hi"
        assert store.beats > 0 and ctl.stepped_down is None
        store.loss = LeaseLost("memory", "me", 1, "other", 2)
        deadline = time.monotonic() + 30
        while ctl.stepped_down is None and time.monotonic() < deadline:
            time.sleep(0.01)
        stepped = ctl.stepped_down
        assert stepped is not None and told == [stepped]
        assert stepped.lease_lost.new_holder == "other"
        with pytest.raises(SteppedDown):
            handle.call("hi")
        assert healthz(ctl.controller)[0] == 503
        with pytest.raises(LeaseLost, match="stepped down"):
            ctl.create_endpoint("late")
        assert "late" not in ctl.state.endpoints and ctl.resync() is False
    assert told == [stepped]


def test_on_step_down_must_be_callable() -> None:
    with pytest.raises(servecore.InvalidConfig, match="on_step_down"):
        servecore.start(on_step_down="exit")
