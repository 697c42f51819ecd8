"""The checkpoint format: keyed, checksummed records, and the whole-state envelope.

A checkpoint (format version 2) is a set of *records*, one per entity, each keyed::

    meta                {"format": "servecore-checkpoint", "replica_counter": 12,
                         "seq": 42, "version": 2}
    endpoint/<name>     an Endpoint
    backend/<tag>       a Backend
    replica/<tag>       a Replica
    runtime             {"runtime": "subprocess"}: the runtime the replicas run on

Each record's bytes are a small JSON object that checks itself::

    {"sum":"1c291ca3","value":{...}}

where ``sum`` is the CRC-32 (hex) of the key, a newline and the exact bytes of
``value``, so a record that was torn, edited or moved to another key is detected
instead of being read as something else. Values are encoded by msgspec straight from
the attrs values (keys sorted, so equal values give equal bytes) and decoded through
cattrs; never pickle, never a hand-written ``to_dict``. A transition's
:class:`~servecore.Changes` become records put (or deleted) with :func:`encode_changes`,
in time proportional to the change; every commit also puts the ``meta`` record, which
carries the sequence number and the replica counter. The ``runtime`` record names the
runtime of the controllers that wrote the checkpoint (written by the first commit of a
controller that finds it missing or, with no replica recorded, different), so that one
opened with another runtime is refused before it touches a replica
(:class:`~servecore.RuntimeMismatch`); checkpoints written before it have none.
:func:`load_records` assembles a :class:`~servecore.State` from all records and checks
that they fit together (keys match names, replicas below the counter, routes to
backends that exist); the routing table and index are derived again on load.

A whole-state *blob* (for stores that save one byte string, see
:class:`~servecore.stores.BlobAdapter`) is an envelope around all records::

    {"checksum": "sha256:…", "format": "servecore-checkpoint", "records": {...},
     "seq": 42, "version": 2}

Version 1 blobs (``"state": {...}`` instead of ``"records"``, written by servecore
before keyed checkpoints) are still read, and are upgraded by the next commit.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, get_args, get_origin

import attrs
import cattrs
import msgspec

from servecore._core.errors import CheckpointCorrupt, CheckpointVersionError
from servecore._core.maps import Map
from servecore._core.transitions import Backend, Changes, Endpoint, Replica, ReplicaStatus, State
from servecore._core.values import replica_number

__all__ = [
    "FORMAT",
    "META_KEY",
    "RUNTIME_KEY",
    "VERSION",
    "decode",
    "decode_blob",
    "decode_value",
    "encode",
    "encode_blob",
    "encode_changes",
    "encode_value",
    "load_records",
    "meta_record",
    "read_meta",
    "read_runtime",
    "records_of",
    "runtime_record",
]

FORMAT = "servecore-checkpoint"
#: The format version written; versions 1 (whole-state blobs) and 2 are read.
VERSION = 2
META_KEY = "meta"
#: The record naming the runtime the checkpoint's replicas run on.
RUNTIME_KEY = "runtime"
T = TypeVar("T")
_ENDPOINT = "endpoint/"
_BACKEND = "backend/"
_REPLICA = "replica/"


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
        return dict(obj.items())
    raise NotImplementedError(f"cannot checkpoint a {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError)


def encode_value(value: Any) -> bytes:
    """JSON bytes of one of the core's values (keys sorted), as records hold them: what
    other processes are sent (the routing-table feed) uses the checkpoint's codec."""
    return _encoder.encode(value)


def decode_value(data: object, cls: type[T]) -> T:
    """The value of type ``cls`` that :func:`encode_value` gave ``data`` for (already
    parsed JSON); raises ``ValueError`` (or a cattrs error) on anything else."""
    return _converter.structure(data, cls)


# -- records ------------------------------------------------------------------------------


def _crc(key: str, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(key.encode() + b"\n"))


def _record(key: str, body: bytes) -> bytes:
    return b'{"sum":"%08x","value":%s}' % (_crc(key, body), body)


def meta_record(seq: int, replica_counter: int) -> bytes:
    """The ``meta`` record of checkpoint ``seq``."""
    return _record(
        META_KEY,
        b'{"format":"%s","replica_counter":%d,"seq":%d,"version":%d}'
        % (FORMAT.encode(), replica_counter, seq, VERSION),
    )


def runtime_record(runtime: str) -> bytes:
    """The ``runtime`` record naming ``runtime`` (a registered runtime name)."""
    return _record(RUNTIME_KEY, _encoder.encode({"runtime": runtime}))


def read_runtime(records: Mapping[str, bytes], where: str) -> str | None:
    """The runtime the ``runtime`` record names, or ``None`` for a checkpoint without
    one (written before it existed); a damaged record is
    :class:`~servecore.CheckpointCorrupt`."""
    data = records.get(RUNTIME_KEY)
    if data is None:
        return None
    body = _body(RUNTIME_KEY, data, where)
    try:
        value = msgspec.json.decode(body)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"the runtime record does not parse ({exc!r:.200})") from exc
    name = value.get("runtime") if isinstance(value, dict) else None
    if not isinstance(name, str) or not name:
        raise CheckpointCorrupt(where, f"the runtime record names no runtime ({value!r:.200})")
    return name


def _put(out: dict[str, bytes | None], prefix: str, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        key = prefix + name
        out[key] = None if value is None else _record(key, _encoder.encode(value))


def encode_changes(changes: Changes) -> dict[str, bytes | None]:
    """The records a transition puts (bytes) and deletes (``None``), without ``meta``."""
    out: dict[str, bytes | None] = {}
    _put(out, _ENDPOINT, changes.endpoints)
    _put(out, _BACKEND, changes.backends)
    _put(out, _REPLICA, changes.replicas)
    return out


def records_of(state: State, seq: int) -> dict[str, bytes]:
    """Every record of ``state`` as checkpoint ``seq`` (an upgrade, a blob, a test)."""
    out: dict[str, bytes | None] = {}
    _put(out, _ENDPOINT, state.endpoints)
    _put(out, _BACKEND, state.backends)
    _put(out, _REPLICA, state.replicas)
    records = {k: v for k, v in out.items() if v is not None}
    records[META_KEY] = meta_record(seq, state.replica_counter)
    return records


class _Record(msgspec.Struct):
    sum: str
    value: msgspec.Raw


class _Meta(msgspec.Struct):
    format: Any = None
    version: Any = None
    seq: Any = None
    replica_counter: Any = None


def _body(key: str, data: bytes, where: str) -> bytes:
    try:
        rec = msgspec.json.decode(data, type=_Record)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"record {key!r} is not a record ({exc!r:.200})") from exc
    body = bytes(rec.value)
    if rec.sum != f"{_crc(key, body):08x}":
        raise CheckpointCorrupt(where, f"record {key!r}: checksum mismatch (torn or edited)")
    return body


def _check_version(version: Any, where: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointCorrupt(where, f"version {version!r} is not a version number")
    if version > VERSION:
        raise CheckpointVersionError(where, version, VERSION)


def read_meta(records: Mapping[str, bytes], seq: int, where: str) -> int:
    """Check the ``meta`` record of checkpoint ``seq``; return its replica counter."""
    data = records.get(META_KEY)
    if data is None:
        raise CheckpointCorrupt(where, f"{len(records)} records but no {META_KEY!r} record")
    body = _body(META_KEY, data, where)
    try:
        meta = msgspec.json.decode(body, type=_Meta)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"the meta record does not parse ({exc!r:.200})") from exc
    if meta.format != FORMAT:
        raise CheckpointCorrupt(where, f"not a {FORMAT} meta record")
    _check_version(meta.version, where)
    if meta.seq != seq:
        raise CheckpointCorrupt(
            where, f"the records are of checkpoint {meta.seq!r}, the store says {seq}"
        )
    counter = meta.replica_counter
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise CheckpointCorrupt(where, f"replica counter {counter!r} is not a count")
    return counter


def load_records(seq: int, records: Mapping[str, bytes], where: str) -> State:
    """Assemble and check the state of checkpoint ``seq`` from all its records.

    No records at all is the empty state, but only at ``seq`` 0: every commit writes
    the ``meta`` record, so a later checkpoint with none lost its records, and reading
    it as empty would make recovery stop every replica as an orphan. Raises
    :class:`~servecore.CheckpointCorrupt` or :class:`~servecore.CheckpointVersionError`
    naming ``where``; never returns a partial state for bad data.
    """
    if not records:
        if seq != 0:
            raise CheckpointCorrupt(
                where,
                f"the store is at checkpoint {seq} but holds no records (they were lost or "
                f"deleted); an empty state would stop every running replica as an orphan",
            )
        return State()
    counter = read_meta(records, seq, where)
    endpoints: dict[str, Endpoint] = {}
    backends: dict[str, Backend] = {}
    replicas: dict[str, Replica] = {}
    read_runtime(records, where)  # checked, though the state does not hold it
    for key, data in records.items():
        if key in (META_KEY, RUNTIME_KEY):
            continue
        kind, sep, name = key.partition("/")
        target: dict[str, Any]
        cls: type[Any]
        if kind == "endpoint" and sep:
            target, cls = endpoints, Endpoint
        elif kind == "backend" and sep:
            target, cls = backends, Backend
        elif kind == "replica" and sep:
            target, cls = replicas, Replica
        else:
            raise CheckpointCorrupt(where, f"unknown record key {key!r}")
        body = _body(key, data, where)
        value: Any
        try:
            value = _converter.structure(msgspec.json.decode(body), cls)
        except Exception as exc:
            raise CheckpointCorrupt(where, f"record {key!r} does not parse ({exc!r:.300})") from exc
        got = value.name if isinstance(value, Endpoint) else value.tag
        if got != name:
            raise CheckpointCorrupt(where, f"record {key!r} holds {got!r}")
        target[name] = value
    _check_fit(endpoints, backends, replicas, counter, where)
    return State.rebuild(
        endpoints=endpoints, backends=backends, replicas=replicas, replica_counter=counter
    )


def _check_fit(
    endpoints: Mapping[str, Endpoint],
    backends: Mapping[str, Backend],
    replicas: Mapping[str, Replica],
    counter: int,
    where: str,
) -> None:
    """The cross-record invariants a state needs to be rebuilt and stepped."""
    for tag, r in replicas.items():
        try:
            number = replica_number(tag)
        except Exception as exc:
            raise CheckpointCorrupt(where, f"replica tag {tag!r} has no number") from exc
        if number >= counter:
            raise CheckpointCorrupt(where, f"replica {tag!r} is not below counter {counter}")
        if r.status is not ReplicaStatus.STOPPING:
            b = backends.get(r.backend)
            if b is None:
                raise CheckpointCorrupt(where, f"replica {tag!r} of missing backend {r.backend!r}")
            if r.version > b.version:
                raise CheckpointCorrupt(where, f"replica {tag!r} is newer than its backend")
    routes: dict[str, str] = {}
    for name, ep in endpoints.items():
        for tag in (*ep.traffic, *ep.shadow):
            if tag not in backends:
                raise CheckpointCorrupt(where, f"endpoint {name!r} routes to missing {tag!r}")
        if ep.route is not None:
            if ep.route in routes:
                raise CheckpointCorrupt(where, f"route {ep.route!r} is claimed twice")
            routes[ep.route] = name


# -- whole-state blobs --------------------------------------------------------------------


def _json_key(key: str) -> bytes:
    return msgspec.json.encode(key)


def _checksum(seq: int, body: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"%d:%s" % (seq, body)).hexdigest()


def encode_blob(seq: int, records: Mapping[str, bytes]) -> bytes:
    """All ``records`` of checkpoint ``seq`` as one checksummed envelope (version 2)."""
    body = b"{%s}" % b",".join(_json_key(k) + b":" + records[k] for k in sorted(records))
    return b'{"checksum":"%s","format":"%s","records":%s,"seq":%d,"version":%d}' % (
        _checksum(seq, body).encode(),
        FORMAT.encode(),
        body,
        seq,
        VERSION,
    )


def encode(state: State, seq: int) -> bytes:
    """Serialize ``state`` as checkpoint number ``seq``, one blob."""
    return encode_blob(seq, records_of(state, seq))


class _Envelope(msgspec.Struct):
    """The envelope as read: loosely typed (checked by hand), the payload kept raw."""

    format: Any = None
    version: Any = None
    seq: Any = None
    checksum: Any = None
    state: msgspec.Raw = msgspec.Raw(b"null")
    records: msgspec.Raw = msgspec.Raw(b"null")


def decode_blob(data: bytes, where: str) -> tuple[int, dict[str, bytes]]:
    """Parse a blob of either version; return ``(seq, records)``.

    Raises :class:`~servecore.CheckpointCorrupt` or
    :class:`~servecore.CheckpointVersionError` naming ``where``.
    """
    try:
        envelope = msgspec.json.decode(data, type=_Envelope)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"not a valid JSON envelope ({exc!r:.200})") from exc
    if envelope.format != FORMAT:
        raise CheckpointCorrupt(where, f"not a {FORMAT} envelope")
    version = envelope.version
    _check_version(version, where)
    seq = envelope.seq
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise CheckpointCorrupt(where, f"sequence number {seq!r} is not an integer")
    raw = bytes(envelope.state if version == 1 else envelope.records)
    if envelope.checksum != _checksum(seq, raw):
        raise CheckpointCorrupt(where, "checksum mismatch (torn or edited write)")
    if version == 1:
        return seq, records_of(_decode_v1_state(raw, where), seq)
    try:
        found = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"records are not valid JSON ({exc!r:.200})") from exc
    return seq, {k: bytes(v) for k, v in found.items()}


def _decode_v1_state(state_json: bytes, where: str) -> State:
    try:
        body = msgspec.json.decode(state_json)
    except _DECODE_ERRORS as exc:
        raise CheckpointCorrupt(where, f"state is not valid JSON ({exc!r:.200})") from exc
    try:
        snap = _converter.structure(body, _Snapshot)
        return State.rebuild(
            endpoints=snap.endpoints,
            backends=snap.backends,
            replicas=snap.replicas,
            replica_counter=snap.replica_counter,
        )
    except Exception as exc:
        raise CheckpointCorrupt(where, f"state does not parse ({exc!r})") from exc


def decode(data: bytes, where: str) -> tuple[State, int]:
    """Parse a blob of either version into ``(state, seq)``, checked as on load."""
    seq, records = decode_blob(data, where)
    return load_records(seq, records, where), seq


def replace_all(
    current: Iterable[str], records: Mapping[str, bytes]
) -> tuple[dict[str, bytes], list[str]]:
    """The puts and deletes that turn a store holding keys ``current`` into exactly
    ``records`` (to restore a backup through :meth:`commit`)."""
    return dict(records), [k for k in current if k not in records]
