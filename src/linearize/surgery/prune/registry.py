"""A registry of named kinds (strategies, replacements): one instance per class, looked up by
name, listed in the order they were registered, an unknown name refused in one line."""

from __future__ import annotations

from typing import Generic, TypeVar

from linearize.errors import LinearizeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # the kind's name in the error line
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make an instance of ``cls`` known by its ``name``."""
        if cls.name in self._items:
            raise ValueError(f"{self.what} '{cls.name}' registered twice")
        self._items[cls.name] = cls()
        return cls

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise LinearizeError(
                f"unknown {self.what} '{name}' (choose from {', '.join(self.names())})"
            )
        return self._items[name]
