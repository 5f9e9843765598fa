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
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    what: str | None = None,
    panel: str | None = None,
) -> Any:
    """A dataclass field with its ``help``. ``cli`` is the type the command line reads when it
    differs from the field's (text for a list), ``parse`` turns that text into the value, and
    ``flag`` names the option when it is not ``--field-name``. ``choices`` are the values it
    takes, or a function giving them now (a registry that can grow; listed in the help,
    checked by ``check_choices``; ``what`` names the field in that error), and ``panel`` the group of options it is shown in by ``--help``."""
    meta: dict[str, Any] = {"help": help}
    for key, value in (("choices", choices), ("what", what), ("panel", panel)):
        if value is not None:
            meta[key] = value
    if flag is not None:
        meta["flag"] = flag
    if cli is not None:
        meta["cli"] = cli
    if parse is not None:
        meta["parse"] = parse
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(f: Any) -> tuple[str, ...] | None:
    """The values a dataclass field declared with ``option(choices=...)`` takes, now."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def check_choices(config: Any) -> None:
    """The one check of every field declared with ``choices``: an unknown value is one line
    that lists the known ones. A ``None`` value (not set) passes."""
    from dataclasses import fields

    for f in fields(config):
        choices, value = choices_of(f), getattr(config, f.name)
        if choices is not None and value is not None and value not in choices:
            what = f.metadata.get("what") or "--" + f.name.replace("_", "-")
            raise LinearizeError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")


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


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value as YAML reads it: ``3`` → 3, ``true`` → True, ``a+b`` → 'a+b'."""
    import yaml

    return yaml.safe_load(text)


def coerce(key: str, value: Any, default: Any) -> Any:
    """YAML reads ``3e-4`` as a string; make each value the type of its field, or say why not.
    A field whose default is None takes any value."""
    if isinstance(default, bool) or default is None or isinstance(default, (str, dict)):
        ok = default is None or isinstance(value, type(default))
        if not ok:
            raise LinearizeError(
                f"config key '{key}' must be a {type(default).__name__}, got {value!r}"
            )
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LinearizeError(f"config key '{key}' must be a number, got {value!r}") from None
    if isinstance(default, int):
        if number != int(number):
            raise LinearizeError(f"config key '{key}' must be an integer, got {value!r}")
        return int(number)
    return number


def _type_parts(f: Any) -> set[str]:
    """The names in a field's annotation (``"str | None"`` → {"str", "None"})."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {p.strip() for p in t.split("|")}


def _is_text(f: Any) -> bool:
    parts = _type_parts(f)
    return "str" in parts and parts <= {"str", "None"}


def _optional(f: Any) -> bool:
    return "None" in _type_parts(f)


def apply_overrides(config: Any, items: dict[str, str], prefix: str = "") -> Any:
    """Set fields of the dataclass ``config`` from ``{name: text}`` (``KEY=VALUE`` arguments),
    each parsed by its field's ``parse`` or as YAML and coerced to the field's type; an unknown
    name is one line that lists the known ones. Returns ``config``, changed in place."""
    from dataclasses import fields

    known = {f.name: f for f in fields(config)}
    for key, text in items.items():
        f = known.get(key)
        if f is None:
            raise LinearizeError(
                f"unknown config key '{prefix}{key}' (known: "
                f"{', '.join(prefix + k for k in sorted(known))})"
            )
        if "parse" in f.metadata:
            value = f.metadata["parse"](text)
        elif _is_text(f):  # prune.calib=2024: text, whatever YAML would make of it
            value = None if _optional(f) and str(text).strip() in ("", "null", "~") else text
        else:
            value = parse_value(text)
            if type(value).__name__ not in _type_parts(f):  # prune.remove=3 is a str | int
                value = coerce(prefix + key, value, getattr(config, key))
        setattr(config, key, value)
    return config
