"""The plugin toolkit: how a runtime turns a ``StartReplica`` into code that serves.

Every runtime that runs user code in Python (the built-in threads, subprocess and Ray
runtimes, and third-party plugins) builds its replicas with these helpers, so that the
rules below hold the same everywhere::

    from servecore.runtimes import toolkit

    async def start_replica(self, effect):
        toolkit.check_runtime_options(effect, known={"cpus"}, runtime="my-runtime")
        replica = toolkit.build_replica(effect)    # import, construct, reconfigure
        ...                                         # keep it; later:
        results = replica.run(batch)                # one result per query, in order
        if replica.check_health is not None:
            replica.check_health()                  # raises if the replica is sick

What a built replica follows:

* **Loading.** ``effect.target`` is ``"package.module:attribute"`` (the attribute may be
  dotted); :func:`import_target` imports it. A class is constructed with
  ``init_args``/``init_kwargs``; a function is used as is and takes no init arguments
  (:func:`instantiate`). Async callables are refused: replicas call targets
  synchronously.
* **Batching.** A target marked with :func:`batch` receives a *list* (one element per
  query) and must return a list of the same length, in the same order
  (:class:`BatchSizeError` otherwise). A backend may set ``max_batch_size`` only for
  such a target (:func:`is_batch` tells); the router then groups queries that arrive
  within ``batch_wait_timeout_s`` of each other into one call. Each query to a batch
  target carries exactly one positional argument and no keywords
  (:func:`batch_argument`): ``handle.call({"text": "hi"})`` from three callers at once
  becomes one call ``target([{"text": "hi"}, ..., ...])``.
* **User config.** If the backend config sets ``user_config`` and the object has a
  ``reconfigure(user_config)`` method, it is called once, right after construction
  (:func:`apply_user_config`). A changed ``user_config`` rolls the backend onto new
  replicas, so a runtime never reconfigures a live one.
* **Health.** If the object has a ``check_health()`` method, the runtime calls it now
  and then (between queries, when idle; how often is the runtime's own option) and
  declares the replica dead, reporting ``ReplicaDied``, when it raises
  (:func:`find_health_check`).
* **Options.** ``BackendConfig.runtime_options`` is for the runtime; a runtime refuses
  keys it does not know (:func:`check_runtime_options`), naming them.

This module imports neither trio nor the controller, so a replica process pays only
for what it uses.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import attrs

from servecore._core.errors import InvalidConfig, ServecoreError
from servecore._core.transitions import StartReplica
from servecore.runtimes._protocol import Query

__all__ = [
    "BATCH_MARKER",
    "BatchSizeError",
    "ReplicaCode",
    "apply_user_config",
    "batch",
    "batch_argument",
    "build_replica",
    "check_runtime_options",
    "find_health_check",
    "import_target",
    "instantiate",
    "is_batch",
    "make_runner",
    "prepare_replica",
]

#: The attribute :func:`batch` sets on what it marks.
BATCH_MARKER = "__servecore_batch__"

T = TypeVar("T")


def batch(target: T) -> T:
    """Mark a function, a class, or a class's ``__call__`` as batch-capable.

    The object is returned *unchanged* apart from a marker attribute, so its
    ``__module__`` and ``__qualname__`` still name it and its import path resolves after
    a crash::

        @servecore.batch
        def shout(texts: list[str]) -> list[str]:
            return [t.upper() for t in texts]

        class Model:
            @servecore.batch
            def __call__(self, texts: list[str]) -> list[str]:
                return [len(t) for t in texts]

    The target receives a list with one element per query (each query's single
    positional argument) and must return a list of the same length, or every caller in
    the batch gets a :class:`BatchSizeError`.
    """
    try:
        setattr(target, BATCH_MARKER, True)
    except (AttributeError, TypeError) as exc:
        raise TypeError(
            f"@servecore.batch marks a function, a class or a method; {target!r} "
            f"cannot carry the marker ({exc})"
        ) from None
    return target


def is_batch(obj: Any) -> bool:
    """Whether ``obj`` (a function, a class, or an instance) was marked with :func:`batch`."""
    if getattr(obj, BATCH_MARKER, False) is True:
        return True
    # A marked __call__ lives on the class, whether we are given the class or an instance.
    owner = obj if isinstance(obj, type) else type(obj)
    call = inspect.getattr_static(owner, "__call__", None)
    return getattr(call, BATCH_MARKER, False) is True


class BatchSizeError(ServecoreError, TypeError):
    """A batch target returned something other than a list as long as its input."""

    def __init__(self, target: str, expected: int, got: Any) -> None:
        self.target = target
        self.expected = expected
        self.got = got
        what = f"a list of {len(got)}" if isinstance(got, list) else type(got).__name__
        super().__init__(
            f"batch target {target} was given {expected} queries and returned {what}; a "
            f"@servecore.batch target must return a list with one result per input, in order"
        )


def batch_argument(query: Query, where: str) -> Any:
    """The one positional argument a query to a batch target must carry.

    ``where`` names what batches (``"endpoint 'x'"``) for the ``TypeError`` message.
    """
    if len(query.args) != 1 or query.kwargs:
        raise TypeError(
            f"{where} batches its queries, so each call takes exactly one "
            f"positional argument and no keywords; got {len(query.args)} positional and "
            f"keywords {sorted(query.kwargs)}"
        )
    return query.args[0]


def import_target(path: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, _, attr = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        found = getattr(found, part)
    return found


def instantiate(target: Any, init_args: Sequence[Any], init_kwargs: dict[str, Any]) -> Any:
    """The replica object: ``target(*init_args, **init_kwargs)`` for a class, the
    function itself otherwise. Async callables are rejected (replicas run in threads)."""
    if isinstance(target, type):
        obj = target(*init_args, **init_kwargs)
        if not callable(obj):
            raise TypeError(f"{target.__qualname__} instances are not callable; define __call__")
        call = obj.__call__
    else:
        if not callable(target):
            raise TypeError(f"{target!r} is neither a class nor a function")
        if init_args or init_kwargs:
            raise TypeError(
                f"{getattr(target, '__qualname__', target)!r} is a function, so it takes no "
                f"init_args/init_kwargs; use a class to hold state"
            )
        obj = target
        call = target
    if inspect.iscoroutinefunction(call):
        raise TypeError(
            f"{getattr(call, '__qualname__', call)!r} is async; replicas call targets "
            f"synchronously, so define it with plain 'def'"
        )
    return obj


def make_runner(obj: Any, name: str) -> Callable[[Sequence[Query]], list[Any]]:
    """Return ``run(batch) -> results`` for a replica object.

    A plain target is called once per query with the query's own arguments. A batch
    target is called once with the list of each query's single argument, and its result
    is checked to be a list of the same length (:class:`BatchSizeError` otherwise).
    """
    if is_batch(obj):

        def run_batch(queries: Sequence[Query]) -> list[Any]:
            inputs = [batch_argument(q, f"batch target {name}") for q in queries]
            results = obj(inputs)
            if not isinstance(results, list) or len(results) != len(inputs):
                raise BatchSizeError(name, len(inputs), results)
            return results

        return run_batch

    def run_each(queries: Sequence[Query]) -> list[Any]:
        if len(queries) == 1:
            q = queries[0]
            return [obj(*q.args, **q.kwargs)]
        return [obj(*q.args, **q.kwargs) for q in queries]

    return run_each


def find_health_check(obj: Any) -> Callable[[], object] | None:
    """The replica object's ``check_health()`` method, or ``None`` if it has none.

    A runtime calls it now and then; when it raises, the replica is dead (report
    ``ReplicaDied`` with the error as the reason).
    """
    check = getattr(obj, "check_health", None)
    return check if callable(check) else None


def apply_user_config(obj: Any, user_config: Any) -> None:
    """Call ``obj.reconfigure(user_config)`` if a ``user_config`` is set and the object
    has that method (errors propagate: the start fails with the user's own error)."""
    reconfigure = getattr(obj, "reconfigure", None)
    if user_config is not None and callable(reconfigure):
        reconfigure(user_config)


def prepare_replica(
    target: str,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    *,
    backend: str,
    max_batch_size: int | None,
    user_config: Any,
) -> tuple[Callable[[Sequence[Query]], list[Any]], Callable[[], object] | None]:
    """Build a replica the way every Python runtime does: import and construct the
    target, refuse ``max_batch_size`` for a target not marked :func:`batch`, call
    ``reconfigure(user_config)`` if it has one, and return ``(run, check_health)``
    (``check_health`` is ``None`` when the object has none).

    The arguments are plain values, so a runtime may ship them to another process as
    they are; in-process, :func:`build_replica` takes the effect itself.
    """
    code = _build(target, init_args, init_kwargs, backend, max_batch_size, user_config)
    return code.run, code.check_health


@attrs.frozen(kw_only=True)
class ReplicaCode:
    """A built replica: the user's ``obj``, ``run(batch) -> results``, and its
    ``check_health`` (``None`` when the object has none)."""

    obj: Any
    run: Callable[[Sequence[Query]], list[Any]]
    check_health: Callable[[], object] | None


def build_replica(effect: StartReplica) -> ReplicaCode:
    """Import, construct and configure the replica ``effect`` asks for.

    Raises the user's own exception when the import or constructor fails,
    :class:`~servecore.InvalidConfig` for ``max_batch_size`` on a target not marked
    :func:`batch`, and ``TypeError`` for a target that cannot be a replica. Blocking:
    call it off the trio thread (``trio.to_thread.run_sync``) or in the replica's own
    process, never on the loop.
    """
    config = effect.config
    return _build(
        effect.target,
        effect.init_args,
        effect.init_kwargs,
        effect.backend,
        config.max_batch_size,
        config.user_config,
    )


def _build(
    target: str,
    init_args: Sequence[Any],
    init_kwargs: dict[str, Any],
    backend: str,
    max_batch_size: int | None,
    user_config: Any,
) -> ReplicaCode:
    obj = instantiate(import_target(target), init_args, init_kwargs)
    if max_batch_size is not None and not is_batch(obj):
        raise InvalidConfig(
            "max_batch_size",
            max_batch_size,
            f"target {target} is not marked @servecore.batch, so it cannot take batches; "
            f"mark it or leave max_batch_size unset",
            backend=backend,
        )
    apply_user_config(obj, user_config)
    return ReplicaCode(obj=obj, run=make_runner(obj, target), check_health=find_health_check(obj))


def check_runtime_options(effect: StartReplica, *, known: Collection[str], runtime: str) -> None:
    """Refuse ``runtime_options`` keys this runtime does not know, naming them.

    Raises :class:`~servecore.InvalidConfig` (field ``runtime_options``) listing the
    unknown keys and the known ones; call it first thing in ``start_replica``.
    """
    unknown = sorted(set(effect.config.runtime_options) - set(known))
    if unknown:
        raise InvalidConfig(
            "runtime_options",
            effect.config.runtime_options,
            f"the {runtime} runtime does not know {unknown} "
            f"(known: {sorted(known) or 'none'}); remove them",
            backend=effect.backend,
        )
