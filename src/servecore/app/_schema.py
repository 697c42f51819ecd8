"""The app file: a TOML description of backends and endpoints, parsed by a schema.

::

    [backends.sentiment_v1]
    target = "examples.textapp:SentimentV1"
    num_replicas = 2

    [endpoints.sentiment]
    route = "/sentiment"
    methods = ["GET", "POST"]
    traffic = { sentiment_v1 = 1.0 }
    http_request = false         # true: the target gets a servecore.Request for every request

    [server]                     # optional: how ``servecore run`` serves this app
    runtime = "subprocess"       # threads, subprocess, ray, or a plugin's name
    runtime_options = { startup_timeout_s = 60 }
    host = "127.0.0.1"
    port = 8000
    workers = 2
    store = ".servecore/state.db"    # or "postgresql://host/db?..." (a DSN)
    name = "servecore"

``[server]`` is read by ``servecore run`` only (its command-line flags override each
key); ``servecore apply`` and :func:`apply` ignore it. A relative ``store`` or
``state_dir`` is relative to the app file's directory, so a project's state stays with
the project wherever the command runs.

The shape is checked by msgspec structs (types, unknown keys, missing keys); the values
by the core's own constructors (:class:`~servecore.BackendConfig`,
:class:`~servecore.CreateEndpoint`, :class:`~servecore.SetTraffic`), so a file accepts
exactly what the API accepts. Any error is an :class:`AppFileError` naming the file,
the key path (``backends.sentiment_v1.num_replicas``) and the bad value.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs
import msgspec
from msgspec import UNSET, UnsetType

from servecore._core.errors import (
    CommandError,
    InvalidConfig,
    InvalidRoute,
    InvalidTarget,
    InvalidTraffic,
)
from servecore._core.transitions import (
    BackendConfig,
    CreateBackend,
    CreateEndpoint,
    SetShadowTraffic,
    SetTraffic,
)
from servecore._core.validation import check_namespace

__all__ = [
    "MAX_APP_FILE_BYTES",
    "App",
    "AppFileError",
    "BackendSpec",
    "EndpointSpec",
    "ServerSpec",
    "load_app",
    "parse_app",
    "read_app_text",
]


class AppFileError(CommandError):
    """An app file is not valid; nothing was applied.

    ``file`` is the file's name, ``key`` the dotted key path of the bad entry
    (``""`` for the file as a whole), ``value`` the value found there.
    """

    def __init__(self, file: str, key: str, value: Any, why: str) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.why = why
        at = f"{key} = {_show(value)}: " if key else ""
        super().__init__(f"{file}: {at}{why}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------
# The file's shape. Config keys left out keep BackendConfig's defaults (UNSET here), so
# the defaults live in one place.


class _BackendFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    target: str
    init_args: list[Any] = msgspec.field(default_factory=list)
    init_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    num_replicas: int | UnsetType = UNSET
    max_batch_size: int | UnsetType = UNSET
    batch_wait_timeout_s: float | UnsetType = UNSET
    max_concurrent_queries: int | UnsetType = UNSET
    graceful_shutdown_timeout_s: float | UnsetType = UNSET
    health_check_period_s: float | UnsetType = UNSET
    health_check_timeout_s: float | UnsetType = UNSET
    max_surge: float | UnsetType = UNSET
    user_config: Any = UNSET
    runtime_options: dict[str, Any] | UnsetType = UNSET
    # servecore.AutoscalingConfig's fields, as a table (instead of num_replicas).
    autoscaling: dict[str, Any] | UnsetType = UNSET


class _EndpointFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Unset: "/<endpoint name>", as Ray Serve's route_prefix; "" serves no HTTP route.
    route: str | UnsetType = UNSET
    methods: list[str] | UnsetType = UNSET
    http_request: bool = False
    traffic: dict[str, float] = msgspec.field(default_factory=dict)
    shadow: dict[str, float] = msgspec.field(default_factory=dict)


class _ServerFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    runtime: str | UnsetType = UNSET
    runtime_options: dict[str, Any] | UnsetType = UNSET
    host: str | UnsetType = UNSET
    port: int | UnsetType = UNSET
    workers: int | UnsetType = UNSET
    store: str | UnsetType = UNSET
    state_dir: str | UnsetType = UNSET
    name: str | UnsetType = UNSET


class _AppFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Entries are converted one by one, so that an error can name the entry's key
    # (msgspec reports a dict key as "[...]").
    backends: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    server: dict[str, Any] = msgspec.field(default_factory=dict)


T = TypeVar("T")

_CONFIG_KEYS = tuple(a.name for a in attrs.fields(BackendConfig))


# ---------------------------------------------------------------------------------------
# The parsed app: what apply() makes the controller match.


@attrs.frozen(kw_only=True)
class BackendSpec:
    """A backend as the file declares it (values already normalized by the core)."""

    tag: str
    target: str
    init_args: tuple[Any, ...] = ()
    init_kwargs: dict[str, Any] = attrs.field(factory=dict)
    config: BackendConfig = attrs.field(factory=BackendConfig)


@attrs.frozen(kw_only=True)
class EndpointSpec:
    """An endpoint as the file declares it; weights of 0 are dropped, as the core does."""

    name: str
    route: str | None
    methods: tuple[str, ...]
    traffic: dict[str, float] = attrs.field(factory=dict)
    http_request: bool = False
    shadow: dict[str, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ServerSpec:
    """The ``[server]`` table: how ``servecore run`` serves the app. ``None``: not
    given (the command line's flag, or its default, decides). ``store`` and
    ``state_dir`` are as written (relative to the app file's directory)."""

    runtime: str | None = None
    runtime_options: dict[str, Any] | None = None
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    store: str | None = None
    state_dir: str | None = None
    name: str | None = None


@attrs.frozen(kw_only=True)
class App:
    """A whole app: every backend and endpoint the controller should have, and no other.

    Build one with :func:`load_app` (a file) or :func:`parse_app` (text).
    """

    backends: dict[str, BackendSpec] = attrs.field(factory=dict)
    endpoints: dict[str, EndpointSpec] = attrs.field(factory=dict)
    #: Where it was read from (for messages).
    source: str = attrs.field(default="<app>", eq=False)
    #: The ``[server]`` table (how ``servecore run`` serves it; not part of the app).
    server: ServerSpec = attrs.field(factory=ServerSpec, eq=False)


# ---------------------------------------------------------------------------------------
# Parsing.

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`")


#: Where msgspec says ``[...]``: the value of some key of a table, not named.
_SOME_KEY = object()
_GOT = re.compile(r"got `?(?P<kind>[a-z]+)`?")


def _split_path(path: str) -> list[Any]:
    """``.backends.echo.init_args[0]`` -> ``["backends", "echo", "init_args", 0]``;
    msgspec's ``[...]`` (a table's value, key not named) becomes :data:`_SOME_KEY`."""
    parts: list[Any] = []
    for m in re.finditer(r"\.([^.\[]+)|\[(\d+)\]|\[\"([^\"]*)\"\]|(\[\.\.\.\])", path):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
        elif m.group(3) is not None:
            parts.append(m.group(3))
        else:
            parts.append(_SOME_KEY)
    return parts


def _kind(value: Any) -> str:
    """msgspec's name for the type of a parsed TOML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _resolve(raw: Any, parts: list[Any], why: str) -> list[str | int]:
    """``parts`` with each :data:`_SOME_KEY` replaced by the key msgspec complained
    about: the first whose value has the type the error says it got."""
    got = _GOT.search(why)
    resolved: list[str | int] = []
    node = raw
    for p in parts:
        if p is _SOME_KEY:
            keys = list(node) if isinstance(node, dict) else []
            bad = [k for k in keys if got is not None and _kind(node[k]) == got.group("kind")]
            if not (bad or keys):
                break
            p = (bad or keys)[0]
        resolved.append(p)
        node = _lookup(node, [p])
    return resolved


def _dotted(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", p):
            out += f".{p}" if out else p
        else:
            out += f'."{p}"' if out else f'"{p}"'
    return out


def _lookup(raw: Any, parts: list[str | int]) -> Any:
    for p in parts:
        try:
            raw = raw[p]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _shape_error(
    file: str, raw: dict[str, Any], exc: msgspec.ValidationError, prefix: list[str | int]
) -> AppFileError:
    message = str(exc)
    m = _PATH.search(message)
    why = message[: m.start()] if m else message
    parts = _resolve(raw, [*prefix, *(_split_path(m.group("path")) if m else [])], why)
    unknown = _UNKNOWN.match(why)
    missing = _MISSING.match(why)
    if unknown:
        parts.append(unknown.group("field"))
        known = _known_keys(parts[:-1])
        why = f"unknown key; known keys here: {', '.join(known)}" if known else "unknown key"
    elif missing:
        parts.append(missing.group("field"))
        return AppFileError(file, _dotted(parts), None, "required key is missing")
    else:
        why = why.replace("`", "")
    return AppFileError(file, _dotted(parts), _lookup(raw, parts), why)


def _known_keys(parts: list[str | int]) -> list[str]:
    if not parts:
        return list(_AppFile.__struct_fields__)
    if parts[0] == "backends" and len(parts) == 2:
        return list(_BackendFile.__struct_fields__)
    if parts[0] == "endpoints" and len(parts) == 2:
        return list(_EndpointFile.__struct_fields__)
    if parts == ["server"]:
        return list(_ServerFile.__struct_fields__)
    return []


def _backend_spec(file: str, tag: str, b: _BackendFile) -> BackendSpec:
    at = f"backends.{tag}" if re.fullmatch(r"[A-Za-z0-9_-]+", tag) else f'backends."{tag}"'
    fields = {k: getattr(b, k) for k in _CONFIG_KEYS if getattr(b, k) is not UNSET}
    try:
        config = BackendConfig(**fields)
    except InvalidConfig as exc:
        key = exc.field.split("[", 1)[0]
        _raise(file, f"{at}.{key}", fields.get(key, exc.value), exc)
    try:
        cmd = CreateBackend(
            tag=tag,
            target=b.target,
            init_args=b.init_args,
            init_kwargs=b.init_kwargs,
            config=config,
        )
    except InvalidTarget as exc:
        _raise(file, f"{at}.target", b.target, exc)
    except InvalidConfig as exc:
        key = exc.field.split("[", 1)[0]
        if key.endswith(" name"):
            _raise(file, at, tag, exc)
        _raise(file, f"{at}.{key}", getattr(b, key, exc.value), exc)
    return BackendSpec(
        tag=tag,
        target=cmd.target,
        init_args=cmd.init_args,
        init_kwargs=cmd.init_kwargs,
        config=cmd.config,
    )


def _raise(file: str, key: str, value: Any, exc: CommandError) -> NoReturn:
    raise AppFileError(file, key, value, str(exc)) from exc


def _endpoint_spec(
    file: str, name: str, e: _EndpointFile, backends: dict[str, BackendSpec]
) -> EndpointSpec:
    at = f"endpoints.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'endpoints."{name}"'
    route: str | None = f"/{name}" if e.route is UNSET else (e.route or None)
    kwargs: dict[str, Any] = {"name": name, "route": route, "http_request": e.http_request}
    if e.methods is not UNSET:
        kwargs["methods"] = e.methods
    try:
        cmd = CreateEndpoint(**kwargs)
    except InvalidRoute as exc:
        _raise(file, f"{at}.{exc.field}", exc.value, exc)
    except InvalidConfig as exc:
        _raise(file, at, name, exc)
    for what, mapping in (("traffic", e.traffic), ("shadow", e.shadow)):
        for tag, weight in mapping.items():
            if tag not in backends:
                known = ", ".join(sorted(backends)) or "none"
                raise AppFileError(
                    file,
                    f"{at}.{what}.{tag}",
                    weight,
                    f"names backend {tag!r}, which this file does not declare "
                    f"(declared: {known}); add [backends.{tag}] or remove it",
                )
    traffic: dict[str, float] = {}
    if e.traffic:
        try:
            traffic = dict(SetTraffic(endpoint=name, traffic=e.traffic).traffic)
        except InvalidTraffic as exc:
            _raise(file, f"{at}.traffic", e.traffic, exc)
    shadow: dict[str, float] = {}
    for tag, proportion in e.shadow.items():
        try:
            p = SetShadowTraffic(endpoint=name, backend=tag, proportion=proportion).proportion
        except InvalidTraffic as exc:
            _raise(file, f"{at}.shadow.{tag}", proportion, exc)
        if p > 0:
            shadow[tag] = p
    return EndpointSpec(
        name=name,
        route=cmd.route,
        methods=cmd.methods,
        http_request=cmd.http_request,
        traffic=dict(sorted(traffic.items())),
        shadow=dict(sorted(shadow.items())),
    )


#: The highest ``[server] workers`` (as ``servecore run --workers``).
MAX_WORKERS = 256


def _server_spec(file: str, s: _ServerFile) -> ServerSpec:
    def bad(key: str, value: Any, why: str) -> NoReturn:
        raise AppFileError(file, f"server.{key}", value, why)

    given = {k: getattr(s, k) for k in _ServerFile.__struct_fields__ if getattr(s, k) is not UNSET}
    for key in ("runtime", "host", "store", "state_dir"):
        value = given.get(key)
        if value is not None and (not value.strip() or "\x00" in value):
            bad(key, value, "must be a non-empty string")
    port = given.get("port")
    if port is not None and not 0 <= port <= 65535:
        bad("port", port, "must be a port number from 0 to 65535 (0: any free port)")
    workers = given.get("workers")
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        bad("workers", workers, f"must be from 0 (serve HTTP from the server) to {MAX_WORKERS}")
    name = given.get("name")
    if name is not None:
        try:
            check_namespace(name)
        except InvalidConfig as exc:
            _raise(file, "server.name", name, exc)
    options = given.get("runtime_options")
    if options is not None:
        for option in options:
            if not option.isidentifier():
                bad(
                    f"runtime_options.{option}",
                    options[option],
                    "is not a keyword a runtime's constructor can take",
                )
    return ServerSpec(**given)


def _convert(
    source: str, raw: dict[str, Any], value: Any, into: type[T], prefix: list[str | int]
) -> T:
    try:
        return msgspec.convert(value, into, strict=True)
    except msgspec.ValidationError as exc:
        raise _shape_error(source, raw, exc, prefix) from exc


def parse_app(text: str, source: str = "<app>") -> App:
    """Parse and validate the TOML ``text`` of an app file; ``source`` names it in
    errors. Raises :class:`AppFileError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AppFileError(source, "", None, f"not valid TOML: {exc}") from exc
    parsed = _convert(source, raw, raw, _AppFile, [])
    backends = {
        tag: _backend_spec(source, tag, _convert(source, raw, b, _BackendFile, ["backends", tag]))
        for tag, b in parsed.backends.items()
    }
    endpoints = {
        name: _endpoint_spec(
            source, name, _convert(source, raw, e, _EndpointFile, ["endpoints", name]), backends
        )
        for name, e in parsed.endpoints.items()
    }
    server = _server_spec(source, _convert(source, raw, parsed.server, _ServerFile, ["server"]))
    routes: dict[str, str] = {}
    for name, ep in endpoints.items():
        if ep.route is None:
            continue
        if ep.route in routes:
            raise AppFileError(
                source,
                f"endpoints.{name}.route",
                ep.route,
                f"endpoint {routes[ep.route]!r} already serves this route; pick another",
            )
        routes[ep.route] = name
    return App(backends=backends, endpoints=endpoints, source=source, server=server)


#: The largest app file read (an app file is a few kilobytes; this keeps a mistaken
#: path, say a model's weights, from being read whole and sent to a server).
MAX_APP_FILE_BYTES = 4 * 1024 * 1024


def read_app_text(path: str | os.PathLike[str]) -> str:
    """The text of the app file at ``path``, read exactly once.

    Only a regular file is read: a FIFO or a device is refused without blocking on it
    (opening a FIFO with no writer would wait for ever, and a pipe such as
    ``<(cat app.toml)`` can be read only once, so a second reading would see an empty
    app). Raises :class:`AppFileError` for a file that is not a regular file, too large,
    or not UTF-8, and ``OSError`` if it cannot be opened.
    """
    p = str(Path(path))
    # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat can refuse it.
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a pipe or FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
            raise AppFileError(
                p,
                "",
                None,
                f"is {kind}; an app file must be a regular file (it is read once, as a "
                f"whole): write it to a file and pass that path",
            )
        if info.st_size > MAX_APP_FILE_BYTES:
            raise AppFileError(p, "", None, _too_large(info.st_size))
        data = bytearray()
        while len(data) <= MAX_APP_FILE_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_APP_FILE_BYTES:  # it grew while being read
        raise AppFileError(p, "", None, _too_large(len(data)))
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AppFileError(p, "", None, f"not UTF-8 text: {exc}") from exc


def _too_large(size: int) -> str:
    return (
        f"is {size} bytes, over the {MAX_APP_FILE_BYTES} bytes an app file may have; "
        f"is this the right file?"
    )


def load_app(path: str | os.PathLike[str]) -> App:
    """Read (once, see :func:`read_app_text`) and validate the app file at ``path``.
    Raises :class:`AppFileError` (or ``OSError`` if it cannot be read)."""
    return parse_app(read_app_text(path), source=str(Path(path)))
