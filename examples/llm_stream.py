"""An LLM-style streaming model: tokens one by one, as a language model emits them.

:class:`TinyLM` is an async generator target: each request ``{"prompt": "...",
"max_tokens": n}`` streams the reply token by token, waiting ``delay_s`` between tokens
as a model's decoding step would. Serve it with ``examples/llm_stream.toml``::

    servecore run examples/llm_stream.toml --runtime subprocess --workers 0
    curl -N -X POST http://127.0.0.1:8000/generate -d '{"prompt": "tell me a story"}'
    curl -N -H 'Accept: text/event-stream' 'http://127.0.0.1:8000/generate?prompt=hi'

``curl -N`` prints each token as it arrives (JSON lines; Server-Sent Events when the
request accepts ``text/event-stream``). Stop curl mid-stream (Ctrl-C): the generator in
the replica is cancelled, and the replica's log (``servecore logs tinylm``) says
``stopped after N of M tokens: the client went away``.

From Python, ``handle.stream(...)`` yields the same tokens::

    for token in ctl.get_handle("generate").stream({"prompt": "hi"}):
        print(token, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["TinyLM"]

_TEXT = (
    "Once upon a time a small model lived on two shared cores . Every morning it "
    "woke , read a prompt , and answered it one token at a time , so that nobody "
    "had to wait for the whole story to see how it began . The end ."
)
_STORY = _TEXT.split()


class TinyLM:
    """A pretend language model: replies with a fixed story, one token per step."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s

    async def __call__(self, request: dict[str, Any]) -> AsyncIterator[str]:
        prompt = str(request.get("prompt", ""))
        max_tokens = int(request.get("max_tokens", len(_STORY)))
        tokens = _STORY[: max(0, max_tokens)]
        sent = 0
        try:
            for token in tokens:
                await asyncio.sleep(float(request.get("delay_s", self.delay_s)))
                yield token + " "
                sent += 1
            print(f"TinyLM: answered {prompt[:40]!r} with {sent} tokens", flush=True)
        except (GeneratorExit, asyncio.CancelledError):
            print(
                f"TinyLM: stopped after {sent} of {len(tokens)} tokens: the client went away",
                file=sys.stderr,
                flush=True,
            )
            raise
