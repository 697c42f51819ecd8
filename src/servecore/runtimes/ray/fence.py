"""The Ray runtime's fence: the newest lease epoch of a store acting on a namespace,
kept in the cluster itself (Ray's internal key-value store, in the GCS).

Each runtime opened with an epoch writes one key for it, never overwriting, under a
prefix of its own Ray namespace and store: the set of keys only grows (until the
newest owner removes the older ones), so "the newest epoch" is the largest one listed,
and no compare-and-set is needed for two leaders to agree on it. A runtime re-reads it
before every start, stop, kill and listing, and refuses with
:class:`~servecore.RuntimeFenced` once a newer epoch is there: so a leader that was
frozen past its lease, and woke, cannot stop, kill or adopt its successor's replicas.

The GCS holds the keys for as long as the cluster lives (and across a GCS restart
when the GCS is fault tolerant). Stores without a lease pass no epoch: nothing is
written or checked for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time

from ray.experimental import internal_kv

from servecore._core.errors import RuntimeFenced

__all__ = ["KV_NAMESPACE", "RayFence"]

#: The internal key-value namespace servecore's fences live in.
KV_NAMESPACE = "servecore"

_EPOCH_DIGITS = 20


class RayFence:
    """The fence of Ray namespace ``namespace`` for store ``store_id``, as seen by a
    runtime holding ``epoch``. Its methods block (a GCS round trip): call them on a
    worker thread, under a deadline."""

    def __init__(self, namespace: str, store_id: str, epoch: int) -> None:
        self.namespace = namespace
        self.store_id = store_id
        self.epoch = epoch
        digest = hashlib.sha256(
            f"{namespace}\0{store_id}".encode("utf-8", "surrogatepass")
        ).hexdigest()[:40]
        #: Keys of this namespace and store: ``prefix + 20-digit epoch``.
        self.prefix = f"fence/{digest}/".encode()
        self.where = f"ray namespace {namespace!r}"

    def _key(self, epoch: int) -> bytes:
        return self.prefix + str(epoch).zfill(_EPOCH_DIGITS).encode()

    def epochs(self) -> list[int]:
        """(thread) The epochs recorded, oldest first."""
        found = []
        for key in internal_kv._internal_kv_list(self.prefix, namespace=KV_NAMESPACE):
            tail = bytes(key)[len(self.prefix) :]
            if len(tail) == _EPOCH_DIGITS and tail.isdigit():
                found.append(int(tail))
        return sorted(found)

    def newest(self) -> int | None:
        """(thread) The newest epoch recorded, or ``None``."""
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def fenced(self) -> RuntimeFenced | None:
        """(thread) The refusal due when a newer epoch is recorded, else ``None``."""
        newest = self.newest()
        if newest is not None and newest > self.epoch:
            return RuntimeFenced(self.where, self.store_id, self.epoch, newest)
        return None

    def check(self) -> None:
        """(thread) Raise :class:`~servecore.RuntimeFenced` if a newer epoch is recorded."""
        fenced = self.fenced()
        if fenced is not None:
            raise fenced

    def claim(self) -> None:
        """(thread) Record this epoch, unless a newer one is there (then raise
        :class:`~servecore.RuntimeFenced`), and drop the older ones' keys.

        The key is written without overwriting and the fence read again after: two
        leaders claiming at once both see the larger epoch, which alone goes on.
        """
        self.check()
        record = {
            "store_id": self.store_id,
            "epoch": self.epoch,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": time.time(),
        }
        internal_kv._internal_kv_put(
            self._key(self.epoch),
            json.dumps(record).encode(),
            overwrite=False,
            namespace=KV_NAMESPACE,
        )
        self.check()
        for older in self.epochs():
            if older < self.epoch:
                with contextlib.suppress(Exception):  # the newest key is what matters
                    internal_kv._internal_kv_del(self._key(older), namespace=KV_NAMESPACE)
