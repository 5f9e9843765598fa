"""The ``linearize`` command: a thin typer layer over the Python API.

``runtime`` holds what every command shares (the app, one error line and exit status 2,
signals, options built from config dataclasses), ``progress`` the progress lines, and one
module per family of commands registers its commands on import.
"""

from __future__ import annotations

from importlib import import_module

from linearize.cli.runtime import app

# each module registers its commands on import; this order is the order of ``--help``
for _family in ("analysis", "pruning", "training", "evaluation"):
    import_module(f"{__name__}.{_family}")


@app.callback()
def _root() -> None:
    """linearize: per-layer linearity of decoder LMs, and pruning, healing and pretraining."""


def main() -> None:
    app()


__all__ = ["app", "main"]
