"""What the test kit needs beyond servecore itself, checked before anything imports it."""

from __future__ import annotations

import importlib.util

#: Modules the kit imports that a plain install of servecore does not include.
REQUIRED = ("hypothesis",)

_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"servecore.testing needs {', '.join(_missing)}, which a plain install of servecore "
        f"does not include; install the testing extra: pip install 'servecore[testing]'",
        name=_missing[0],
    )
