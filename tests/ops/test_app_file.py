"""The app file: parsed by its schema; every invalid file names file, key path and value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import servecore
from servecore.app import MAX_APP_FILE_BYTES, AppFileError, load_app, parse_app, read_app_text

GOOD = """
[backends.v1]
target = "servecore.testing.targets:Echo"
init_kwargs = { prefix = ">" }
num_replicas = 2
max_batch_size = 4
batch_wait_timeout_s = 0
user_config = { threshold = 0.5 }
runtime_options = { startup_timeout_s = 30 }

[backends.v2]
target = "servecore.testing.targets:echo"

[endpoints.main]
route = "/main"
methods = ["get", "POST"]
traffic = { v1 = 0.75, v2 = 0.25 }
shadow = { v2 = 0.5 }

[endpoints.internal]
route = ""
http_request = true

[endpoints.plain]
traffic = { v2 = 1 }
"""


def test_a_good_file_reads_as_the_api_would_take_it(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_text(GOOD)
    app = load_app(path)
    assert app.source == str(path)
    v1 = app.backends["v1"]
    assert v1.target == "servecore.testing.targets:Echo"
    assert v1.init_kwargs == {"prefix": ">"}
    assert v1.config == servecore.BackendConfig(
        num_replicas=2,
        max_batch_size=4,
        user_config={"threshold": 0.5},
        runtime_options={"startup_timeout_s": 30},
    )
    assert app.backends["v2"].config == servecore.BackendConfig()  # unset keys: defaults
    main = app.endpoints["main"]
    assert (main.route, main.methods) == ("/main", ("GET", "POST"))
    assert (main.traffic, main.shadow) == ({"v1": 0.75, "v2": 0.25}, {"v2": 0.5})
    assert app.endpoints["internal"].route is None  # "" serves no HTTP route
    assert app.endpoints["internal"].http_request is True
    assert main.http_request is False  # unset: the JSON value, as before
    assert app.endpoints["plain"].route == "/plain"  # default: /<name>
    assert app.endpoints["plain"].methods == ("GET",)


def test_the_example_app_file_is_valid() -> None:
    app = load_app(Path(__file__).parents[2] / "examples" / "app.toml")
    assert set(app.backends) == {"sentiment-v1", "sentiment-v2"}
    assert app.endpoints["sentiment"].route == "/sentiment"


BAD = [
    # (what, file text, key path, bad value)
    (
        "wrong type",
        '[backends.v1]\ntarget = "m:f"\nnum_replicas = "two"\n',
        "backends.v1.num_replicas",
        "two",
    ),
    (
        "negative replicas",
        '[backends.v1]\ntarget = "m:f"\nnum_replicas = -1\n',
        "backends.v1.num_replicas",
        -1,
    ),
    (
        "unknown backend key",
        '[backends.v1]\ntarget = "m:f"\nreplicas = 2\n',
        "backends.v1.replicas",
        2,
    ),
    (
        "unknown top-level table",
        '[backend.v1]\ntarget = "m:f"\n',
        "backend",
        {"v1": {"target": "m:f"}},
    ),
    (
        "unknown endpoint key",
        '[endpoints.e]\nrout = "/e"\n',
        "endpoints.e.rout",
        "/e",
    ),
    ("missing target", "[backends.v1]\nnum_replicas = 1\n", "backends.v1.target", None),
    ("malformed target", '[backends.v1]\ntarget = "no_colon"\n', "backends.v1.target", "no_colon"),
    (
        "traffic to a backend the file does not declare",
        '[backends.v1]\ntarget = "m:f"\n[endpoints.e]\ntraffic = { v1 = 0.5, nope = 0.5 }\n',
        "endpoints.e.traffic.nope",
        0.5,
    ),
    (
        "shadow to a backend the file does not declare",
        "[endpoints.e]\nshadow = { ghost = 0.1 }\n",
        "endpoints.e.shadow.ghost",
        0.1,
    ),
    (
        "weights that do not sum to 1",
        '[backends.v1]\ntarget = "m:f"\n[endpoints.e]\ntraffic = { v1 = 0.5 }\n',
        "endpoints.e.traffic",
        {"v1": 0.5},
    ),
    (
        "a method that is not HTTP",
        '[endpoints.e]\nmethods = ["GET", "FETCH"]\n',
        "endpoints.e.methods",
        ["GET", "FETCH"],
    ),
    ("a route without a slash", '[endpoints.e]\nroute = "e"\n', "endpoints.e.route", "e"),
    (
        "two endpoints on one route",
        '[endpoints.a]\nroute = "/x"\n[endpoints.b]\nroute = "/x"\n',
        "endpoints.b.route",
        "/x",
    ),
    (
        "a list item of the wrong type",
        '[endpoints.e]\nmethods = ["GET", 3]\n',
        "endpoints.e.methods[1]",
        3,
    ),
    (
        "autoscaling with a bad bound",
        '[backends.v1]\ntarget = "m:f"\n[backends.v1.autoscaling]\nmax_replicas = -4\n',
        "backends.v1.autoscaling.max_replicas",
        -4,
    ),
    (
        "autoscaling beside num_replicas",
        '[backends.v1]\ntarget = "m:f"\nnum_replicas = 2\n[backends.v1.autoscaling]\n',
        "backends.v1.num_replicas",
        2,
    ),
    (
        "a traffic weight of the wrong type",
        '[backends.v1]\ntarget = "m:f"\n[endpoints.e]\ntraffic = { v1 = "all" }\n',
        "endpoints.e.traffic.v1",
        "all",
    ),
    (
        "a shadow weight of the wrong type, under a quoted key",
        '[backends."v.1"]\ntarget = "m:f"\n[endpoints.e]\nshadow = { "v.1" = true }\n',
        'endpoints.e.shadow."v.1"',
        True,
    ),
    (
        "the second of two traffic weights",
        '[backends.a]\ntarget = "m:f"\n[backends.b]\ntarget = "m:f"\n'
        "[endpoints.e]\ntraffic = { a = 0.5, b = [0.5] }\n",
        "endpoints.e.traffic.b",
        [0.5],
    ),
    (
        "a route under the operator prefix",
        '[endpoints.e]\nroute = "/-/healthz"\n',
        "endpoints.e.route",
        "/-/healthz",
    ),
    (
        "a runtime option that is not JSON-shaped",
        '[backends.v1]\ntarget = "m:f"\nruntime_options = { when = 1979-05-27 }\n',
        "backends.v1.runtime_options",
        None,
    ),
]


@pytest.mark.parametrize(("what", "text", "key", "value"), BAD, ids=[b[0] for b in BAD])
def test_an_invalid_file_names_file_key_and_value(
    tmp_path: Path, what: str, text: str, key: str, value: object
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(AppFileError) as info:
        load_app(path)
    err = info.value
    assert isinstance(err, servecore.CommandError)
    assert (err.file, err.key) == (str(path), key), str(err)
    message = str(err)
    assert message.startswith(f"{path}: {key}"), message
    if value is not None:
        assert err.value == value
        assert repr(value)[:60] in message


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(AppFileError, match=r"bad\.toml: not valid TOML: .*line 2"):
        parse_app("[backends.v1]\ntarget = \n", "bad.toml")


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(AppFileError, match="known keys here: target, init_args"):
        parse_app('[backends.v1]\ntarget = "m:f"\nreplicas = 2\n', "app.toml")


def test_an_autoscaling_backend_is_read_from_its_table(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_text(
        '[backends.v1]\ntarget = "m:f"\n'
        "[backends.v1.autoscaling]\nmin_replicas = 0\nmax_replicas = 4\n"
        "target_ongoing_requests = 3\n"
    )
    spec = load_app(path).backends["v1"]
    scaling = spec.config.autoscaling
    assert scaling is not None and spec.config.num_replicas is None
    assert (scaling.min_replicas, scaling.max_replicas) == (0, 4)
    assert scaling.target_ongoing_requests == 3


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "app.toml"
    os.mkfifo(fifo)
    with pytest.raises(AppFileError, match="is a pipe or FIFO; an app file must be a regular"):
        load_app(fifo)


def test_a_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AppFileError, match="/dev/null: is not a regular file"):
        load_app("/dev/null")


def test_a_file_over_the_size_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "weights.toml"
    with open(path, "wb") as f:
        f.truncate(MAX_APP_FILE_BYTES + 1)
    with pytest.raises(AppFileError, match=f"is {MAX_APP_FILE_BYTES + 1} bytes, over the"):
        load_app(path)


def test_the_file_is_read_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.toml"
    path.write_text(GOOD)
    opened: list[str] = []
    real_open = os.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    assert read_app_text(path) == GOOD
    assert opened == [str(path)]


# -- the [server] table -------------------------------------------------------------------


def test_the_server_table_is_read_and_left_out_of_the_app() -> None:
    text = """
[backends.echo]
target = "servecore.testing.targets:Echo"

[server]
runtime = "subprocess"
runtime_options = { startup_timeout_s = 60 }
host = "0.0.0.0"
port = 9000
workers = 2
store = "state/app.db"
name = "project"
"""
    app = parse_app(text, "app.toml")
    server = app.server
    assert (server.runtime, server.port, server.workers) == ("subprocess", 9000, 2)
    assert server.runtime_options == {"startup_timeout_s": 60}
    assert (server.host, server.store, server.name) == ("0.0.0.0", "state/app.db", "project")
    assert server.state_dir is None
    assert app == parse_app(text.split("[server]")[0], "app.toml")  # not part of the app


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("prot = 1", "app.toml: server.prot = 1: unknown key; known keys here: runtime,"),
        ('port = "80"', "app.toml: server.port = '80': Expected int, got str"),
        ("port = 70000", "app.toml: server.port = 70000: must be a port number"),
        ("workers = -1", "app.toml: server.workers = -1: must be from 0"),
        ('name = "../x"', "app.toml: server.name = '../x': controller name"),
        ('store = ""', "app.toml: server.store = '': must be a non-empty string"),
        ("runtime = 3", "app.toml: server.runtime = 3: Expected str, got int"),
    ],
)
def test_a_bad_server_table_names_its_key(table: str, message: str) -> None:
    with pytest.raises(AppFileError) as caught:
        parse_app(f"[server]\n{table}\n", "app.toml")
    assert str(caught.value).startswith(message)
    assert caught.value.key.startswith("server.")
