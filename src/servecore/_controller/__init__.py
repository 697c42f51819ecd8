"""The trio shell around the pure core: it commits first, then carries effects out.

As dask's ``BaseWorker`` drives its pure ``WorkerState``, the controller feeds commands
and runtime events to :func:`servecore._core.transitions.step` and executes what comes
out. Each job has its own module:

``controller``    the command API, recovery and resync (``Controller``, ``open_controller``)
``effects``       the effect runner: starts, stops, retries, and what is in flight
``committer``     step, then the change set, then a group commit on a writer thread
``autoscaler``    periodic scaling decisions from sampled load (dependencies passed in)
``load_sampler``  the load samples the autoscaler reads
``lifecycle``     replica lifecycle events and their counts, owned by one controller
``status``        the read-only status of a running or stopped controller
``read_state``    reading a checkpoint without taking its lock
``standby``       waiting for a store's lease
``sync``          the synchronous facade (``servecore.start``)
"""
