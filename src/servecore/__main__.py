"""``python -m servecore``: the same as the ``servecore`` command."""

from __future__ import annotations


def _main() -> None:
    try:
        from servecore.cli import main
    except ImportError as exc:  # click or rich missing
        raise SystemExit(
            f"error: the servecore command needs its extra ({exc.name} is missing); "
            f"install it with: pip install 'servecore[cli]' (in this repository: "
            f"make demo, or .venv/bin/pip install -e '.[cli]')"
        ) from None
    main(prog_name="servecore")


if __name__ == "__main__":
    _main()
