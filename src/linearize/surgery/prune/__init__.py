"""Depth pruning: which layers to remove (strategies) and what stands in for them (replacements).

The package: ``config`` (the request and the record), ``session`` (the engine: calibration
states, fits, the run loop; it never names a strategy), ``strategies/`` (one class per family
behind a registry that validation, the CLI's help and ``--sweep`` read; ``linearize prune
--help`` and docs/prune.md list them with their sources), ``replacements`` (none / linear /
fold), ``reconstruct`` (closed-form refits of the kept layers after each cut) and ``api``
(``prune``, ``prune_model_``).

Non-greedy strategies choose the whole set first, then replace each contiguous run with one
fit, in ascending order, so every fit sees the model as upstream cuts left it. Every layer
index a user sees is 0-based in the original model's numbering.
"""

from linearize.surgery.prune.api import prune, prune_model_
from linearize.surgery.prune.config import (
    FIT_TARGETS,
    SCORES,
    Progress,
    PruneConfig,
    PruneResult,
    no_progress,
    parse_remove,
)
from linearize.surgery.prune.replacements import names as _replacement_names
from linearize.surgery.prune.strategies import names as _strategy_names
from linearize.surgery.prune.strategies import replacement_error
from linearize.surgery.replace import runs_of

STRATEGIES = _strategy_names()
REPLACEMENTS = _replacement_names()

__all__ = [
    "FIT_TARGETS",
    "REPLACEMENTS",
    "SCORES",
    "STRATEGIES",
    "Progress",
    "PruneConfig",
    "PruneResult",
    "no_progress",
    "parse_remove",
    "prune",
    "prune_model_",
    "replacement_error",
    "runs_of",
]
