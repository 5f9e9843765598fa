"""``LinearityReport``: the per-layer scores of one analysis run, a plain record.

It knows its own JSON/CSV form and nothing else: ``linearize.analyze`` writes it to disk and
``linearize.report`` draws it, both from its plain rows.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

from linearize._version import __version__

SCORE_KEYS = (
    "linearity",
    "linearity_no_residual",
    "cosine",
    "block_influence",
    "angular_distance",
)


@dataclass
class LinearityReport:
    """Per-layer scores of one model on one set of tokens. ``layers`` rows are plain dicts:
    {"layer", "linearity", "linearity_no_residual", "cosine", "block_influence",
    "angular_distance"[, "anisotropy"]}, layer indices 0-based in the model's own order."""

    model: str
    data: str
    tokens: int
    seq_len: int
    layers: list[dict[str, float]]
    elapsed_s: float = 0.0
    version: str = __version__
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["model", "data", "tokens", "seq_len", "version", "elapsed_s", "layers", "config"]
        return {k: d[k] for k in order}

    def column(self, key: str) -> list[float]:
        return [row[key] for row in self.layers]

    def means(self) -> dict[str, float]:
        """Mean linearity with and without residual over the scored layers: the one-number
        summary that pretraining probes and dynamics plot against step."""
        return {
            f"mean_{k}": sum(self.column(k)) / len(self.layers)
            for k in ("linearity", "linearity_no_residual")
        }

    def to_csv(self) -> str:
        keys = list(self.layers[0].keys()) if self.layers else ["layer", *SCORE_KEYS]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.layers)
        return buf.getvalue()
