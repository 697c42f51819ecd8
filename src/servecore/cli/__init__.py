"""The ``servecore`` command line (needs ``pip install 'servecore[cli]'``)."""

from servecore.cli._main import main

__all__ = ["main"]
