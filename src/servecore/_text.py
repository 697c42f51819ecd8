"""Text that can always be stored and shown: one home for the two questions every layer
asks of text it did not write.

* :func:`encodable`: can this text be encoded as UTF-8 (a checkpoint, a JSON answer, a
  log line)? Lone surrogates, as ``surrogateescape`` leaves them in a non-UTF-8 path,
  cannot; they become backslash escapes.
* :func:`describe_exception`: ``"TypeName: message"`` for an exception, whatever its
  ``__str__`` does (a broken one must not hide the error itself).

This module imports nothing but the standard library's builtins, so a replica process
can import it before anything else of servecore (``tests/core/test_layering.py``).
"""

from __future__ import annotations

__all__ = ["describe_exception", "encodable", "exception_message"]


def encodable(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold (lone surrogates) written as backslash
    escapes (``\\udcff``); text that encodes is returned as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def exception_message(exc: BaseException) -> str:
    """``str(exc)`` made encodable, or a placeholder if ``__str__`` itself fails."""
    try:
        return encodable(str(exc))
    except Exception:
        return f"<{type(exc).__qualname__}: its str() failed>"


def describe_exception(exc: BaseException, *, notes: bool = False, one_line: bool = False) -> str:
    """``"TypeName: message"`` (just ``"TypeName"`` when the message is empty).

    ``notes``: append the exception's string ``__notes__`` (runtimes attach what a
    replica printed before failing); ``one_line``: collapse whitespace, for log lines.
    """
    text = exception_message(exc)
    if one_line:
        text = " ".join(text.split())
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if notes:
        extra = [encodable(n) for n in getattr(exc, "__notes__", ()) if isinstance(n, str)]
        described = "\n".join([described, *extra])
    return described
