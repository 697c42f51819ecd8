"""The driver's connection to Ray: one per process, shared by the runtimes in it."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import ray

__all__ = ["connect", "disconnect", "keep_loopback"]

_connection_lock = threading.Lock()
_connection_users = 0
_connection_ours = False


def _is_loopback(address: str | None) -> bool:
    if not address or address == "auto" or "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keep_loopback() -> None:
    """Make this process's Ray driver keep a loopback address as it is.

    Ray rewrites ``127.0.0.1`` to the machine's outward address, unless it runs in its
    single-machine mode (the one it uses on macOS and Windows), which this selects.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with contextlib.suppress(ImportError, AttributeError):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


class _NoSigtermWarning(logging.Filter):
    """Drop Ray's warning that it set no SIGTERM handler off the main thread.

    That is what servecore wants: the host application owns its signals.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def connect(address: str | None, namespace: str, init_options: Mapping[str, Any]) -> None:
    """(thread) Connect this process to Ray unless it already is; count the users."""
    global _connection_users, _connection_ours
    with _connection_lock:
        if not ray.is_initialized():
            if _is_loopback(address or os.environ.get("RAY_ADDRESS")):
                keep_loopback()
            options: dict[str, Any] = {"logging_level": logging.WARNING}
            options.update(init_options)
            quiet = _NoSigtermWarning()
            ray_log = logging.getLogger("ray._private.worker")
            ray_log.addFilter(quiet)
            try:
                ray.init(address=address, namespace=namespace, **options)
            finally:
                ray_log.removeFilter(quiet)
            _connection_ours = True
        _connection_users += 1


def disconnect() -> None:
    global _connection_users, _connection_ours
    with _connection_lock:
        _connection_users = max(0, _connection_users - 1)
        if _connection_users == 0 and _connection_ours and ray.is_initialized():
            ray.shutdown()
            _connection_ours = False
