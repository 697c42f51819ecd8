"""The ``ray`` runtime: each replica is a named, detached Ray actor (docs/design.md §6).

Ray is an optional extra (``pip install 'servecore[ray]'``) and this package is the only
place that imports it; ``import servecore`` never does::

    runtime = RayRuntime(address="auto")  # or "host:port" of the GCS, or "ray://..."
    store = servecore.SQLiteStore("state.db")
    async with servecore.open_controller(runtime=runtime, store=store) as ctl:
        await ctl.create_backend("echo", "myapp.models:Echo", num_replicas=2,
                                 runtime_options={"num_cpus": 0.5})

How replicas map onto Ray
    A replica is an actor named by its tag (``"echo#3"``) in the Ray namespace of the
    controller (its ``name``, or the runtime's ``namespace=`` override), created with
    ``lifetime="detached"`` so it outlives the controller's process, and with
    ``max_restarts=0``: an actor that dies stays dead, and the controller replaces it
    under a new tag. Starting is get-or-create by name (``get_if_exists=True``), then a
    ``ready()`` call that imports the target and builds the replica object; a failure
    there is raised as the user's own exception, and the broken actor is killed.

    A replica serves one batch at a time, in arrival order, like the threads and
    subprocess runtimes (the same ``servecore.runtimes.toolkit`` rules: ``@servecore.batch``
    targets, ``reconfigure(user_config)``). An ``async def`` target runs on an asyncio
    loop of the replica's own, up to ``max_concurrent_queries`` queries at once, and a
    caller that gives up cancels its task there. Four more
    threads per actor (the ``control`` concurrency group) serve the runtime's own calls
    (``ready``, ``watch``, the health probe), so a busy replica can still be watched,
    probed and adopted.

Finding replicas again
    :meth:`RayRuntime.list_replicas` reads Ray's named-actor listing for this namespace
    only, keeps the names that look like replica tags, and checks that each one is (or
    becomes) ready, so a controller that crashed mid-start finds exactly the replicas
    that can serve.

Deaths
    For each replica the runtime keeps one long-running ``watch()`` call in flight
    (renewed every ``health_check_period_s``); Ray fails it the moment the actor dies,
    and the death is reported as :class:`~servecore.ReplicaDied` at once -- not only
    when a query fails. A watch that fails otherwise (``ActorUnavailableError``: an
    unreachable node) is confirmed first: the replica is pinged until it answers or
    its backend's ``health_check_timeout_s`` passes. Every ``health_check_period_s`` of
    its backend the runtime probes each replica on its control threads; one that does
    not answer within ``health_check_timeout_s`` (frozen, hung, unreachable) is killed
    and reported dead. Calls in flight on a dead actor raise
    :class:`~servecore.ReplicaDiedError`. As in Ray Serve (and the threads runtime), a
    replica object with a ``check_health()`` method has it called every
    ``health_check_period_s`` of the runtime, between batches; if it raises, or does
    not return within ``health_check_timeout_s`` of beginning, the replica is killed
    and reported dead.

High availability
    Opened with a store's lease epoch, the runtime records it in the cluster (Ray's
    internal key-value store) and refuses, once a newer epoch of the same store is
    there, to start, stop, kill or adopt anything (:class:`~servecore.RuntimeFenced`).
    The node of a replica lost for not answering is avoided by its replacement for a
    while (a preference, never a refusal). Each control call to Ray has a deadline,
    ``call_timeout_s``.

Calls
    A batch is one Ray actor call. Its result is delivered into trio by a completion
    callback on the object reference (on a Ray thread): a lone call is woken through a
    pooled event file descriptor, and while calls overlap, results that arrive together
    are handed to trio with one ``run_sync_soon``. No thread per call, no polling. The
    replica pickles the batch's results itself and the caller unpickles them on the trio
    thread, so a result that cannot be rebuilt (even one raising ``SystemExit``) is a
    :class:`~servecore.ResultDecodeError` for that call, and one that cannot be pickled
    an :class:`~servecore.UnpicklableResult` naming its type. A user exception is raised
    as its own type (rebuilt even when its constructor takes other arguments than its
    ``args``), with the replica's traceback as a note. Each query's deadline goes along
    (``servecore.time_remaining()`` in replica code); a batch late when its turn comes
    in the actor is dropped unrun (:class:`~servecore.DeadlineExceeded`).

Streams and clients
    A generator target streams (``RayRuntime.stream``): the actor produces against
    credit and the caller pulls what it produced in chunks
    (:mod:`~servecore.runtimes.ray.calls`). A ``servecore.connect`` client of a Ray
    controller calls the actors itself (:mod:`~servecore.runtimes.ray.client`), and so
    does replica code calling other endpoints (``servecore.get_handle``).

Targets are imported by the Ray workers, so they must be importable there: installed
in the workers' environment, or shipped with a ``runtime_env``. By default Ray puts the
driver's working directory and script directory on the workers' path.

``runtime_options`` (per backend) are Ray actor options: :data:`RUNTIME_OPTIONS`
(``num_cpus``, ``num_gpus``, ``memory``, ``resources``, ``accelerator_type``,
``runtime_env``, ``scheduling_strategy``, ``label_selector``). Any other key makes the
start fail with :class:`~servecore.InvalidConfig` naming it and the known ones.

:class:`LocalRayCluster` starts a private Ray head on loopback (a free port, a
temporary directory) and stops exactly the processes it started -- for tests,
benchmarks and demos; its ``add_node()`` joins a worker node (a raylet of its own, a
:class:`LocalRayNode`) on the same machine, for tests of node loss.

Where things live: :mod:`~servecore.runtimes.ray.runtime` (the controller's side),
:mod:`~servecore.runtimes.ray.actor` (the replica actor, in the Ray workers),
:mod:`~servecore.runtimes.ray.watch` (deaths, health probes and health checks),
:mod:`~servecore.runtimes.ray.fence` (the lease epoch, kept in the cluster),
:mod:`~servecore.runtimes.ray.placement` (avoiding nodes just lost),
:mod:`~servecore.runtimes.ray.calls` (the caller's half of the actor protocol),
:mod:`~servecore.runtimes.ray.client` (the client-side runtime of ``servecore.connect``),
:mod:`~servecore.runtimes.ray.results` (Ray results into trio),
:mod:`~servecore.runtimes.ray.errors` (exceptions on their way home),
:mod:`~servecore.runtimes.ray.options` (actor options),
:mod:`~servecore.runtimes.ray.connection` (the driver's connection to Ray),
:mod:`~servecore.runtimes.ray.local_cluster` (:class:`LocalRayCluster`, :class:`LocalRayNode`),
:mod:`~servecore.runtimes.ray._ray_start` (``ray start`` of a loopback worker node).
"""

# Ray first, so that a missing Ray fails here even if submodules are already imported.
import ray  # noqa: F401

from servecore.runtimes.ray.local_cluster import LocalRayCluster, LocalRayNode
from servecore.runtimes.ray.options import RUNTIME_OPTIONS, actor_options
from servecore.runtimes.ray.runtime import RayRuntime

__all__ = ["RUNTIME_OPTIONS", "LocalRayCluster", "LocalRayNode", "RayRuntime", "actor_options"]
