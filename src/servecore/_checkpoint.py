"""The checkpoint format: a versioned JSON envelope around the state.

::

    {"checksum": "sha256:…", "format": "servecore-checkpoint", "seq": 42,
     "state": {...}, "version": 1}

The state is encoded by msgspec straight from the attrs values (keys sorted, so equal
states give equal bytes) and decoded back through cattrs; never pickle, never a
hand-written ``to_dict``, so a checkpoint outlives the code version that wrote it. Only
the checkpointed parts of a :class:`~servecore.State` are written; the routing table and
index are derived again on load. The checksum covers the sequence number and the exact
bytes of ``state`` (read back as raw bytes, not re-serialized), so a torn or edited file
is detected instead of being read as something else.
"""

from __future__ import annotations

import hashlib
from typing import Any, get_args, get_origin

import attrs
import cattrs
import msgspec
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

    def structure_map_factory(t: Any) -> Any:
        args = get_args(t)
        value_type = args[1] if len(args) == 2 else Any

        def structure(value: Any, _t: Any) -> Map[Any, Any]:
            return Map({k: conv.structure(v, value_type) for k, v in value.items()})

        return structure

    conv.register_structure_hook_factory(_is_map, structure_map_factory)
    # JSON values (init args, user config) are stored as they are.
    conv.register_structure_hook(Any, lambda v, _t: v)
    return conv


_converter = _make_converter()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Map):
        return dict(obj)
    raise NotImplementedError(f"cannot checkpoint a {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")


def _checksum(seq: int, state_json: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"%d:%s" % (seq, state_json)).hexdigest()


def encode(state: State, seq: int) -> bytes:
    """Serialize ``state`` as checkpoint number ``seq``."""
    state_json = _encoder.encode(
        _Snapshot(
            endpoints=dict(state.endpoints),
            backends=dict(state.backends),
            replicas=dict(state.replicas),
            replica_counter=state.replica_counter,
        )
    )
    return b'{"checksum":"%s","format":"%s","seq":%d,"state":%s,"version":%d}' % (
        _checksum(seq, state_json).encode(),
        FORMAT.encode(),
        seq,
        state_json,
        VERSION,
    )


class _Envelope(msgspec.Struct):
    """The envelope as read: loosely typed (checked by hand), ``state`` kept raw."""

    format: Any = None
    version: Any = None
    seq: Any = None
    checksum: Any = None
    state: msgspec.Raw = msgspec.Raw(b"null")


_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError)


def decode(data: bytes, where: str) -> tuple[State, int]:
    """Parse a checkpoint; return ``(state, seq)``.

    Raises :class:`~servecore.CheckpointCorrupt` or
    :class:`~servecore.CheckpointVersionError` naming ``where``; never returns an empty
    state for bad data.
    """
    try:
        envelope = msgspec.json.decode(data, type=_Envelope)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"not a valid JSON envelope ({exc!r:.200})") from exc
    if envelope.format != FORMAT:
        raise CheckpointCorrupt(where, f"not a {FORMAT} envelope")
    version = envelope.version
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointCorrupt(where, f"version {version!r} is not a version number")
    if version > VERSION:
        raise CheckpointVersionError(where, version, VERSION)
    seq = envelope.seq
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise CheckpointCorrupt(where, f"sequence number {seq!r} is not an integer")
    state_json = bytes(envelope.state)
    if envelope.checksum != _checksum(seq, state_json):
        raise CheckpointCorrupt(where, "checksum mismatch (torn or edited write)")
    try:
        body = msgspec.json.decode(state_json)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"state is not valid JSON ({exc!r:.200})") from exc
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
