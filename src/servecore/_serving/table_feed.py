"""The routing-table feed: every committed table, to routers in other processes
(docs/design.md §5).

A subscriber sends ``{"op": "subscribe"}`` on the control socket of ``servecore run``
and keeps the connection open. The server answers with newline-terminated JSON: first
a *hello* saying how replicas can be reached, then the whole current table, then the
whole table again after each change::

    {"ok": true, "feed": 1, "runtime": "subprocess", "directory": "/srv/.servecore/replicas"}
    {"seq": 42, "epoch": null, "table": {"backends": {...}, "endpoints": {...}}}
    {"seq": 43, "epoch": null, "table": {...}}

Tables are the core's :class:`~servecore.RoutingTable`, encoded with the checkpoint's
codec (msgspec out, cattrs in; never pickle). Each is versioned by the sequence number
of the checkpoint that holds it and, on a PostgreSQL store, the lease epoch of the
controller that pushed it: versions order by ``(seq, epoch)``. The table is a function
of the committed state, so two tables of one version are the same table; a subscriber
applies a table only if its version is newer than the one it has
(:meth:`VersionedTable.newer_than`), and so never goes back, whatever order
reconnections deliver them in.

Whole tables, not differences: a table is small (a few hundred bytes per backend), and
a subscriber that missed any number of changes is whole again with the next line. A
slow subscriber gets only the newest table (older ones not yet sent are skipped).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import attrs
import msgspec
import trio

from servecore._core.records import decode_value, encode_value
from servecore._core.transitions import RoutingTable

__all__ = [
    "FEED_VERSION",
    "MAX_LINE_BYTES",
    "TableFeed",
    "VersionedTable",
    "decode_table",
    "encode_table",
    "read_lines",
    "runtime_hello",
]

#: The feed's protocol version, in the hello line.
FEED_VERSION = 1
#: The longest line a subscriber reads: far above any real table.
MAX_LINE_BYTES = 64 * 1024 * 1024


@attrs.frozen(kw_only=True)
class VersionedTable:
    """A routing table with the version of the checkpoint that holds it."""

    seq: int
    #: The PostgreSQL lease epoch of the controller that pushed it; None for other stores.
    epoch: int | None = None
    table: RoutingTable = attrs.field(factory=RoutingTable)

    @property
    def version(self) -> tuple[int, int]:
        """What tables are ordered by: the checkpoint's seq, then the lease epoch."""
        return (self.seq, -1 if self.epoch is None else self.epoch)

    def newer_than(self, other: VersionedTable | None) -> bool:
        """Whether a subscriber holding ``other`` should take this table."""
        return other is None or self.version > other.version


def encode_table(versioned: VersionedTable) -> bytes:
    """One feed line (with its newline) for ``versioned``."""
    table = encode_value(versioned.table)
    head = json.dumps({"seq": versioned.seq, "epoch": versioned.epoch})[:-1]
    return head.encode() + b', "table": ' + table + b"}\n"


def decode_table(line: bytes) -> VersionedTable:
    """The table of one feed line; ``ValueError`` if it is not one."""
    try:
        data = msgspec.json.decode(line)
        seq, epoch, table = data["seq"], data["epoch"], data["table"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq={seq!r} is not a sequence number")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise ValueError(f"epoch={epoch!r} is not a lease epoch")
        return VersionedTable(seq=seq, epoch=epoch, table=decode_value(table, RoutingTable))
    except ValueError:
        raise
    except Exception as exc:  # msgspec, cattrs and key errors: all mean "not a table"
        raise ValueError(f"not a routing-table line: {exc!r}") from exc


def runtime_hello(runtime: object) -> dict[str, Any]:
    """The hello line: how a process other than the controller's reaches the replicas.

    The subprocess runtime's replicas listen where another process on this host can
    connect (a Unix socket each, in the runtime directory); a runtime with a
    ``reach()`` method adds what it returns (Ray: its name, namespace and cluster
    address);
    others are named, and refused by the client with
    :class:`~servecore.ReplicasUnreachable`.
    """
    hello: dict[str, Any] = {"ok": True, "feed": FEED_VERSION}
    # Imported here: a controller on another runtime never loads the subprocess one.
    from servecore.runtimes.subprocess import SubprocessRuntime

    if isinstance(runtime, SubprocessRuntime):
        hello.update(runtime="subprocess", directory=str(runtime.directory))
    else:
        from servecore.runtimes import BUILTIN_RUNTIMES

        cls = type(runtime)
        path = f"{cls.__module__}:{cls.__qualname__}"
        names = [name for name, (where, _) in BUILTIN_RUNTIMES.items() if where == path]
        hello.update(runtime=names[0] if names else path)
        reach = getattr(runtime, "reach", None)
        if callable(reach):
            # A runtime whose replicas other processes can reach says how (Ray: the
            # namespace and the cluster's address).
            hello.update({k: v for k, v in reach().items() if k not in ("ok", "feed")})
    return hello


class TableFeed:
    """The controller's end: one table listener, any number of subscribers.

    Each pushed table is stamped with the controller's ``seq`` (the commit that holds
    it: tables are pushed after the commit is adopted) and its store's lease ``epoch``.
    """

    def __init__(self, controller: Any) -> None:
        self._controller = controller
        self._changed = trio.Event()
        self.latest = VersionedTable(seq=-1)
        controller.add_table_listener(self._on_table)  # calls it now, with the current table

    def _on_table(self, table: RoutingTable) -> None:
        epoch = getattr(self._controller.store, "epoch", None)
        self.latest = VersionedTable(
            seq=self._controller.seq,
            epoch=epoch if isinstance(epoch, int) else None,
            table=table,
        )
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, stream: trio.abc.SendStream) -> None:
        """Send the hello, the current table and then every newer one until the
        subscriber goes away (or the server stops)."""
        hello = runtime_hello(self._controller.runtime)
        await stream.send_all(json.dumps(hello).encode() + b"\n")
        sent: VersionedTable | None = None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                changed, latest = self._changed, self.latest
                if latest.newer_than(sent):
                    await stream.send_all(encode_table(latest))
                    sent = latest
                if self.latest is latest:
                    await changed.wait()


async def read_lines(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    """The next line of ``stream`` (without its newline), ``None`` at its end."""
    while (end := buffer.find(b"\n")) < 0:
        if len(buffer) > MAX_LINE_BYTES:
            raise ValueError(f"a feed line is over {MAX_LINE_BYTES} bytes")
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            return None
        buffer += chunk
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line
