"""The pure core of servecore: values, messages, the transition function and its records.

Rules of this package, in the manner of h11's ``_state.py`` (each module restates the
ones that concern it):

* No I/O, no clock, no randomness, and no import of trio, the controller, the stores,
  the router or the runtimes. ``tests/core/test_layering.py`` walks this directory and
  holds every module in it to that rule, so a new module cannot slip past a list.
* Commands and events go in through :func:`servecore._core.transitions.step`; a new
  :class:`~servecore._core.state.State` and effects (plain values) come out. The
  shell (``servecore._controller``) commits the change set and then carries the effects out.

The modules, from the bottom up:

``errors``       the two error families (a command was invalid; the world failed)
``validation``   shared checks on names, routes, text, numbers and JSON data
``autoscaling``  the pure autoscaling policy and its checkpointed decision
``values``       configs, endpoints, backends, replicas, the routing table, replica tags
``messages``     commands, events and effects, and ``describe(message)``
``limits``       the host's ceilings on commands (``Limits``)
``state``        ``State``, change sets, the failure budget, and a step's one writer
``transitions``  ``step`` and its handler table
``reconcile``    what a replica's recorded status and its liveness mean (one table)
``invariants``   ``validate_state``: every invariant of a state, for tests
``records``      the keyed, checksummed checkpoint record codec
"""
