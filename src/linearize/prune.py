"""Depth pruning: which layers to remove (strategies) and what stands in for them (replacements).

Strategies (``--strategy``), each faithful to where it comes from:

- ``linear-greedy`` (Razzhigaev et al., the paper): k times, score every remaining layer on
  the calibration tokens through the current, already pruned and patched model, remove the
  best one, fit its replacement there;
- ``linear-oneshot``: rank once on the original model;
- ``block-influence`` (ShortGPT, Men et al. 2024): the k layers with the lowest 1 − cos;
- ``angular-block`` (Gromov et al. 2024 / PruneMe): the contiguous block of k layers with the
  smallest angular distance between its input and output at the last token;
- ``lstsq-block`` (ReplaceMe, Shopkhoev et al. 2025): the contiguous block of k with the
  smallest cosine distance over all tokens, meant to be replaced by one closed-form linear map
  (``--replace linear`` or ``fold``);
- ``ppl-greedy`` (SLEB, Song et al. 2024): k times, remove the layer whose removal raises
  calibration perplexity least;
- ``layers``: the user's own list.

Replacements (``--replace``, see linearize.replace): ``none`` drops the layers; ``linear``
puts one affine map (least squares on raw states, float64 normal equations, optional ridge)
where each run of removed layers was; ``fold`` multiplies that map into the MLP output
projection of the layer before the run, leaving a stock checkpoint.

Non-greedy strategies choose the whole set first, then replace each contiguous run with one
fit, in ascending order, so every fit sees the model as upstream cuts left it. Every layer
index a user sees is 0-based in the original model's numbering.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from linearize import arch, data
from linearize.capture import block_distances, collect_stats, fold_stats, span_stats
from linearize.errors import LinearizeError
from linearize.replace import fold_span_, proj_has_bias, replace_span_
from linearize.stats import PairStats, fit_affine, relative_error

STRATEGIES = ("linear-greedy", "linear-oneshot", "block-influence", "angular-block",
              "lstsq-block", "ppl-greedy", "layers")  # fmt: skip
REPLACEMENTS = ("none", "linear", "fold")
SCORES = ("linearity", "linearity_no_residual", "replacement_error")


def replacement_error(stats: PairStats, ridge: float = 0.0) -> float:
    """‖XW + b − Y‖²_F / ‖Y‖²_F for the fitted affine map: the share of the residual stream's
    energy the replacement would get wrong (lower is better). Unlike 1 − linearity, it is
    measured against the raw stream, mean included, which is what the next layer sees."""
    return relative_error(stats, fit_affine(stats, ridge))


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


def _one_of(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise LinearizeError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")


@dataclass
class PruneConfig:
    """One pruning request; every command and API entry point takes this."""

    remove: str | int = 8  # layers to remove: a count (8) or a share ("25%")
    strategy: str = "linear-greedy"  # one of STRATEGIES
    replace: str = "linear"  # none | linear | fold
    score: str = "linearity"  # linear-*: linearity | linearity_no_residual | replacement_error
    layers: list[int] | None = None  # with strategy "layers": original 0-based indices
    calib: str = "builtin:calib"  # calibration data source
    tokens: int = 32768  # calibration tokens
    seq_len: int = 512  # tokens per calibration sequence
    batch_size: int = 8  # sequences per forward pass
    ridge: float = 0.0  # ridge for the linear fits, relative to tr(XᵀX)/d
    ppl_tokens: int = 4096  # ppl-greedy: calibration tokens scored per candidate removal

    def check(self, n: int, hf_config=None) -> int:
        """Validate against a model of ``n`` layers (and its config, for ``fold``); returns k.
        No work is done."""
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.replace, REPLACEMENTS, "replacement")
        _one_of(self.score, SCORES, "score")
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
        if self.replace == "fold":
            if hf_config is not None:
                arch.check_foldable(hf_config)
            if self.strategy == "layers" and 0 in self.layers:
                raise LinearizeError("--replace fold cannot remove layer 0: no MLP comes before it")
        if self.ppl_tokens < 1:
            raise LinearizeError(f"ppl_tokens must be at least 1, got {self.ppl_tokens}")
        return k


@dataclass
class PruneResult:
    """What was removed, in removal order, with the score that chose each layer."""

    chosen_by: str  # the criterion's name, or "user"
    removed: list[int]
    steps: list[dict] = field(default_factory=list)
    forward_passes: int = 0  # calibration forward passes (batches) spent
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


CHOSEN_BY = {"layers": "user", "block-influence": "block_influence",
             "angular-block": "angular_distance_last_token", "lstsq-block": "cosine_distance",
             "ppl-greedy": "calibration_perplexity"}  # fmt: skip


def _score(stats: PairStats, key: str, ridge: float) -> float:
    """Higher = remove first."""
    if key == "replacement_error":
        return -replacement_error(stats, ridge)
    if key == "block_influence":
        return -(1.0 - float(stats.cos_sum / stats.n))
    return stats.scores()[key]


def _natural(key: str, ranked: float) -> float:
    """The criterion's own value from its ranking value (errors and distances were negated)."""
    return -ranked if key in ("replacement_error", "block_influence") else ranked


def runs_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices → contiguous runs [start, end): [3, 4, 7] → [(3, 5), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class _Pruner:
    """The state of one pruning run: the model, its calibration batches, and the record."""

    def __init__(self, model: nn.Module, tokenizer, c: PruneConfig, on_step) -> None:
        self.model, self.c, self.on_step = model, c, on_step
        n = arch.n_layers(model)
        self.k = c.check(n, model.config)
        seqs = list(data.token_sequences(tokenizer, c.calib, c.seq_len, c.tokens))
        if not seqs:
            raise LinearizeError(f"calibration source '{c.calib}' gave no tokens")
        pad = data.pad_id_of(tokenizer)
        self.batches = list(data.batches(seqs, c.batch_size, pad))
        if c.strategy == "ppl-greedy":
            few = data.token_sequences(tokenizer, c.calib, c.seq_len, min(c.ppl_tokens, c.tokens))
            self.ppl_batches = list(data.batches(few, c.batch_size, pad))
        self.alive = list(range(n))  # alive[p] = original index of the layer now at position p
        self.result = PruneResult(CHOSEN_BY.get(c.strategy, c.score), [])

    def _allowed(self, p: int) -> bool:
        return p >= 1 or self.c.replace != "fold"  # fold needs an MLP before the run

    def pass_over(self, batches: list) -> list:
        self.result.forward_passes += len(batches)
        return batches

    # -- removal ------------------------------------------------------------------------------
    def remove_run(self, start: int, end: int, score: float | None,
                   stats: PairStats | None = None) -> None:  # fmt: skip
        """Remove positions [start, end) with the configured replacement."""
        c, model = self.c, self.model
        fit_error = None
        if c.replace == "linear":
            if stats is None:
                stats = span_stats(model, self.pass_over(self.batches), start, end)
            fit = fit_affine(stats, c.ridge)
            fit_error = relative_error(stats, fit)
            replace_span_(model, start, end, fit)
        elif c.replace == "fold":
            fs = fold_stats(model, self.pass_over(self.batches), start, end)
            proj = arch.mlp_out_proj(model, start - 1)
            fit = fit_affine(fs, c.ridge, bias=proj_has_bias(proj))
            fit_error = relative_error(fs, fit)
            fold_span_(model, start, end, fit)
        else:
            replace_span_(model, start, end, None)
        originals = self.alive[start:end]
        del self.alive[start:end]
        for orig in originals:
            step = {"step": len(self.result.removed), "layer": orig, "score": score,
                    "fit_error": fit_error}  # fmt: skip
            self.result.removed.append(orig)
            self.result.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)

    # -- strategies ---------------------------------------------------------------------------
    def greedy_linear(self) -> None:
        for _ in range(self.k):
            stats = collect_stats(self.model, self.pass_over(self.batches))
            scored = {p: _score(s, self.c.score, self.c.ridge) for p, s in stats.items()
                      if self._allowed(p)}  # fmt: skip
            best = max(scored, key=scored.get)
            self.remove_run(best, best + 1, _natural(self.c.score, scored[best]), stats[best])

    def greedy_ppl(self) -> None:
        for _ in range(self.k):
            scored = {}
            for p in range(len(self.alive)):
                if self._allowed(p):
                    with arch.layers_removed(self.model, [p]):
                        scored[p] = -_batches_ppl(self.model, self.pass_over(self.ppl_batches))
            best = max(scored, key=scored.get)
            self.remove_run(best, best + 1, -scored[best])

    def choose_once(self) -> dict[int, float | None]:
        """Original indices → the score that chose them, for the one-shot strategies."""
        c, model, k = self.c, self.model, self.k
        if c.strategy == "layers":
            return {i: None for i in c.layers}
        if c.strategy in ("angular-block", "lstsq-block"):
            dist = block_distances(model, self.pass_over(self.batches), k)
            key = "angular_last" if c.strategy == "angular-block" else "cosine_all"
            starts = [s for s in range(len(dist[key])) if self._allowed(s)]
            best = min(starts, key=lambda s: dist[key][s])
            return {i: dist[key][best] for i in range(best, best + k)}
        stats = collect_stats(model, self.pass_over(self.batches))
        scored = {p: _score(s, self.result.chosen_by, c.ridge) for p, s in stats.items()
                  if self._allowed(p)}  # fmt: skip
        top = sorted(scored, key=scored.get, reverse=True)[:k]
        return {p: _natural(self.result.chosen_by, scored[p]) for p in top}

    def run(self) -> PruneResult:
        start = time.perf_counter()
        if self.c.strategy == "linear-greedy":
            self.greedy_linear()
        elif self.c.strategy == "ppl-greedy":
            self.greedy_ppl()
        else:
            chosen = self.choose_once()
            for lo, hi in runs_of(list(chosen)):
                p = self.alive.index(lo)
                self.remove_run(p, p + (hi - lo), chosen[lo])
        self.result.elapsed_s = round(time.perf_counter() - start, 2)
        return self.result


@torch.no_grad()
def _batches_ppl(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Perplexity over already tokenised batches (SLEB's calibration criterion)."""
    from linearize.evaluate import batch_nll

    nll, count = 0.0, 0
    for b in batches:
        s, n = batch_nll(model, b)
        nll, count = nll + s, count + n
    return math.exp(nll / max(count, 1))


def prune_model_(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    on_step: Callable[[dict], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place; returns what was removed (original numbering)."""
    return _Pruner(model, tokenizer, config, on_step).run()


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
    directory, the data sources, the layer count against ``remove`` / ``layers``, whether
    ``fold`` is possible for the architecture.
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
    c.check(n, hf_config)
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
