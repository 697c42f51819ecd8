"""``ray start`` for a worker node that keeps to loopback (run as a script by
:meth:`LocalRayCluster.add_node <servecore.runtimes.ray.LocalRayCluster.add_node>`).

Ray keeps ``127.0.0.1`` as a node's address only in its single-machine mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and in that mode its ``ray start`` refuses
to start a worker node at all. Without the mode, ``127.0.0.1`` is rewritten to the
machine's outward address, where the private head (listening on loopback only) cannot
be reached, and the new node waits for the GCS for ever. So this runs ``ray start``
with the mode on for every process it starts (the raylet and its agents inherit the
environment) and off for the one check in the command itself; the launched processes
never read the setting again from this process. It also writes the new node's id to
the file named by ``SERVECORE_RAY_NODE_ID_FILE`` once the GCS lists it.

Only the standard library and Ray are imported: servecore need not be importable here.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import ray._private.node as ray_node
import ray._private.ray_constants as ray_constants
import ray._private.services as ray_services
import ray.scripts.scripts as ray_scripts

NODE_ID_FILE = "SERVECORE_RAY_NODE_ID_FILE"


class _Constants(types.ModuleType):
    """Ray's constants, as the ``ray start`` command alone sees them."""

    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name: str) -> Any:
        return getattr(ray_constants, name)


class _Node(ray_node.Node):
    """Ray's node, which also waits until the GCS lists it (as ``ray.cluster_utils``
    does) and tells the launching process its id."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ray_services.wait_for_node(self.gcs_address, self.plasma_store_socket_name, 60)
        path = os.environ.get(NODE_ID_FILE)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(str(self.node_id))


def main() -> None:
    if not hasattr(ray_scripts, "ray_constants"):
        raise SystemExit(
            "this Ray's `ray start` no longer reads ray_constants as servecore expects; "
            "LocalRayCluster.add_node cannot start a loopback worker node with it"
        )
    ray_scripts.ray_constants = _Constants(ray_constants.__name__)
    ray_node.Node = _Node  # type: ignore[misc]
    sys.argv = ["ray", *sys.argv[1:]]
    ray_scripts.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
