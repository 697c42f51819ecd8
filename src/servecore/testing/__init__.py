"""Test kit for hosts, runtime authors and store authors (DESIGN §7).

Like ``trio.testing`` and ``zarr.testing``, this is a public promise: the fakes, the
Hypothesis strategies and the crash-consistency checks here are what servecore's own
tests use, and anyone can run them against their own runtime or store.
"""

from servecore.testing._faults import CrashPlan, SimulatedCrash
from servecore.testing._runtime import InMemoryRuntime
from servecore.testing._store import FaultyStore, StoreFault

__all__ = [
    "CrashPlan",
    "FaultyStore",
    "InMemoryRuntime",
    "SimulatedCrash",
    "StoreFault",
]
