"""Strategies (``--strategy``): one class per family, each in its module, behind the registry
in ``base``. Importing this package registers them, in the order the help lists them; a new
strategy is one module here and its name in ``_MODULES``."""

from importlib import import_module

from linearize.surgery.prune.strategies.base import (
    Strategy,
    get,
    names,
    natural,
    ranking,
    register,
    replacement_error,
)

_MODULES = ("linear", "influence", "blocks", "ppl", "user", "depth", "periods", "search")
for _name in _MODULES:
    import_module(f"{__name__}.{_name}")

__all__ = ["Strategy", "get", "names", "natural", "ranking", "register", "replacement_error"]
