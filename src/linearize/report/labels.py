"""What the pages share: reading a run's JSON, versions, durations, how a command line names
a model."""

from __future__ import annotations

import json
from pathlib import Path

from linearize.errors import LinearizeError
from linearize.models import EMBEDDED_NAME

SCORE_KEYS = ("linearity", "linearity_no_residual", "cosine", "block_influence", "angular_distance")


def num(value: float | None, digits: int = 4) -> str:
    """A number for a person: ``digits`` significant digits (what a perplexity on a few
    thousand tokens resolves), "n/a" for one that was not measured."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def versions(d: dict) -> str:
    cfg = d.get("config") or {}
    parts = [f"linearize {d.get('version', '?')}"]
    parts += [f"{lib} {cfg[lib]}" for lib in ("torch", "transformers") if cfg.get(lib)]
    return ", ".join(parts)


def seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def model_arg(name: str) -> str:
    """How a command line names the model: nothing for the embedded default."""
    return "" if name in (EMBEDDED_NAME, "embedded") else f" {name}"


def slug(name: str) -> str:
    tail = Path(name.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LinearizeError(f"cannot read '{path}': {type(e).__name__}") from None
    if not isinstance(d, dict):
        raise LinearizeError(f"'{path}' is not a linearize output (not a JSON object)")
    return d
