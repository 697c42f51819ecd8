"""What ``--store`` and ``--state-dir`` mean: a SQLite file, or a PostgreSQL DSN."""

from __future__ import annotations

from pathlib import Path

import pytest

from servecore import InvalidConfig
from servecore.cli._stores import DEFAULT_STORE, choose_store


def test_a_path_is_a_sqlite_store_whose_directory_is_the_state_directory() -> None:
    choice = choose_store("proj/state.db")
    assert (choice.path, choice.state_dir, choice.is_postgres) == (
        Path("proj/state.db"),
        Path("proj"),
        False,
    )
    assert choose_store(None).path == DEFAULT_STORE


def test_a_state_directory_other_than_a_sqlite_stores_own_is_refused() -> None:
    with pytest.raises(InvalidConfig, match="is for a PostgreSQL --store only"):
        choose_store("proj/state.db", Path("elsewhere"))


def test_a_dsn_keeps_servecores_own_parameters_from_libpq() -> None:
    choice = choose_store(
        "postgresql://me:secret@db:5433/serve?sslmode=disable&checkpoint=my/app&lease_s=2.5"
    )
    assert choice.is_postgres
    assert choice.dsn == "postgresql://me:secret@db:5433/serve?sslmode=disable"
    assert (choice.checkpoint, choice.lease_s) == ("my/app", 2.5)
    # Each checkpoint its own state directory, under the current one by default.
    assert choice.state_dir == Path(".servecore/postgres-my_app")
    assert choice.anchor.parent == choice.state_dir
    assert "secret" not in choice.label and "'my/app'" in choice.label


def test_a_dsn_takes_a_state_directory_and_defaults_its_checkpoint() -> None:
    choice = choose_store("postgres://db/serve", Path("/srv/serve"))
    assert (choice.checkpoint, choice.lease_s, choice.state_dir) == (
        "servecore",
        None,
        Path("/srv/serve"),
    )


@pytest.mark.parametrize("lease", ["0", "-1", "soon", "inf"])
def test_a_bad_lease_is_refused(lease: str) -> None:
    with pytest.raises(InvalidConfig, match="lease_s"):
        choose_store(f"postgresql://db/serve?lease_s={lease}")
