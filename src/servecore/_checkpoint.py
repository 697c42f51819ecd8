"""The checkpoint format: a versioned JSON envelope around the state.

::

    {"format": "servecore-checkpoint", "version": 1, "seq": 42,
     "checksum": "sha256:…", "state": {...}}

The state is unstructured by cattrs (never pickle, never a hand-written ``to_dict``), so
a checkpoint outlives the code version that wrote it. Only the checkpointed parts of a
:class:`~servecore.State` are written; the routing table and index are derived again on
load. The checksum covers the canonical JSON of ``state``, so a torn or edited file is
detected instead of being read as something else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, get_args, get_origin

import attrs
import cattrs
from immutables import Map

from servecore._core import Backend, Endpoint, Replica, State
from servecore._errors import CheckpointCorrupt, CheckpointVersionError

__all__ = ["FORMAT", "VERSION", "decode", "encode"]

FORMAT = "servecore-checkpoint"
VERSION = 1


@attrs.frozen(kw_only=True)
class _Snapshot:
    endpoints: dict[str, Endpoint]
    backends: dict[str, Backend]
    replicas: dict[str, Replica]
    replica_counter: int


def _is_map(t: Any) -> bool:
    return t is Map or get_origin(t) is Map


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()

    def unstructure_map(m: Map[Any, Any]) -> dict[Any, Any]:
        return {k: conv.unstructure(v) for k, v in m.items()}

    def structure_map_factory(t: Any) -> Any:
        args = get_args(t)
        value_type = args[1] if len(args) == 2 else Any

        def structure(value: Any, _t: Any) -> Map[Any, Any]:
            return Map({k: conv.structure(v, value_type) for k, v in value.items()})

        return structure

    conv.register_unstructure_hook_func(_is_map, unstructure_map)
    conv.register_structure_hook_factory(_is_map, structure_map_factory)
    # JSON values (init args, user config) are stored as they are.
    conv.register_structure_hook(Any, lambda v, _t: v)
    return conv


_converter = _make_converter()


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; a checkpoint never contains them.
    raise ValueError(f"{name} is not JSON")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode(state: State, seq: int) -> bytes:
    """Serialize ``state`` as checkpoint number ``seq``."""
    body = _converter.unstructure(
        _Snapshot(
            endpoints=dict(state.endpoints),
            backends=dict(state.backends),
            replicas=dict(state.replicas),
            replica_counter=state.replica_counter,
        )
    )
    # Serialize the body once and splice it in: the envelope is the canonical JSON of
    # {"checksum", "format", "seq", "state", "version"} (keys sorted), byte for byte.
    state_json = _canonical(body)
    checksum = "sha256:" + hashlib.sha256(state_json).hexdigest()
    head = _canonical({"checksum": checksum, "format": FORMAT, "seq": seq})[:-1]
    return b'%s,"state":%s,"version":%d}' % (head, state_json, VERSION)


def decode(data: bytes, where: str) -> tuple[State, int]:
    """Parse a checkpoint; return ``(state, seq)``.

    Raises :class:`~servecore.CheckpointCorrupt` or
    :class:`~servecore.CheckpointVersionError` naming ``where``; never returns an empty
    state for bad data.
    """
    try:
        envelope = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointCorrupt(where, f"not valid JSON ({exc!r:.200})") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointCorrupt(where, f"not a {FORMAT} envelope")
    version = envelope.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointCorrupt(where, f"version {version!r} is not an integer")
    if version > VERSION or version < 1:
        raise CheckpointVersionError(where, version, VERSION)
    body = envelope.get("state")
    checksum = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    if envelope.get("checksum") != checksum:
        raise CheckpointCorrupt(where, "checksum mismatch (torn or edited write)")
    seq = envelope.get("seq")
    if not isinstance(seq, int):
        raise CheckpointCorrupt(where, f"sequence number {seq!r} is not an integer")
    try:
        snap = _converter.structure(body, _Snapshot)
        state = State.rebuild(
            endpoints=snap.endpoints,
            backends=snap.backends,
            replicas=snap.replicas,
            replica_counter=snap.replica_counter,
        )
    except Exception as exc:
        raise CheckpointCorrupt(where, f"state does not parse ({exc!r})") from exc
    return state, seq
