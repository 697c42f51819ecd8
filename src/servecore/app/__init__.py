"""Declarative apps: a TOML file of backends and endpoints, and :func:`apply`.

::

    app = servecore.app.load_app("app.toml")       # AppFileError names file, key, value
    applied = await servecore.apply(ctl, app)       # or ctl.apply(app) on a SyncController

See :mod:`servecore.app._schema` for the file's keys and :mod:`servecore.app._apply`
for the order commands are applied in.
"""

from servecore.app._apply import Applied, apply, check_plan, declared, describe, plan
from servecore.app._schema import (
    MAX_APP_FILE_BYTES,
    App,
    AppFileError,
    BackendSpec,
    EndpointSpec,
    ServerSpec,
    load_app,
    parse_app,
    read_app_text,
)

__all__ = [
    "MAX_APP_FILE_BYTES",
    "App",
    "AppFileError",
    "Applied",
    "BackendSpec",
    "EndpointSpec",
    "ServerSpec",
    "apply",
    "check_plan",
    "declared",
    "describe",
    "load_app",
    "parse_app",
    "plan",
    "read_app_text",
]
