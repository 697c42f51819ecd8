"""The ``servecore`` command line (needs ``pip install 'servecore[cli]'``)."""

from __future__ import annotations

from typing import Any

try:
    from servecore.cli._main import main
except ImportError as _missing:  # click or rich not installed: say what to run
    _name = _missing.name

    def main(*_args: Any, **_kwargs: Any) -> None:  # type: ignore[misc]
        """Say which extra the command needs, in one line, and exit 1."""
        raise SystemExit(
            f"error: the servecore command needs its extra ({_name} is missing); "
            f"install it with: pip install 'servecore[cli]' (in this repository: "
            f"make demo, or .venv/bin/pip install -e '.[cli]')"
        )


__all__ = ["main"]
