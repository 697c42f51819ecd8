"""The error hierarchy of servecore (docs/design.md §8).

Two families, as in h11 and h2: a :class:`CommandError` means *you asked for something
invalid* and the state is exactly as it was; every other :class:`ServecoreError` means
*the world failed* (a disk, a process, a network). Each error keeps the offending values
as attributes so that programs need not parse messages.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "BackendExists",
    "BackendInUse",
    "BackendNotFound",
    "BackendStartError",
    "BackpressureError",
    "CallCycle",
    "CallDepthExceeded",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointLocked",
    "CheckpointOutcomeUnknown",
    "CheckpointVersionError",
    "CommandError",
    "ControllerClosed",
    "DeadlineExceeded",
    "EndpointExists",
    "EndpointNotFound",
    "InvalidCommand",
    "InvalidConfig",
    "InvalidRoute",
    "InvalidRuntime",
    "InvalidRuntimeOption",
    "InvalidTarget",
    "InvalidTraffic",
    "LeaseLost",
    "NoReplicaError",
    "RemoteError",
    "ReplicaDiedError",
    "ReplicasUnreachable",
    "ResultDecodeError",
    "RouteConflict",
    "RuntimeDirectoryLocked",
    "RuntimeDirectoryStoreMismatch",
    "RuntimeDirectoryUnsafe",
    "RuntimeFenced",
    "RuntimeMismatch",
    "RuntimeUnresponsive",
    "ServecoreError",
    "StoreAccessDenied",
    "StoreLocked",
    "StoreUnresponsive",
    "StoreUnwritable",
    "StreamMismatch",
    "UnpicklableResult",
]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 120, 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8


def _shown(value: Any) -> str:
    """A bounded repr: an absurd value (a megabyte string, 5,000-deep nesting) is named
    by its start, never printed whole nor allowed to overflow the stack."""
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _restore(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ServecoreError(Exception):
    """Root of every error servecore raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickles (cls, args) and calls cls(*args), but our constructors
        # take the offending values, not the message: rebuild from args and attributes,
        # so errors cross process boundaries (subprocess, Ray) as themselves.
        return (_restore, (type(self), self.args, dict(self.__dict__)))


class CommandError(ServecoreError, ValueError):
    """The caller asked for something invalid; the state is unchanged."""


class EndpointExists(CommandError):
    """An endpoint of that name already exists with a different definition."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"endpoint {name!r} already exists with a different route, methods or "
            f"http_request; update_endpoint changes them in place, or "
            f"delete it first, or choose another name"
        )


class EndpointNotFound(CommandError):
    """The command names an endpoint that does not exist."""

    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        self.name = name
        self.known = known
        hint = f"known endpoints: {', '.join(map(repr, known))}" if known else "none exist yet"
        super().__init__(f"endpoint {name!r} does not exist ({hint}); create it first")


class RouteConflict(CommandError):
    """The HTTP route is already served by another endpoint."""

    def __init__(self, route: str, endpoint: str, owner: str) -> None:
        self.route = route
        self.endpoint = endpoint
        self.owner = owner
        super().__init__(
            f"route {route!r} for endpoint {endpoint!r} is already served by endpoint "
            f"{owner!r}; pick another route or delete {owner!r} first"
        )


class InvalidRoute(CommandError):
    """The route or the HTTP methods of an endpoint are malformed."""

    def __init__(self, endpoint: str, field: str, value: Any, why: str) -> None:
        self.endpoint = endpoint
        self.field = field
        self.value = value
        super().__init__(f"endpoint {endpoint!r}: {field}={_shown(value)} is invalid: {why}")


class BackendExists(CommandError):
    """A backend of that tag already exists with a different definition."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        super().__init__(
            f"backend {tag!r} already exists with a different target, arguments or config; "
            f"use set_backend_config to change its config, or delete it first"
        )


class BackendNotFound(CommandError):
    """The command names a backend that does not exist."""

    def __init__(self, tag: str, known: tuple[str, ...] = ()) -> None:
        self.tag = tag
        self.known = known
        hint = f"known backends: {', '.join(map(repr, known))}" if known else "none exist yet"
        super().__init__(f"backend {tag!r} does not exist ({hint}); create it first")


class BackendInUse(CommandError):
    """The backend still receives traffic or shadow traffic from an endpoint."""

    def __init__(self, tag: str, endpoints: tuple[str, ...]) -> None:
        self.tag = tag
        self.endpoints = endpoints
        names = ", ".join(map(repr, endpoints))
        super().__init__(
            f"backend {tag!r} is used by endpoint(s) {names} and cannot be deleted; "
            f"set its traffic weight and shadow proportion to 0 there first"
        )


class InvalidTraffic(CommandError):
    """Traffic weights or a shadow proportion are out of range."""

    def __init__(self, endpoint: str, value: Any, why: str) -> None:
        self.endpoint = endpoint
        self.value = value
        super().__init__(
            f"traffic for endpoint {endpoint!r} is invalid: {why} (got {_shown(value)})"
        )


class InvalidConfig(CommandError):
    """A backend config field (or argument) has a bad value."""

    def __init__(self, field: str, value: Any, why: str, backend: str | None = None) -> None:
        self.field = field
        self.value = value
        self.backend = backend
        where = f"backend {backend!r}: " if backend else ""
        super().__init__(f"{where}{field}={_shown(value)} is invalid: {why}")


class InvalidTarget(CommandError):
    """The target cannot be named by an import path that survives a crash, or cannot
    run on this controller's runtime (``fix`` then says what to do instead)."""

    def __init__(
        self, target: Any, why: str, backend: str | None = None, *, fix: str | None = None
    ) -> None:
        self.target = target
        self.backend = backend
        where = f"backend {backend!r}: " if backend else ""
        fix = fix or "pass 'package.module:attribute' naming a module-level class or function"
        super().__init__(f"{where}target {_shown(target)} is invalid: {why}; {fix}")


class InvalidCommand(CommandError, TypeError):
    """Something that is not a servecore command was submitted."""

    def __init__(self, value: Any) -> None:
        self.value = value
        super().__init__(
            f"{_shown(value)} is not a servecore command; pass one of CreateEndpoint, "
            f"DeleteEndpoint, CreateBackend, DeleteBackend, SetBackendConfig, UpdateBackend, "
            f"RetryBackend, SetTraffic, SetShadowTraffic"
        )


class CheckpointError(ServecoreError):
    """Committing to the checkpoint store failed. The message says exactly what was
    applied: for a command's own commit, nothing (the state is unchanged and no effect
    ran), and the same for every other command committed with it."""


class CheckpointCorrupt(ServecoreError):
    """A checkpoint exists but cannot be read (bad checksum, torn write, bad JSON)."""

    def __init__(self, where: str, why: str) -> None:
        self.where = where
        super().__init__(
            f"checkpoint at {where} is corrupt: {why}; restore it from a backup or move it "
            f"away to start empty (servecore never reads a corrupt checkpoint as empty)"
        )


class CheckpointVersionError(ServecoreError):
    """The checkpoint was written by a newer or unknown format version."""

    def __init__(self, where: str, found: Any, supported: int) -> None:
        self.where = where
        self.found = found
        self.supported = supported
        super().__init__(
            f"checkpoint at {where} has format version {found!r}, but this servecore reads "
            f"versions up to {supported}; upgrade servecore to read it"
        )


class CheckpointOutcomeUnknown(CheckpointError):
    """A write was sent to the store and its answer was lost (the connection broke), and
    the store could not find out whether it landed. The controller's state is as it was
    and no effect ran, but the checkpoint may hold the write: before its next commit
    the controller asks the store, and adopts the write and carries out its effects if
    it landed (``servecore.read_state`` shows the checkpoint meanwhile)."""

    def __init__(self, where: str, seq: int, reason: str) -> None:
        self.where = where
        self.seq = seq
        self.reason = reason
        super().__init__(
            f"the answer to writing checkpoint {seq} to {where} was lost ({reason}) and the "
            f"store could not say whether it landed; the controller asks the store before "
            f"its next commit and, if it landed, adopts it and carries out its effects then "
            f"(read the store with servecore.read_state to see it now)"
        )


class StoreUnresponsive(CheckpointOutcomeUnknown):
    """The checkpoint store did not answer a call (``call``: ``"load"``, or the commit
    of checkpoint ``seq``) within the controller's ``store_call_timeout_s``: a hung
    database, a stuck disk or network file system.

    The controller stopped waiting; the call itself may still be running in the store.
    A load that never answered opened nothing. For a commit, the state here is unchanged
    and no effect ran, but the commit may still land when the store answers: the
    controller then adopts it and carries out its effects (and a reopened controller
    would find it), so a command that raised this may yet be applied. Until the store
    answers, later commits wait for it (each at most ``store_call_timeout_s``), then
    fail without being sent."""

    def __init__(self, where: str, call: str, timeout_s: float, seq: int | None = None) -> None:
        self.where = where
        self.call = call
        self.timeout_s = timeout_s
        self.seq = seq if seq is not None else 0
        self.reason = f"no answer within {timeout_s:g}s"
        fix = (
            "check that the store answers (the database is up and not locked, the disk or "
            "network file system responds), or raise store_call_timeout_s in "
            "open_controller if it is only slow"
        )
        if seq is None:
            text = (
                f"the checkpoint store {where} did not answer {call}() within {timeout_s:g}s "
                f"(store_call_timeout_s): nothing was written; {fix}"
            )
        else:
            text = (
                f"the checkpoint store {where} did not answer {call} of checkpoint {seq} "
                f"within {timeout_s:g}s (store_call_timeout_s): the state here is unchanged "
                f"and no effect ran, but the commit may still land when the store answers, "
                f"and this controller then adopts it and carries out its effects "
                f"(servecore.read_state shows the checkpoint); {fix}"
            )
        CheckpointError.__init__(self, text)


class LeaseLost(CheckpointError):
    """This controller's lease on its store was taken over by another holder, so the
    store refuses its writes (fencing): the refused write wrote nothing, and no write
    through this store object ever will again. ``outcome`` says what that means for
    the command or event whose write it was (set by the controller, which knows)."""

    def __init__(
        self,
        where: str,
        holder: str,
        epoch: int,
        new_holder: str | None,
        new_epoch: int,
        outcome: str = "",
        *,
        expired: bool = False,
    ) -> None:
        self.where = where
        self.holder = holder
        self.epoch = epoch
        self.new_holder = new_holder
        self.new_epoch = new_epoch
        #: True when the lease was not renewed before it expired (the holder's own loop
        #: stalled, or the database was out of reach), whoever holds it now.
        self.expired = expired
        self.outcome = outcome or "the write was refused: nothing was written"
        if expired:
            now = (
                "it was not renewed before it expired (this controller's loop was blocked, "
                "or the database out of reach, for longer than the lease), so another "
                "controller may hold it now"
            )
        elif new_holder is not None:
            now = f"now {new_holder!r} holds it at epoch {new_epoch}"
        else:
            now = f"now it was released at epoch {new_epoch}"
        super().__init__(
            f"lost the lease on checkpoint store {where}: {holder!r} held epoch {epoch}, and "
            f"{now}; {self.outcome}; close this controller (the one holding the lease "
            f"serves now)"
        )

    def with_outcome(self, outcome: str) -> LeaseLost:
        """The same loss, saying what it means for one command or event."""
        return LeaseLost(
            self.where,
            self.holder,
            self.epoch,
            self.new_holder,
            self.new_epoch,
            outcome,
            expired=self.expired,
        )


class SteppedDown(ServecoreError):
    """This controller lost its lease to another (or could not renew it before it
    expired) and stepped down: it orders no more effects, and its handles and HTTP
    ingress refuse queries rather than route them by a table that may be stale.
    ``lease_lost`` is the loss that made it step down."""

    def __init__(self, lease_lost: LeaseLost) -> None:
        self.lease_lost = lease_lost
        self.where = lease_lost.where
        super().__init__(
            f"this controller lost its lease on checkpoint store {lease_lost.where} to "
            f"another and stepped down, so it serves no queries ({lease_lost.holder!r}, "
            f"epoch {lease_lost.epoch}{': not renewed in time' if lease_lost.expired else ''}"
            f"); send queries to the controller that holds the lease now, and close this "
            f"one"
        )


class StoreLocked(ServecoreError):
    """Another controller (or another process: a backup tool, a database shell) holds
    this store; the checkpoint itself is intact."""

    def __init__(self, where: str, detail: str = "", *, by: str = "", way_out: str = "") -> None:
        self.where = where
        self.detail = detail
        self.by = by or "another controller"
        held = f" ({detail})" if detail else ""
        way_out = way_out or (
            "close that controller first (two controllers on one store would split the brain)"
        )
        super().__init__(f"checkpoint store {where} is held by {self.by}{held}; {way_out}")


class CheckpointLocked(CheckpointError, StoreLocked):
    """A commit met a lock another process holds on the store (a backup tool, a
    ``sqlite3`` shell) and gave up after waiting for it. Nothing was written: the
    checkpoint is intact, and the same commit may be retried once the lock is gone (the
    controller retries events itself). Both a :class:`CheckpointError` (the save
    failed) and a :class:`StoreLocked` (a lock, not corruption)."""

    def __init__(self, where: str, detail: str, *, outcome: str = "nothing was written") -> None:
        self.where = where
        self.detail = detail
        self.by = "another process's lock on the store"
        self.outcome = outcome
        ServecoreError.__init__(
            self,
            f"checkpoint store {where} was locked by another process (a backup tool, a "
            f"sqlite3 shell) during a commit ({detail}); {outcome}; the checkpoint is "
            f"intact, not corrupt: let that process finish, then retry",
        )

    def with_outcome(self, outcome: str) -> CheckpointLocked:
        """The same lock, saying what it means for one command or event."""
        return CheckpointLocked(self.where, self.detail, outcome=outcome)


class StoreAccessDenied(CheckpointError):
    """The database refused this client for good (a wrong password, an unknown user or
    database): waiting or retrying cannot help. Nothing was read or written."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(
            f"checkpoint store {where} refused this client: {reason}; check the user, "
            f"password and database of the DSN (the password is never shown); nothing "
            f"was read or written"
        )


class StoreUnwritable(CheckpointError):
    """The store's files cannot be created or opened where it was told to keep them (a
    directory that cannot be written, a path under a regular file). Nothing was read or
    written."""

    def __init__(self, where: str, path: str, reason: str) -> None:
        self.where = where
        self.path = path
        self.reason = reason
        super().__init__(
            f"checkpoint store {where} cannot use {path}: {reason}; nothing was read or "
            f"written; make that directory exist and writable by this user, or give the "
            f"store another path"
        )


class BackendStartError(ServecoreError):
    """A backend's replicas could not start; the backend stays registered as FAILED."""

    def __init__(self, tag: str, reason: str) -> None:
        self.tag = tag
        self.reason = reason
        super().__init__(
            f"backend {tag!r} could not start its replicas: {reason}; fix the code, then "
            f"retry_backend({tag!r}) to start again with the same config, change its "
            f"config, or delete the backend"
        )


class ReplicaDiedError(ServecoreError):
    """The replica serving a query died before answering."""

    def __init__(self, tag: str, reason: str = "") -> None:
        self.tag = tag
        self.reason = reason
        super().__init__(f"replica {tag!r} died while serving the query: {reason or 'unknown'}")


class StreamMismatch(ServecoreError, TypeError):
    """A query asked for one answer from a target that streams (a generator), or for a
    stream from a target that answers once. ``streams`` says which the target is."""

    def __init__(self, target: str, streams: bool) -> None:
        self.target = target
        self.streams = streams
        if streams:
            why = (
                f"target {target} is a generator: it streams its answer item by item; "
                f"iterate handle.stream(...) instead of handle.call(...)"
            )
        else:
            why = (
                f"target {target} answers each query with one value, not a stream; use "
                f"handle.call(...), or make it a generator to stream"
            )
        super().__init__(why)

    def __reduce__(self) -> Any:
        return (type(self), (self.target, self.streams))


class BackpressureError(ServecoreError):
    """Too many queries are already waiting for a backend's replicas."""

    def __init__(self, backend: str, queued: int, limit: int) -> None:
        self.backend = backend
        self.queued = queued
        self.limit = limit
        super().__init__(
            f"backend {backend!r} has {queued} queries waiting (limit {limit}); retry later, "
            f"add replicas or raise max_concurrent_queries"
        )


class NoReplicaError(ServecoreError):
    """An endpoint has no traffic or no running replica to serve a query."""

    def __init__(self, endpoint: str, why: str) -> None:
        self.endpoint = endpoint
        super().__init__(f"endpoint {endpoint!r} cannot serve the query: {why}")


class RuntimeDirectoryLocked(ServecoreError):
    """Another open runtime (another controller) owns this runtime directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        super().__init__(
            f"runtime directory {directory} is in use by another controller; give each "
            f"controller its own directory= (or controller name), or close the other one"
        )


class RuntimeDirectoryStoreMismatch(RuntimeDirectoryLocked):
    """The runtime directory's live replicas belong to a controller on another store."""

    def __init__(self, directory: str, recorded_store: str, store: str) -> None:
        self.directory = directory
        self.recorded_store = recorded_store
        self.store = store
        ServecoreError.__init__(
            self,
            f"runtime directory {directory} holds live replicas of the controller on store "
            f"{recorded_store!r}, not of this one on store {store!r}; give this controller "
            f"its own name= (or directory=), or stop those replicas from a controller on "
            f"{recorded_store!r}. If that store is gone for good, delete "
            f"{directory}/.store and this controller adopts them (and stops those it does "
            f"not know)",
        )


class RuntimeDirectoryUnsafe(ServecoreError):
    """The runtime directory could be read or written by another user."""

    def __init__(self, directory: str, why: str) -> None:
        self.directory = directory
        self.why = why
        super().__init__(
            f"runtime directory {directory} is unsafe: {why}; remove it (another user may "
            f"have created it first) or choose another with directory= or XDG_RUNTIME_DIR"
        )


class RuntimeFenced(ServecoreError):
    """A newer leader of the same store took this runtime over: the runtime carries out
    no more starts, stops, kills or adoptions for this controller (fencing reaches the
    runtime as it reaches the store). ``epoch`` is this controller's lease epoch,
    ``newer_epoch`` the one that owns the runtime now."""

    def __init__(self, where: str, store_id: str, epoch: int, newer_epoch: int) -> None:
        self.where = where
        self.store_id = store_id
        self.epoch = epoch
        self.newer_epoch = newer_epoch
        super().__init__(
            f"runtime {where} was taken over by the controller holding epoch {newer_epoch} "
            f"of store {store_id!r}, and this one holds epoch {epoch}: it starts, stops, "
            f"kills and adopts nothing any more; close this controller (the one holding "
            f"the lease owns the replicas now)"
        )


class RuntimeUnresponsive(ServecoreError):
    """A call to the runtime (``call``: ``list_replicas``, ``open``, ``stop_replica``)
    did not return within the controller's ``runtime_call_timeout_s``, or a runtime's
    own call to what it runs on (``setting`` names the deadline that ran out)."""

    def __init__(
        self,
        runtime: str,
        call: str,
        timeout_s: float,
        during: str = "",
        *,
        setting: str = "runtime_call_timeout_s",
        set_in: str = "open_controller",
    ) -> None:
        self.runtime = runtime
        self.call = call
        self.timeout_s = timeout_s
        when = f" during {during}" if during else ""
        super().__init__(
            f"runtime {runtime} did not answer {call}() within {timeout_s:g}s{when} "
            f"({setting}); check that what it runs on is reachable (a lost "
            f"node, a hung cluster), or raise {setting} in {set_in} "
            f"if it is only slow"
        )


class RuntimeMismatch(CommandError):
    """The checkpoint was written by controllers of another runtime.

    Opening it with this runtime would not find the recorded runtime's replicas (so
    they would be started again and the old ones leaked), so nothing is opened: no
    replica was started, stopped or adopted, and the checkpoint is as it was.
    ``recorded`` is the runtime the checkpoint names, ``given`` the one asked for.
    """

    def __init__(self, where: str, recorded: str, given: str, replicas: int) -> None:
        self.where = where
        self.recorded = recorded
        self.given = given
        self.replicas = replicas
        super().__init__(
            f"the checkpoint {where} was written with runtime {recorded!r} and records "
            f"{replicas} replica(s) of it, so it cannot be opened with runtime {given!r} "
            f"(the {recorded} replicas would not be found, and would be started again "
            f"beside the old ones); nothing was started or stopped. Open it with runtime "
            f"{recorded!r} (servecore run --runtime {recorded}), or, to switch runtimes, "
            f"first delete its backends with runtime {recorded!r} so that none of its "
            f"replicas is left running"
        )


class RemoteError(ServecoreError):
    """A replica raised an exception whose type cannot be rebuilt on the caller's side."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}" if message else type_name)


class ResultDecodeError(ServecoreError):
    """What a replica sent back cannot be turned into a value on the caller's side.

    The replica ran the query; its answer did not survive the trip: its class cannot be
    imported where the caller runs, rebuilding it raised, or (:class:`UnpicklableResult`)
    the replica could not encode it at all. Never the user's own exception: that comes
    back as its own type.
    """

    def __init__(self, tag: str, type_name: str, reason: str, *, runtime: str = "") -> None:
        self.tag = tag
        self.backend = tag.rsplit("#", 1)[0]
        self.type_name = type_name
        self.reason = reason
        self.runtime = runtime
        where = f" ({runtime} runtime)" if runtime else ""
        super().__init__(
            f"replica {tag!r} of backend {self.backend!r}{where} sent back a result of type "
            f"{type_name} that the caller cannot decode: {reason}; return plain data (or "
            f"instances of classes importable in the caller's process, whose pickling works)"
        )


class UnpicklableResult(ResultDecodeError, TypeError):
    """A replica's result cannot be encoded to travel back (pickle refused it)."""

    def __init__(self, tag: str, type_name: str, reason: str, *, runtime: str = "") -> None:
        super().__init__(tag, type_name, reason, runtime=runtime)
        self.args = (
            f"replica {tag!r} of backend {self.backend!r}"
            f"{f' ({runtime} runtime)' if runtime else ''} cannot send its result back: a "
            f"{type_name} cannot be pickled ({reason}); return plain data, or give the "
            f"class a __reduce__",
        )


class ControllerClosed(ServecoreError, RuntimeError):
    """The controller closed (or is closing) before this call could complete.

    Also a ``RuntimeError``, which it was before it had a type of its own.
    """

    def __init__(self, what: str = "the call") -> None:
        self.what = what
        super().__init__(
            f"the servecore controller is closed: {what} did not complete; open a new "
            f"controller (servecore.open_controller or servecore.start) to go on"
        )


class InvalidRuntimeOption(ServecoreError, TypeError):
    """A runtime chosen by name was given a constructor keyword it does not take."""

    def __init__(self, runtime: str, bad: tuple[str, ...], accepted: tuple[str, ...]) -> None:
        self.runtime = runtime
        self.bad = bad
        self.accepted = accepted
        takes = ", ".join(accepted) if accepted else "no keywords"
        super().__init__(
            f"runtime {runtime!r} takes no constructor keyword {', '.join(map(repr, bad))}; "
            f"it accepts: {takes} (per-backend options go in BackendConfig.runtime_options)"
        )


class InvalidRuntime(ServecoreError, TypeError):
    """An object given as a runtime lacks methods the Runtime protocol requires."""

    def __init__(self, runtime: str, missing: tuple[str, ...]) -> None:
        self.runtime = runtime
        self.missing = missing
        super().__init__(
            f"{runtime} is not a servecore runtime: it has no {', '.join(missing)}; a "
            f"runtime needs start_replica, stop_replica, list_replicas and call (open and "
            f"close are optional), see docs/plugins.md"
        )


class ReplicasUnreachable(ServecoreError):
    """``servecore.connect`` found a controller whose replicas another process cannot
    reach: they run inside the controller's own process (the threads runtime)."""

    def __init__(self, where: str, runtime: str) -> None:
        self.where = where
        self.runtime = runtime
        super().__init__(
            f"the servecore controller at {where} runs its replicas on the {runtime!r} "
            f"runtime, inside its own process, so they cannot be reached from another "
            f"process; run it with --runtime subprocess or --runtime ray to connect to it, or "
            f"send queries through its HTTP ingress"
        )


class CallCycle(ServecoreError):
    """Replica code called an endpoint whose backend is already on its call chain:
    waiting for it could take the last slot the chain itself holds (a deadlock)."""

    def __init__(self, endpoint: str, backend: str, chain: tuple[str, ...]) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.chain = tuple(chain)
        super().__init__(
            f"calling endpoint {endpoint!r} would cycle: it routes to backend {backend!r}, "
            f"already on the call chain {' -> '.join(self.chain)}; a nested call must not "
            f"come back to a backend that is waiting for it (restructure the calls, or "
            f"serve the inner step from a backend of its own)"
        )


class CallDepthExceeded(ServecoreError):
    """Replica code called an endpoint from a call chain already at the depth limit."""

    def __init__(self, endpoint: str, chain: tuple[str, ...], limit: int) -> None:
        self.endpoint = endpoint
        self.chain = tuple(chain)
        self.limit = limit
        super().__init__(
            f"calling endpoint {endpoint!r} from the call chain {' -> '.join(self.chain)} "
            f"would nest {len(self.chain) + 1} replicas deep, past the limit of {limit}; "
            f"flatten the calls"
        )


class DeadlineExceeded(ServecoreError, TimeoutError):
    """A query reached the front of a queue (the router's or its replica's) after its
    deadline had passed, so it was dropped without running: its caller had stopped
    waiting for it by then."""

    def __init__(self, where: str, late_s: float) -> None:
        self.where = where
        self.late_s = late_s
        super().__init__(
            f"a query was dropped without running: its deadline passed {late_s:.3f}s "
            f"before {where} could begin it; give the caller a longer timeout_s, or add "
            f"replicas (or max_concurrent_queries) so that queries wait less"
        )
