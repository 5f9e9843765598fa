"""Depth pruning: which layers to remove (strategies) and what stands in for them (replacements).

Strategies (``--strategy``):
- ``linear-greedy`` (the paper): k times, score every remaining layer on the calibration
  tokens through the current, already pruned and patched model, remove the best one, fit
  its replacement there;
- ``linear-oneshot``: rank once on the original model;
- ``block-influence`` (ShortGPT): the k layers with the lowest 1 − cos(input, output);
- ``layers``: the user's own list.

Replacements (``--replace``): ``none`` drops the layers; ``linear`` puts an affine map fitted
by least squares on raw states (float64 normal equations, optional ridge) where each run of
removed layers was (see linearize.replace).

Every layer index a user sees is 0-based in the original model's numbering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from linearize import arch, data
from linearize.capture import collect_stats
from linearize.errors import LinearizeError
from linearize.replace import replace_layer_
from linearize.stats import PairStats, fit_affine

STRATEGIES = ("linear-greedy", "linear-oneshot", "block-influence", "layers")
REPLACEMENTS = ("none", "linear")
SCORES = ("linearity", "linearity_no_residual", "replacement_error")


def replacement_error(stats: PairStats, ridge: float = 0.0) -> float:
    """‖XW + b − Y‖²_F / ‖Y‖²_F for the fitted affine map: the share of the residual stream's
    energy the replacement would get wrong (lower is better). Unlike 1 − linearity, it is
    measured against the raw stream, mean included, which is what the next layer sees."""
    fit = fit_affine(stats, ridge)
    w, b = fit.weight, fit.bias
    # ‖XW + 1bᵀ − Y‖² expanded in the raw moments (n, Σx, Σy, XᵀX, XᵀY, YᵀY)
    xwtxw = torch.trace(w.T @ stats.xx @ w)
    cross = torch.trace(w.T @ stats.xy)
    err = (xwtxw - 2 * cross + torch.trace(stats.yy) + stats.n * b @ b
           + 2 * b @ (w.T @ stats.sx) - 2 * b @ stats.sy)  # fmt: skip
    return float(err / torch.trace(stats.yy))


def parse_remove(remove: str | int, n_layers: int) -> int:
    """'8' → 8; '25%' → round(0.25·n). Refuses 0 or ≥ n (a model needs one layer)."""
    text = str(remove).strip()
    try:
        k = round(float(text[:-1]) / 100 * n_layers) if text.endswith("%") else int(text)
    except ValueError:
        raise LinearizeError(f"--remove takes a count or a percentage, got '{remove}'") from None
    if k < 1:
        raise LinearizeError(f"--remove {remove} removes no layer")
    if k >= n_layers:
        raise LinearizeError(
            f"--remove {remove} would remove all {n_layers} layers (k >= {n_layers})"
        )
    return k


@dataclass
class PruneConfig:
    """One pruning request; every command and API entry point takes this."""

    remove: str | int = 8  # layers to remove: a count (8) or a share ("25%")
    strategy: str = "linear-greedy"  # linear-greedy | linear-oneshot | block-influence | layers
    replace: str = "linear"  # none | linear
    score: str = "linearity"  # linearity | linearity_no_residual | replacement_error
    layers: list[int] | None = None  # with strategy "layers": original 0-based indices
    calib: str = "builtin:calib"  # calibration data source
    tokens: int = 32768  # calibration tokens
    seq_len: int = 512  # tokens per calibration sequence
    batch_size: int = 8  # sequences per forward pass
    ridge: float = 0.0  # ridge for the linear fits, relative to tr(XᵀX)/d

    def check(self, n: int) -> int:
        """Validate against a model of ``n`` layers; returns k. No work is done."""
        if self.strategy not in STRATEGIES:
            raise LinearizeError(
                f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})"
            )
        if self.replace not in REPLACEMENTS:
            raise LinearizeError(
                f"unknown replacement '{self.replace}' (choose from {', '.join(REPLACEMENTS)})"
            )
        if self.score not in SCORES:
            raise LinearizeError(f"unknown score '{self.score}' (choose from {', '.join(SCORES)})")
        if self.strategy == "layers":
            if not self.layers:
                raise LinearizeError("--strategy layers needs --layers, e.g. --layers 3,7,9")
            if len(set(self.layers)) != len(self.layers):
                raise LinearizeError(f"duplicate layer indices in --layers {list(self.layers)}")
            bad = [i for i in self.layers if not 0 <= i < n]
            if bad:
                raise LinearizeError(f"--layers {bad} out of range: the model has {n} layers")
            if len(self.layers) >= n:
                raise LinearizeError(f"--layers names all {n} layers; at least one must stay")
            k = len(self.layers)
        else:
            k = parse_remove(self.remove, n)
        return k


@dataclass
class PruneResult:
    """What was removed, in removal order, with the score that chose each layer."""

    chosen_by: str  # the score's name, "block_influence", or "user"
    removed: list[int]
    steps: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _score(stats: PairStats, key: str, ridge: float) -> float:
    """Higher = remove first."""
    if key == "replacement_error":
        return -replacement_error(stats, ridge)
    if key == "block_influence":
        return -(1.0 - float(stats.cos_sum / stats.n))
    return stats.scores()[key]


def prune_model_(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    on_step: Callable[[dict], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place; returns what was removed (original numbering)."""
    start = time.perf_counter()
    c = config
    n = arch.n_layers(model)
    k = c.check(n)
    seqs = list(data.token_sequences(tokenizer, c.calib, c.seq_len, c.tokens))
    if not seqs:
        raise LinearizeError(f"calibration source '{c.calib}' gave no tokens")
    batches = list(data.batches(seqs, c.batch_size, data.pad_id_of(tokenizer)))

    alive = list(range(n))  # alive[p] = original index of the layer now at position p
    chosen_by = {"layers": "user", "block-influence": "block_influence"}.get(c.strategy, c.score)
    result = PruneResult(chosen_by, [])

    def remove_at(p: int, stats: PairStats | None, chosen_score: float | None) -> None:
        fit = fit_affine(stats, c.ridge) if c.replace == "linear" and stats is not None else None
        step = {"step": len(result.removed), "layer": alive[p], "score": chosen_score}
        replace_layer_(model, p, fit)
        result.removed.append(alive.pop(p))
        result.steps.append(step)
        if on_step is not None:
            on_step(step)

    if c.strategy == "linear-greedy":
        for _ in range(k):
            stats = collect_stats(model, batches)
            result.forward_passes += len(batches)
            scored = {p: _score(s, c.score, c.ridge) for p, s in stats.items()}
            best = max(scored, key=scored.get)
            remove_at(best, stats[best], scored[best])
        result.elapsed_s = round(time.perf_counter() - start, 2)
        return result

    # one-shot strategies: rank once on the original model
    if c.strategy == "layers":
        chosen = {i: None for i in c.layers}
    else:
        stats = collect_stats(model, batches)
        result.forward_passes += len(batches)
        scored = {p: _score(s, chosen_by, c.ridge) for p, s in stats.items()}
        chosen = {p: scored[p] for p in sorted(scored, key=scored.get, reverse=True)[:k]}
    # remove in ascending order, each fit in the model as it is then (upstream cuts included)
    for orig in sorted(chosen):
        p = alive.index(orig)
        stats = None
        if c.replace == "linear":
            stats = collect_stats(model, batches, layers=[p])[p]
            result.forward_passes += len(batches)
        remove_at(p, stats, chosen[orig])
    result.elapsed_s = round(time.perf_counter() - start, 2)
    return result


def prune(
    model: str | None = None,
    config: PruneConfig | None = None,
    eval_data: str | None = "builtin:eval",
    eval_tokens: int = 16384,
    out: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Load, prune, evaluate before/after, and write a loadable checkpoint to ``out``.

    Everything that can be checked is checked before the model is loaded: the output
    directory, the data sources, the layer count against ``remove`` / ``layers``.
    """
    from linearize import __version__, models
    from linearize._io import atomic_dir, check_writable_dir, write_json
    from linearize.evaluate import perplexity
    from linearize.replace import save

    c = config or PruneConfig()
    out_dir = Path(out) if out is not None else Path("linearize-out") / "pruned"
    check_writable_dir(out_dir)
    hf_config = models.load_config(model)
    n = getattr(hf_config, arch.n_layers_key(hf_config))
    c.check(n)
    data.resolve_source(c.calib)
    if eval_data:
        data.resolve_source(eval_data)
    lm, tok = models.load(model, dtype=dtype, device=device)

    def held_out_ppl() -> float | None:
        if not eval_data:
            return None
        return perplexity(lm, tok, eval_data, c.seq_len, eval_tokens, c.batch_size)

    ppl_before = held_out_ppl()
    res = prune_model_(lm, tok, c, on_step)
    ppl_after = held_out_ppl()
    record = {"base_model": model or models.EMBEDDED_NAME, "original_layers": n,
              **asdict(c), **res.to_dict(), "version": __version__}  # fmt: skip
    report = {**record, "eval_data": eval_data, "eval_tokens": eval_tokens,
              "perplexity_before": ppl_before, "perplexity_after": ppl_after}  # fmt: skip

    def write(tmp: Path) -> None:
        save(lm, tok, tmp, record)
        write_json(tmp / "prune.json", report)

    atomic_dir(out_dir, write)
    return report
