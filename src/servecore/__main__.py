"""``python -m servecore``: the same as the ``servecore`` command."""

from __future__ import annotations


def _main() -> None:
    try:
        from servecore.cli import main
    except ImportError as exc:  # click or rich missing
        raise SystemExit(
            f"the servecore command needs its extra ({exc.name} is missing): "
            f"pip install 'servecore[cli]'"
        ) from None
    main(prog_name="servecore")


if __name__ == "__main__":
    _main()
