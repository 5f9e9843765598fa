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
from collections.abc import Callable, Sequence
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
class PruneResult:
    """What was removed, in removal order, with the score that chose each layer."""

    strategy: str
    replace: str
    score: str
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


def check_request(
    remove: str | int, strategy: str, replace: str, score: str,
    layers: Sequence[int] | None, n: int,
) -> int:  # fmt: skip
    """Validate a pruning request against a model of ``n`` layers; returns k. No work done."""
    if strategy not in STRATEGIES:
        raise LinearizeError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if replace not in REPLACEMENTS:
        raise LinearizeError(
            f"unknown replacement '{replace}' (choose from {', '.join(REPLACEMENTS)})"
        )
    if score not in SCORES:
        raise LinearizeError(f"unknown score '{score}' (choose from {', '.join(SCORES)})")
    if strategy == "layers":
        if not layers:
            raise LinearizeError("--strategy layers needs --layers, e.g. --layers 3,7,9")
        if len(set(layers)) != len(layers):
            raise LinearizeError(f"duplicate layer indices in --layers {list(layers)}")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise LinearizeError(f"--layers {bad} out of range: the model has {n} layers")
        if len(layers) >= n:
            raise LinearizeError(f"--layers names all {n} layers; at least one must stay")
        k = len(layers)
    else:
        k = parse_remove(remove, n)
    return k


def prune_model_(
    model: nn.Module,
    tokenizer,
    remove: str | int,
    strategy: str = "linear-greedy",
    replace: str = "linear",
    score: str = "linearity",
    calib: str = "builtin:calib",
    tokens: int = 32768,
    seq_len: int = 512,
    batch_size: int = 8,
    ridge: float = 0.0,
    layers: Sequence[int] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place; returns what was removed (original numbering)."""
    start = time.perf_counter()
    n = arch.n_layers(model)
    k = check_request(remove, strategy, replace, score, layers, n)
    seqs = list(data.token_sequences(tokenizer, calib, seq_len, tokens))
    if not seqs:
        raise LinearizeError(f"calibration source '{calib}' gave no tokens")
    batches = list(data.batches(seqs, batch_size, data.pad_id_of(tokenizer)))

    alive = list(range(n))  # alive[p] = original index of the layer now at position p
    result = PruneResult(strategy, replace, score if strategy.startswith("linear") else
                         ("block_influence" if strategy == "block-influence" else "user"), [])  # fmt: skip

    def remove_at(p: int, stats: PairStats | None, chosen_by: float | None) -> None:
        fit = fit_affine(stats, ridge) if replace == "linear" and stats is not None else None
        step = {"step": len(result.removed), "layer": alive[p], "score": chosen_by}
        replace_layer_(model, p, fit)
        result.removed.append(alive.pop(p))
        result.steps.append(step)
        if on_step is not None:
            on_step(step)

    if strategy == "linear-greedy":
        for _ in range(k):
            stats = collect_stats(model, batches)
            result.forward_passes += len(batches)
            scored = {p: _score(s, score, ridge) for p, s in stats.items()}
            best = max(scored, key=scored.get)
            remove_at(best, stats[best], scored[best])
        result.elapsed_s = round(time.perf_counter() - start, 2)
        return result

    # one-shot strategies: rank once on the original model
    if strategy == "layers":
        chosen = {i: None for i in layers}
    else:
        stats = collect_stats(model, batches)
        result.forward_passes += len(batches)
        key = "block_influence" if strategy == "block-influence" else score
        scored = {p: _score(s, key, ridge) for p, s in stats.items()}
        chosen = {p: scored[p] for p in sorted(scored, key=scored.get, reverse=True)[:k]}
    # remove in ascending order, each fit in the model as it is then (upstream cuts included)
    for orig in sorted(chosen):
        p = alive.index(orig)
        stats = None
        if replace == "linear":
            stats = collect_stats(model, batches, layers=[p])[p]
            result.forward_passes += len(batches)
        remove_at(p, stats, chosen[orig])
    result.elapsed_s = round(time.perf_counter() - start, 2)
    return result


def prune(
    model: str | None = None,
    remove: str | int = 8,
    strategy: str = "linear-greedy",
    replace: str = "linear",
    score: str = "linearity",
    calib: str = "builtin:calib",
    tokens: int = 32768,
    seq_len: int = 512,
    batch_size: int = 8,
    ridge: float = 0.0,
    layers: Sequence[int] | None = None,
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

    out_dir = Path(out) if out is not None else Path("linearize-out") / "pruned"
    check_writable_dir(out_dir)
    config = models.load_config(model)
    n = getattr(config, arch.n_layers_key(config))
    check_request(remove, strategy, replace, score, layers, n)
    data.resolve_source(calib)
    if eval_data:
        data.resolve_source(eval_data)
    lm, tok = models.load(model, dtype=dtype, device=device)
    ppl_before = (
        perplexity(lm, tok, eval_data, seq_len, eval_tokens, batch_size) if eval_data else None
    )
    res = prune_model_(lm, tok, remove, strategy, replace, score, calib, tokens, seq_len,
                       batch_size, ridge, layers, on_step)  # fmt: skip
    ppl_after = (
        perplexity(lm, tok, eval_data, seq_len, eval_tokens, batch_size) if eval_data else None
    )
    record = {
        "base_model": model or models.EMBEDDED_NAME,
        "original_layers": n,
        **res.to_dict(),
        "calib": calib, "tokens": tokens, "seq_len": seq_len, "ridge": ridge,
        "version": __version__,
    }  # fmt: skip
    report = {**record, "eval_data": eval_data, "eval_tokens": eval_tokens,
              "perplexity_before": ppl_before, "perplexity_after": ppl_after}  # fmt: skip

    def write(tmp: Path) -> None:
        save(lm, tok, tmp, record)
        write_json(tmp / "prune.json", report)

    atomic_dir(out_dir, write)
    return report
