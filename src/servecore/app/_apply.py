"""From an app file to commands: the difference between what is and what should be.

:func:`plan` is pure: given the current :class:`~servecore.State` and an :class:`App`,
it returns the shortest list of commands that makes the state declare exactly the app,
in an order no command of which can trip :class:`~servecore.BackendInUse`, a route
conflict or a traffic check:

1. **detach** what must be rebuilt: an endpoint whose route or methods changed (or
   whose traffic the file empties) is deleted, and so is one the file drops whose
   route another endpoint takes (the core has no command to change a route in place);
2. **backends**: create new ones; a backend whose target, init arguments or config
   changed is given its new definition in place (:class:`UpdateBackend`, or
   :class:`SetBackendConfig` when only the config changed), so its replicas roll, old
   ones serving until new ones run, and the endpoints routing to it are never deleted
   and never answer 404 during the change; a FAILED backend the file restates as it is
   is retried (:class:`RetryBackend`), since applying it again means "try again";
3. **endpoints**: create the new ones, then set traffic and shadows that differ;
4. **delete** what the file no longer names: endpoints first, then backends.

Applying the same file again plans nothing; applying after a crash half-way plans
only what is still missing, so applying again converges.

:func:`apply` is all or nothing for what can be known in advance: before the first
command is submitted, :func:`check_plan` steps the whole plan through the pure core,
with the controller's :class:`~servecore.Limits`, on a copy of the current state. A
plan any command of which would be refused changes nothing. (A replica that fails to
start is found only by starting it; that is reported in :attr:`Applied.failed`.)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import attrs

from servecore._core.errors import BackendStartError, CommandError, InvalidConfig
from servecore._core.limits import Limits
from servecore._core.messages import describe
from servecore._core.transitions import (
    BackendStatus,
    Command,
    CreateBackend,
    CreateEndpoint,
    DeleteBackend,
    DeleteEndpoint,
    RetryBackend,
    SetBackendConfig,
    SetShadowTraffic,
    SetTraffic,
    State,
    UpdateBackend,
    UpdateEndpoint,
    step,
)
from servecore.app._schema import App, AppFileError, BackendSpec, EndpointSpec, load_app

__all__ = ["Applied", "apply", "check_plan", "declared", "describe", "plan"]

log = logging.getLogger("servecore.app")


def _same_code(spec: BackendSpec, state: State) -> bool:
    b = state.backends[spec.tag]
    return (b.target, b.init_args, b.init_kwargs) == (spec.target, spec.init_args, spec.init_kwargs)


def plan(state: State, app: App) -> list[Command]:
    """The commands that make ``state`` declare exactly ``app``, in a safe order."""
    detach: list[Command] = []
    create: list[Command] = []
    wire: list[Command] = []
    delete: list[Command] = []

    # What the state will hold after the detach phase, tracked as the plan goes.
    endpoints = dict(state.endpoints)

    def delete_endpoint(name: str) -> None:
        detach.append(DeleteEndpoint(name=name))
        del endpoints[name]

    wanted_routes = {e.route: e.name for e in app.endpoints.values() if e.route is not None}
    for name, ep in sorted(state.endpoints.items()):
        spec = app.endpoints.get(name)
        if spec is None:
            owner = wanted_routes.get(ep.route) if ep.route is not None else None
            if owner is not None and owner != name:
                delete_endpoint(name)  # its route is about to be taken
        elif ep.traffic and not spec.traffic:
            delete_endpoint(name)  # no command takes an endpoint's traffic away
        elif (ep.route, tuple(ep.methods), ep.http_request) != (
            spec.route,
            spec.methods,
            spec.http_request,
        ):
            holder = next(
                (
                    other
                    for other, o in state.endpoints.items()
                    if other != name and spec.route is not None and o.route == spec.route
                ),
                None,
            )
            if holder is None:
                # Moved in place: its traffic and handles stay, and queries meet no gap.
                detach.append(
                    UpdateEndpoint(
                        name=name,
                        route=spec.route,
                        methods=spec.methods,
                        http_request=spec.http_request,
                    )
                )
            else:
                delete_endpoint(name)  # another endpoint gives up that route first

    for tag, bspec in sorted(app.backends.items()):
        current = state.backends.get(tag)
        if current is None:
            create.append(
                CreateBackend(
                    tag=tag,
                    target=bspec.target,
                    init_args=bspec.init_args,
                    init_kwargs=bspec.init_kwargs,
                    config=bspec.config,
                )
            )
        elif not _same_code(bspec, state):
            # New code or arguments: roll in place, never delete and recreate.
            create.append(
                UpdateBackend(
                    tag=tag,
                    target=bspec.target,
                    init_args=bspec.init_args,
                    init_kwargs=bspec.init_kwargs,
                    config=bspec.config,
                )
            )
        elif current.config != bspec.config:
            create.append(SetBackendConfig(tag=tag, config=bspec.config))
        elif current.status is BackendStatus.FAILED:
            create.append(RetryBackend(tag=tag))

    for name, spec in sorted(app.endpoints.items()):
        current_ep = endpoints.get(name)
        if current_ep is None:
            wire.append(
                CreateEndpoint(
                    name=name,
                    route=spec.route,
                    methods=spec.methods,
                    http_request=spec.http_request,
                )
            )
            traffic: dict[str, float] = {}
            shadow: dict[str, float] = {}
        else:
            traffic = dict(current_ep.traffic)
            shadow = dict(current_ep.shadow)
        if spec.traffic and traffic != spec.traffic:
            wire.append(SetTraffic(endpoint=name, traffic=spec.traffic))
        for tag in sorted(set(shadow) | set(spec.shadow)):
            if shadow.get(tag, 0.0) != spec.shadow.get(tag, 0.0):
                proportion = spec.shadow.get(tag, 0.0)
                wire.append(SetShadowTraffic(endpoint=name, backend=tag, proportion=proportion))

    for name in sorted(endpoints):
        if name not in app.endpoints:
            delete.append(DeleteEndpoint(name=name))
    for tag in sorted(state.backends):
        if tag not in app.backends:
            delete.append(DeleteBackend(tag=tag))
    return [*detach, *create, *wire, *delete]


def _key_of(command: Command, exc: CommandError) -> str:
    """The app file's key path for what ``command`` was refused for."""
    if isinstance(
        command, (CreateBackend, UpdateBackend, SetBackendConfig, RetryBackend, DeleteBackend)
    ):
        at = f"backends.{command.tag}"
        if isinstance(exc, InvalidConfig) and exc.field and " " not in exc.field:
            return f"{at}.{exc.field}"
        return at
    name = getattr(command, "name", None) or getattr(command, "endpoint", "")
    return f"endpoints.{name}"


def check_plan(state: State, commands: list[Command], limits: Limits, source: str) -> None:
    """Step ``commands`` one after the other through the pure core from ``state``, as
    the controller would, with its ``limits``; raise :class:`AppFileError` naming the
    first one refused. Nothing is submitted, so a refused plan changes nothing."""
    for command in commands:
        try:
            limits.check(command)
            state = step(state, command).state
        except CommandError as exc:
            value = getattr(exc, "value", None)
            raise AppFileError(
                source,
                _key_of(command, exc),
                value,
                f"{exc}; nothing was applied (the plan was refused at: {describe(command)})",
            ) from exc


@attrs.frozen(kw_only=True)
class Applied:
    """What :func:`apply` did: the commands it ran, in order, and the backends whose
    replicas failed to start (tag -> the replica's own error; they stay FAILED, as
    ``servecore status`` shows, until their definition changes or they are retried:
    ``servecore retry TAG``, or applying the same file again)."""

    commands: tuple[Command, ...]
    failed: dict[str, str] = attrs.field(factory=dict)

    @property
    def changed(self) -> bool:
        """Whether anything was changed."""
        return bool(self.commands)


async def apply(controller: Any, app: App | str | os.PathLike[str]) -> Applied:
    """Make ``controller`` declare exactly ``app`` (an :class:`App`, or the path of an
    app file), by the commands :func:`plan` gives, one after the other::

        applied = await servecore.apply(ctl, "app.toml")

    Re-applying the same app does nothing. A plan that the core or the controller's
    limits would refuse at any command raises :class:`AppFileError` before the first
    command is submitted, so it changes nothing. A backend whose replicas fail to
    start is reported in :attr:`Applied.failed` and the rest of the app is still
    applied; any other error stops here, and applying again carries on where this
    stopped.
    """
    if not isinstance(app, App):
        app = load_app(app)
    commands = plan(controller.state, app)
    limits = getattr(controller, "limits", None)
    if not isinstance(limits, Limits):
        limits = Limits()  # a controller-like object without limits: the defaults
    check_plan(controller.state, commands, limits, app.source)
    failed: dict[str, str] = {}
    for command in commands:
        log.info("apply %s: %s", app.source, describe(command))
        try:
            await controller.submit(command)
        except BackendStartError as exc:
            failed[exc.tag] = exc.reason
            log.warning("apply %s: %s", app.source, exc)
    for tag in app.backends:
        b = controller.state.backends.get(tag)
        if b is not None and b.status is BackendStatus.FAILED and tag not in failed:
            failed[tag] = b.last_error or "unknown error"
    return Applied(commands=tuple(commands), failed=failed)


def declared(state: State) -> App:
    """The :class:`App` a state declares (replicas, status and counters aside): two
    states that declare the same app serve the same thing."""
    return App(
        backends={
            tag: BackendSpec(
                tag=tag,
                target=b.target,
                init_args=b.init_args,
                init_kwargs=b.init_kwargs,
                config=b.config,
            )
            for tag, b in sorted(state.backends.items())
        },
        endpoints={
            name: EndpointSpec(
                name=name,
                route=ep.route,
                methods=tuple(ep.methods),
                http_request=ep.http_request,
                traffic=dict(sorted(ep.traffic.items())),
                shadow=dict(sorted(ep.shadow.items())),
            )
            for name, ep in sorted(state.endpoints.items())
        },
    )
