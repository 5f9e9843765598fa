"""Config fields that carry their command-line help, so each option of a command is declared
once, in its config dataclass: name, type, default and help. ``cli.with_config`` turns the
fields into the command's options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any

from linearize.errors import LinearizeError


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    cli: type | None = None,
    parse: Callable[[Any], Any] | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field with its ``help``. ``cli`` is the type the command line reads when it
    differs from the field's (text for a list), ``parse`` turns that text into the value, and
    ``flag`` names the option when it is not ``--field-name``."""
    meta: dict[str, Any] = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if cli is not None:
        meta["cli"] = cli
    if parse is not None:
        meta["parse"] = parse
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def int_list(text: str | list[int] | None, what: str = "--layers") -> list[int] | None:
    """``"3,7,9"`` → [3, 7, 9]; None or "" → None; a list passes through."""
    if text is None or isinstance(text, list):
        return text
    if not text.strip():
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LinearizeError(f"{what} takes comma-separated integers, got '{text}'") from None


def str_list(text: str | list[str] | None) -> list[str]:
    """``"a, b"`` → ["a", "b"]; a list (a repeated option) passes through; None → []."""
    if text is None:
        return []
    if isinstance(text, list):
        return [t for t in text if t]
    return [t.strip() for t in text.split(",") if t.strip()]


def or_none(text: str | None) -> str | None:
    """'' on the command line means 'skip this part': None."""
    return text or None
