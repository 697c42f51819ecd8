"""Raising again, on the caller's side, an exception a replica raised elsewhere.

Shared by the out-of-process runtimes (subprocess, Ray). The replica side describes
the exception as a dict (``pickled``, ``state``, ``module``, ``qualname``, ``message``,
``traceback``; see ``error_info`` in ``subprocess/wire.py``); :func:`rebuild_exception`
turns it back into an exception of its own type whenever that type can be imported,
with its text made encodable: what a replica says must never break the checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from collections.abc import Mapping
from typing import Any

from servecore._core.errors import RemoteError
from servecore._text import encodable

__all__ = ["rebuild_exception"]


def rebuild_exception(info: Mapping[str, Any]) -> Exception:
    """The exception ``info`` describes, as its own type when it can be imported.

    Pickle calls the constructor with the exception's args, which fails for types that
    take other arguments: those are built without their constructor, with the message
    and attributes they had. Unknown types, and BaseExceptions such as SystemExit (which
    must not unwind the caller as if the caller were exiting), become
    :class:`~servecore.RemoteError` naming the type.
    """
    exc: BaseException | None = None
    if info.get("pickled") is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(info["pickled"])
    if exc is None:
        with contextlib.suppress(Exception):
            cls: Any = importlib.import_module(info["module"])
            for part in info["qualname"].split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                rebuilt = cls.__new__(cls)
                rebuilt.args = (info["message"],)
                if info.get("state") is not None:
                    vars(rebuilt).update(pickle.loads(info["state"]))
                exc = rebuilt
    if not isinstance(exc, Exception):
        return RemoteError(f"{info['module']}.{info['qualname']}", _encodable(info["message"]))
    return _made_encodable(exc, info)


def _encodable(text: object) -> str:
    return encodable(str(text))


def _made_encodable(exc: Exception, info: Mapping[str, Any]) -> Exception:
    """``exc`` with lone surrogates escaped in its string arguments and attributes, so
    that ``str(exc)`` encodes; a type whose ``str()`` still does not becomes
    :class:`~servecore.RemoteError` with the (escaped) message."""

    def clean(value: Any) -> Any:
        return _encodable(value) if isinstance(value, str) else value

    try:
        str(exc).encode("utf-8")
        return exc
    except Exception:
        pass
    with contextlib.suppress(Exception):
        exc.args = tuple(clean(arg) for arg in exc.args)
        for name, value in list(vars(exc).items()):
            setattr(exc, name, clean(value))
    try:
        str(exc).encode("utf-8")
    except Exception:
        name = f"{info['module']}.{info['qualname']}"
        return RemoteError(name, _encodable(info.get("message", "")))
    return exc
