"""Test kit for hosts, runtime authors and store authors (docs/design.md §7).

Like ``trio.testing`` and ``zarr.testing``, this is a public promise: the fakes, the
Hypothesis strategies and the crash-consistency checks here are what servecore's own
tests use, and anyone can run them against their own runtime or store:

* :class:`InMemoryRuntime` — a deterministic runtime whose replicas outlive a simulated
  controller crash, with fault injection (fail starts, kill replicas);
* :class:`FaultyStore` — fails, tears or crashes commits;
* :class:`LeasedMemoryStore` and :meth:`InMemoryRuntime.view` — *the old leader wakes
  up*: a standby takes the lease and the runtime over from a leader that was only
  paused, whose late effects the runtime must then refuse;
* :class:`HangingStore` and :func:`check_store_hangs` — *the database hangs*: chosen
  store calls block until released (or a real medium is frozen), and every call of a
  script is hung in turn to check that commands fail typed and in time, that the
  store is free again once it answers, and that nothing acknowledged is lost;
* :class:`InjectedFailure` — the error of an injected start failure (any other start
  failure fails the crash checks);
* :class:`CrashPlan` / :class:`SimulatedCrash` — numbered crash points before, midway
  through (part of the change set written) and after every commit, and before and
  after every start and stop;
* :class:`CrashWorld`, :func:`enumerate_crashes` — crash at *every* point of a script;
* :class:`CrashConsistencyMachine` — the Hypothesis stateful machine checking the five
  properties against a :class:`ReferenceModel`;
* :func:`check_runtime` — conformance checks for any runtime;
* :func:`check_store_holds` — a store gives back exactly the bytes it was given;
* :mod:`servecore.testing.strategies` — Hypothesis strategies for commands and events.

It needs Hypothesis and pytest, which a production install does not: install the
``testing`` extra, ``pip install 'servecore[testing]'``. A runtime author's guide is in
docs/plugins.md.
"""

# First, so that a missing dependency says which extra to install.
import servecore.testing._requires  # noqa: F401
from servecore.testing._conformance import check_runtime
from servecore.testing._crash import (
    CrashingRuntime,
    CrashWorld,
    Kill,
    Outcome,
    Together,
    check_all_or_nothing,
    check_store_holds,
    corrupt,
    enumerate_crashes,
    restore,
)
from servecore.testing._faults import CrashPlan, InjectedFailure, SimulatedCrash
from servecore.testing._group import check_some_order
from servecore.testing._hang import HangingStore
from servecore.testing._hang_check import HANG_SCRIPT, check_store_hangs
from servecore.testing._lease import LeasedMemoryStore
from servecore.testing._machine import CrashConsistencyMachine
from servecore.testing._model import ReferenceModel, desired
from servecore.testing._runtime import InMemoryRuntime
from servecore.testing._store import FaultyStore, StoreFault

__all__ = [
    "HANG_SCRIPT",
    "CrashConsistencyMachine",
    "CrashPlan",
    "CrashWorld",
    "CrashingRuntime",
    "FaultyStore",
    "HangingStore",
    "InMemoryRuntime",
    "InjectedFailure",
    "Kill",
    "LeasedMemoryStore",
    "Outcome",
    "ReferenceModel",
    "SimulatedCrash",
    "StoreFault",
    "Together",
    "check_all_or_nothing",
    "check_runtime",
    "check_some_order",
    "check_store_hangs",
    "check_store_holds",
    "corrupt",
    "desired",
    "enumerate_crashes",
    "restore",
]
