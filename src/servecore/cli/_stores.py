"""Which store a command means by ``--store``: :mod:`servecore._store_choice`, shared
with ``servecore.connect`` (which takes the same ``--store`` and ``--state-dir``)."""

from __future__ import annotations

from servecore._store_choice import DEFAULT_STORE, PG_ANCHOR, StoreChoice, choose_store, is_dsn

__all__ = ["DEFAULT_STORE", "PG_ANCHOR", "StoreChoice", "choose_store", "is_dsn"]
