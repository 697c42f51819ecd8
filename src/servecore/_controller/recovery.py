"""Recovery: matching the state to the replicas the runtime really runs.

Once, as a controller opens (:meth:`Recovery.recover`): load the checkpoint, refuse one
whose replicas run on another runtime, open the runtime (with the store's identity and
lease epoch, so replicas are adopted only by a controller on the same store, and
ownership follows the lease), list the live replicas and step
:class:`~servecore.Recover` with them, adopting those still alive. Then every
``resync_interval_s`` (:meth:`Recovery.resync`): list them again and step
:class:`~servecore.Resync`, correcting whatever a lost event left behind.

Owned by one :class:`~servecore.Controller`, which passes in everything it needs (the
commit path, the effect runner, how to step down): it imports nothing of the controller.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from servecore._controller.committer import Committer
from servecore._controller.effects import EffectGroup, EffectRunner
from servecore._controller.replica_lifecycle import ReplicaLifecycle
from servecore._core.errors import RuntimeFenced, RuntimeMismatch, RuntimeUnresponsive
from servecore._core.records import RUNTIME_KEY, load_records, read_runtime, runtime_record
from servecore._core.transitions import Message, Recover, Resync, State, same_checkpoint
from servecore.runtimes import Runtime
from servecore.stores import Store

__all__ = ["Recovery"]

log = logging.getLogger("servecore.controller")

#: The commit path: step a message (or one built from the state), commit, dispatch.
Execute = Callable[[Message | Callable[[State], Message | None], EffectGroup], Awaitable[Any]]


class Recovery:
    """Recovery at open and the periodic resync of one controller (see the module)."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        runtime_name: str | None,
        namespace: str,
        store: Store,
        committer: Committer,
        effects: EffectRunner,
        lifecycle: ReplicaLifecycle,
        execute: Execute,
        on_fenced: Callable[[RuntimeFenced], None],
        stepped_down: Callable[[], bool],
        start_soon: Callable[..., Any],
        call_timeout_s: float,
    ) -> None:
        """``runtime_name`` is the runtime's registered name (``None``: not known);
        ``namespace`` the one the runtime keeps replicas under; ``execute`` the
        controller's commit path; ``on_fenced`` steps the controller down when the
        runtime refuses it; ``stepped_down()`` says whether it has; ``start_soon``
        starts a task in the controller's nursery; ``call_timeout_s`` bounds the
        runtime's ``open`` and ``list_replicas``."""
        self.runtime = runtime
        self.runtime_name = runtime_name
        self.namespace = namespace
        self.store = store
        self._committer = committer
        self._effects = effects
        self._lifecycle = lifecycle
        self._execute = execute
        self._on_fenced = on_fenced
        self._stepped_down = stepped_down
        self._start_soon = start_soon
        self.call_timeout_s = call_timeout_s
        self._where = committer.where

    # -- at open ------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Load the checkpoint, start the commit path, open the runtime and adopt the
        replicas still alive (``Recover``), waiting for its effects."""
        seq, records = await self._committer.call(self.store.load)
        state = load_records(seq, records, self._where)
        record_runtime = self._claim_runtime(read_runtime(records, self._where), state)
        self._committer.adopt_loaded(state, seq)
        if record_runtime:
            assert self.runtime_name is not None
            self._committer.pending_records[RUNTIME_KEY] = runtime_record(self.runtime_name)
            if seq > 0:
                # An existing checkpoint learns its runtime now, not at some later
                # command; a new one gets it with its first commit.
                await self._committer.commit_pending()
        self._start_soon(self._committer.serve)
        opener = getattr(self.runtime, "open", None)
        opened = False
        if opener is not None:
            with trio.move_on_after(self.call_timeout_s):
                await opener(
                    **_open_kwargs(
                        opener,
                        namespace=self.namespace,
                        report=self._effects.report,
                        store_id=_store_id(self.store),
                        epoch=_store_epoch(self.store),
                    )
                )
                opened = True
            if not opened:
                raise RuntimeUnresponsive(
                    repr(self.runtime), "open", self.call_timeout_s, "recovery"
                )
        live = await self.list_replicas("recovery")
        self._lifecycle.recovered(self._committer.state, live)
        group = EffectGroup()
        await self._execute(Recover(live=live), group)
        self._effects.adopted(live)
        await group.wait()

    def _claim_runtime(self, recorded: str | None, state: State) -> bool:
        """Refuse a checkpoint whose replicas run on another runtime (before any replica
        is touched); return whether the checkpoint should record this runtime."""
        given = self.runtime_name
        if given is None or recorded == given:
            return False
        # Threads replicas lived in the process of the controller that wrote the
        # checkpoint, and cannot outlive it: none is left to leak, so any runtime may
        # take over (Recover finds them dead and starts them again on it).
        if recorded is not None and recorded != "threads" and state.replicas:
            raise RuntimeMismatch(self._where, recorded, given, len(state.replicas))
        # No record (an older checkpoint), or no replica left to leak: this runtime's.
        return True

    # -- while it runs ----------------------------------------------------------------------

    async def resync(self) -> bool:
        """Compare the runtime's live replicas with the state now and correct the state;
        return whether anything changed. Does nothing once the controller stepped down."""
        if self._stepped_down():
            return False
        seq = self._committer.seq
        try:
            live = await self.list_replicas("a resync")
        except RuntimeUnresponsive as exc:
            log.warning("%s; this resync is skipped (the next one tries again)", exc)
            return False
        except RuntimeFenced as exc:
            self._on_fenced(exc)
            return False
        now = trio.current_time()

        listed = self._committer.state

        def message(state: State) -> Resync | None:
            # (Only what is checkpointed counts: load reports refresh observations all
            # the time, and must not keep a slow listing from ever being used.)
            if self._committer.seq != seq or not same_checkpoint(listed, state):
                return None  # the state moved while we listed: the next round decides
            return Resync(
                live=live, busy=self._effects.busy(), proven=self._effects.proven(state, now)
            )

        await self._execute(message, self._effects.background)
        return self._committer.seq != seq

    async def resync_forever(self, interval_s: float) -> None:
        """:meth:`resync` every ``interval_s``; a failed one is logged and tried again."""
        while True:
            await trio.sleep(interval_s)
            try:
                await self.resync()
            except Exception as exc:
                log.warning("resync with the runtime failed (next try in %gs): %r", interval_s, exc)

    async def list_replicas(self, during: str) -> frozenset[str]:
        """The runtime's live replicas, within ``call_timeout_s``; ``during`` names what
        asked, in the :class:`~servecore.RuntimeUnresponsive` raised otherwise."""
        with trio.move_on_after(self.call_timeout_s):
            return await self.runtime.list_replicas()
        raise RuntimeUnresponsive(repr(self.runtime), "list_replicas", self.call_timeout_s, during)


def _store_id(store: Store) -> str | None:
    """What identifies ``store`` to a runtime, so replicas are adopted only by a
    controller on the same store; ``None`` for a store that cannot say (nothing is
    checked then)."""
    found = getattr(store, "store_id", None)
    return found if isinstance(found, str) else None


def _store_epoch(store: Store) -> int | None:
    """The lease epoch ``store`` holds (a :class:`~servecore.PostgresStore`), passed to
    the runtime so that its ownership follows the lease; ``None`` without a lease."""
    found = getattr(store, "epoch", None)
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def _open_kwargs(opener: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keywords ``opener`` accepts: newer ones (``store_id``, ``epoch``) only if it takes them,
    so plugins written against an older protocol keep working."""
    try:
        params = inspect.signature(opener).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params or k in ("namespace", "report")}
