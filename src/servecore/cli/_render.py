"""Status as rich tables (the JSON form of :class:`~servecore.Status` in, text out)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

__all__ = ["describe_lease", "failed_hint", "print_status", "render_status"]

_STYLE = {
    "HEALTHY": "green",
    "UPDATING": "yellow",
    "UNHEALTHY": "yellow",
    "FAILED": "red",
    "RUNNING": "green",
    "DIED": "red",
}


def _weights(mapping: dict[str, float]) -> str:
    return ", ".join(f"{tag} {weight:g}" for tag, weight in mapping.items()) or "-"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _node(replica: dict[str, Any]) -> str | None:
    """Where a replica runs, in one cell: its node's address, else its node id (a
    status written by an older servecore has neither)."""
    ip, node = replica.get("node_ip"), replica.get("node")
    if ip and node:
        return f"{ip} ({str(node)[:8]})"
    return ip or (str(node)[:16] if node else None)


def _row(table: Table, *cells: str | Text) -> None:
    # Names and paths are the user's: never read them as rich markup.
    table.add_row(*(c if isinstance(c, Text) else Text(c) for c in cells))


def failed_hint(tag: str, error: str | None) -> str:
    """What to do about FAILED backend ``tag`` whose last error is ``error``: the real
    fix first (an import that failed is a path to check), then the command to run."""
    error = error or ""
    if "ModuleNotFoundError" in error or "ImportError" in error:
        fix = (
            "its target could not be imported: check the import path in the app file, "
            "and that --app-dir (given to servecore run) is the directory it is imported "
            "from"
        )
    else:
        fix = f"see why with: servecore logs {tag}, and fix it"
    return (
        f"backend {tag!r} is FAILED: {fix}; then start it again with: servecore retry "
        f"{tag} (or change its definition and servecore apply, or servecore delete "
        f"backend {tag})"
    )


def describe_lease(lease: dict[str, Any]) -> str:
    """One line on a PostgreSQL store's lease: who leads, its epoch, when it expires."""
    holder, epoch, left = lease.get("holder"), lease.get("epoch"), lease.get("expires_in_s")
    if holder is None:
        return f"lease: free (released; epoch {epoch}): no leader"
    if not isinstance(left, (int, float)) or left <= 0:
        ago = f" {-left:.1f}s ago" if isinstance(left, (int, float)) else ""
        return (
            f"lease: expired{ago} (last leader {holder}, epoch {epoch}): no leader; a "
            f"standby takes over"
        )
    return f"lease: leader {holder}, epoch {epoch}, expires in {left:.1f}s unless renewed"


def render_status(status: dict[str, Any], source: str) -> Group:
    """Endpoints, backends and replicas of ``status`` (as :meth:`Status.as_dict`)."""
    live = "live" if status["live"] else "from the checkpoint (no server running)"
    if status.get("runtime") and status["live"]:
        live = f"live ({status['runtime']})"
    health = "healthy" if status["healthy"] else "not healthy"
    head = Text.assemble(
        (f"{source}", "bold"),
        f"  checkpoint {status['seq']}, {live}, ",
        (health, "green" if status["healthy"] else "yellow"),
    )
    lease = status.get("lease")
    if isinstance(lease, dict):
        head.append("\n" + describe_lease(lease))

    endpoints = Table(title="Endpoints", title_justify="left", expand=False)
    for column in ("endpoint", "route", "methods", "traffic", "shadow"):
        endpoints.add_column(column)
    for ep in status["endpoints"]:
        _row(
            endpoints,
            ep["name"],
            _dash(ep["route"]),
            ",".join(ep["methods"]),
            _weights(ep["traffic"]),
            _weights(ep["shadow"]),
        )

    backends = Table(title="Backends", title_justify="left")
    for column in ("backend", "status", "replicas", "queued", "running", "target", "last error"):
        backends.add_column(column)
    for b in status["backends"]:
        _row(
            backends,
            b["tag"],
            Text(b["status"], style=_STYLE.get(b["status"], "")),
            f"{b['running_replicas']}/{b['num_replicas']}",
            _dash(b["queued"]),
            _dash(b["running"]),
            b["target"],
            Text(_dash(b["last_error"]), style="red" if b["last_error"] else ""),
        )

    replicas = Table(title="Replicas", title_justify="left")
    columns = ("replica", "backend", "status", "version", "pid/actor", "node", "running", "log")
    for column in columns:
        replicas.add_column(column)
    for b in status["backends"]:
        for r in b["replicas"]:
            _row(
                replicas,
                r["tag"],
                r["backend"],
                Text(r["status"], style=_STYLE.get(r["status"], "")),
                str(r["version"]),
                _dash(r["pid"] if r["pid"] is not None else r["actor_id"]),
                _dash(_node(r)),
                _dash(r["running"]),
                _dash(r["log_path"]),
            )
    notes = [Text(status["note"], style="yellow")] if status.get("note") else []
    hints = [
        Text(failed_hint(b["tag"], b["last_error"]), style="red")
        for b in status["backends"]
        if b["status"] == "FAILED"
    ]
    return Group(head, *notes, endpoints, backends, replicas, *hints)


def print_status(status: dict[str, Any], source: str, console: Console) -> None:
    """Print :func:`render_status` on ``console``."""
    console.print(render_status(status, source))
