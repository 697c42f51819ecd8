"""servecore-mp: replicas as ``multiprocessing`` spawn processes (an example plugin).

Registered under the entry-point group ``servecore.runtimes`` as ``"mp"``::

    async with servecore.open_controller(runtime="mp") as ctl:
        ...
"""

from servecore_mp._runtime import MultiprocessingRuntime

__all__ = ["MultiprocessingRuntime"]
