"""Depth pruning: which layers to remove (strategies) and what stands in for them (replacements).

Strategies (``--strategy``), each faithful to where it comes from:

- ``linear-greedy`` (Razzhigaev et al., the paper): k times, score every remaining layer on
  the calibration tokens through the current, already pruned and patched model, remove the
  best one, fit its replacement there (the first pass and every fit see all ``--tokens``; the
  re-scoring after each cut sees the first ``--rescore-tokens`` of them, and starts at the
  cut, since nothing upstream changed);
- ``linear-oneshot``: rank once on the original model;
- ``block-influence`` (ShortGPT, Men et al. 2024): the k layers with the lowest 1 − cos;
- ``angular-block`` (Gromov et al. 2024 / PruneMe): the contiguous block of k layers with the
  smallest angular distance between its input and output at the last token;
- ``lstsq-block`` (ReplaceMe, Shopkhoev et al. 2025): the contiguous block of k with the
  smallest cosine distance over all tokens, meant to be replaced by one closed-form linear map
  (``--replace linear`` or ``fold``);
- ``ppl-greedy`` (SLEB, Song et al. 2024): k times, remove the layer whose removal raises
  calibration perplexity least;
- ``ppl-oneshot``: replace each layer alone by its fitted map (a plain drop with ``--replace
  none``), measure calibration perplexity, remove the k cheapest: one pass of fits and n short
  scoring passes, because single-layer costs nearly multiply (benchmarks/RESULTS.md);
- ``layers``: the user's own list.

Replacements (``--replace``, see linearize.surgery.replace): ``none`` drops the layers; ``linear``
puts one affine map (least squares on raw states, float64 normal equations, optional ridge)
where each run of removed layers was; ``fold`` multiplies that map into the MLP output
projection of the layer before the run, leaving a stock checkpoint.

After the cuts, ``--reconstruct N`` (default 2 for ``linear`` and ``fold``, 0 for ``none``)
refits the MLP output projection of the first N kept layers after each cut, by closed-form
least squares, to the original model's state after the same layer: the layers downstream of a
map take up what it could not express. Where the architecture table knows the attention's
output projection (``--reconstruct-attention``, on by default), that is refit first, to the
original's state between the layer's attention and its MLP.

Non-greedy strategies choose the whole set first, then replace each contiguous run with one
fit, in ascending order, so every fit sees the model as upstream cuts left it. Every layer
index a user sees is 0-based in the original model's numbering.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from linearize import arch, data, models
from linearize._fields import int_list, option
from linearize._io import atomic_dir, claim_output, releases_output, write_json
from linearize._version import __version__
from linearize.capture import (
    LayerCapture,
    _masked_rows,
    block_distances,
    check_finite,
    check_massive,
    collect_stats,
    span_stats,
)
from linearize.errors import LinearizeError
from linearize.eval.perplexity import held_out_perplexities, pooled_nll
from linearize.report import render
from linearize.selfgen import calibration_sequences
from linearize.stats import (
    PRIORS,
    AffineMap,
    PairStats,
    RegressionStats,
    fit_affine,
    fit_toward,
    relative_error,
)
from linearize.surgery.replace import (
    bridge_as,
    bridge_positions,
    fit_into_,
    fold_span_,
    get_bridge,
    proj_has_bias,
    replace_span_,
    runs_of,
    save,
    set_bridge_,
    set_span_map_,
    weight_rows,
)
from linearize.surgery.restart import BoundaryStore, run_from

STRATEGIES = (
    "linear-greedy",
    "linear-oneshot",
    "block-influence",
    "angular-block",
    "lstsq-block",
    "ppl-greedy",
    "ppl-oneshot",
    "layers",
)
REPLACEMENTS = ("none", "linear", "fold")
SCORES = ("linearity", "linearity_no_residual", "replacement_error")
FIT_TARGETS = ("auto", "local", "original")
Progress = Callable[[str, int, int], None]  # (what, batches done, batches in it; 0: unknown)


def no_progress(what: str, done: int, total: int) -> None:
    """The ``Progress`` that shows nothing."""


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

    remove: str | int = option(8, "layers to remove: a count (8) or a share (25%)", cli=str)
    strategy: str = option(
        "linear-greedy",
        "linear-greedy | linear-oneshot | block-influence | angular-block | lstsq-block | "
        "ppl-greedy | ppl-oneshot | layers (with --sweep: a list, or all)",
    )
    replace: str = option("linear", "none | linear | fold (with --sweep: a list)")
    score: str = option(
        "linearity", "linear-*: linearity | linearity_no_residual | replacement_error"
    )
    layers: list[int] | None = option(
        None,
        "with --strategy layers: original 0-based indices, e.g. 3,7,9",
        cli=str,
        parse=int_list,
    )
    calib: str = option(
        "builtin:calib+self",
        "calibration sources joined by '+'; 'self' is text sampled from the model itself "
        "(generated once, cached)",
    )
    tokens: int = option(
        131072,
        "calibration tokens (half of them sampled from the model with the default --calib: "
        "more text is what made the fits hold on other text; see the README)",
    )
    seq_len: int = option(512, "tokens per calibration sequence")
    batch_size: int = option(8, "sequences per forward pass")
    ridge: float = option(0.0, "ridge for the linear fits, relative to tr(XᵀX)/d")
    protect: list[int] | None = option(
        None,
        "original layer indices that no strategy removes; negative ones count from the end "
        "(-1: the last layer)",
        cli=str,
        parse=int_list,
    )
    massive: float = option(
        0.0,
        "score layers without the tokens whose state norm passes this many times the batch "
        "median (attention sinks, which otherwise decide the linearity score); 0: all tokens",
    )
    ppl_tokens: int = option(4096, "ppl-*: calibration tokens scored per candidate removal")
    fit_target: str = option(
        "auto",
        "original (the original model's state, from the pruned model's actual input) | local "
        "(the removed layers' own output) | auto: original for linear, local for fold",
    )
    prior: str = option("zero", "what --ridge pulls a map towards: zero | identity")
    rank: int | None = option(None, "keep only a rank-r update W − I (default: full)")
    refit: bool = option(False, "--fit-target original: refit every map once more at the end")
    restart: bool = option(
        True, "greedy: re-run only the layers after each cut (--no-restart: full passes)"
    )
    cache_gb: float = option(4.0, "RAM for stored calibration states (the rest spills to disk)")
    reconstruct: int | None = option(
        None,
        "refit the MLP output projection of the first N kept layers after each cut to the "
        "original model's state there (closed-form least squares, no training; default: 2 for "
        "linear and fold, 0 for none, which then only drops layers)",
    )
    reconstruct_attention: bool = option(
        True,
        "--reconstruct: refit each of those layers' attention output projection too (to the "
        "original's state between attention and MLP), before its MLP's",
    )
    reconstruct_ridge: float = option(
        0.1, "--reconstruct: ridge pulling each refit toward its weights, relative to tr(XᵀX)/d"
    )
    rescore_tokens: int = option(
        8192,
        "linear-greedy: calibration tokens that re-score the layers after each cut (the first "
        "pass and every fit use all --tokens; 0: all)",
    )

    def check(self, n: int, hf_config=None) -> int:
        """Validate against a model of ``n`` layers (and its config, for ``fold``); returns k.
        No work is done."""
        _one_of(self.strategy, STRATEGIES, "strategy")
        _one_of(self.replace, REPLACEMENTS, "replacement")
        _one_of(self.score, SCORES, "score")
        _one_of(self.fit_target, FIT_TARGETS, "fit target")
        _one_of(self.prior, PRIORS, "prior")
        if self.rank is not None and self.rank < 0:
            raise LinearizeError(f"--rank must be at least 0, got {self.rank}")
        if self.ridge < 0:
            raise LinearizeError(f"--ridge must be at least 0, got {self.ridge}")
        protect = self.protect or []
        if any(not -n <= i < n for i in protect):
            raise LinearizeError(
                f"--protect {list(protect)} out of range: the model has {n} layers"
            )
        if self.strategy == "layers" and self.protected(n) & set(self.layers or []):
            raise LinearizeError("--layers names a layer that --protect keeps")
        check_massive(self.massive)
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
            if k > n - len(self.protected(n)):
                raise LinearizeError(
                    f"--remove {k} with --protect {list(protect)}: too few layers left"
                )
        if self.replace == "fold":
            if hf_config is not None:
                arch.check_foldable(hf_config)
            if self.strategy == "layers" and 0 in self.layers:
                raise LinearizeError("--replace fold cannot remove layer 0: no MLP comes before it")
        if self.ppl_tokens < 1:
            raise LinearizeError(f"--ppl-tokens must be at least 1, got {self.ppl_tokens}")
        if (self.reconstruct or 0) < 0 or self.reconstruct_ridge < 0:
            raise LinearizeError("--reconstruct and --reconstruct-ridge must be at least 0")
        if self.cache_gb < 0:
            raise LinearizeError(f"--cache-gb must be at least 0, got {self.cache_gb}")
        if self.rescore_tokens < 0:
            raise LinearizeError(f"--rescore-tokens must be at least 0, got {self.rescore_tokens}")
        return k

    def protected(self, n: int) -> set[int]:
        """``protect`` as original indices of a model of ``n`` layers (negative from the end)."""
        return {i % n for i in self.protect or []}

    @property
    def refits(self) -> int:
        """Layers refit after each cut: ``reconstruct``, by default 2 with a map or a fold
        and 0 for ``none``, so that plain dropping stays the baseline it is named for."""
        if self.reconstruct is None:
            return 0 if self.replace == "none" else 2
        return self.reconstruct

    @property
    def target(self) -> str:
        """The fit target in force: ``auto`` is ``original`` for linear maps (measured better in
        and out of domain) and ``local`` for fold, where fitting one MLP projection to the
        original's state lost to the local fit (benchmarks/RESULTS.md)."""
        if self.fit_target != "auto":
            return self.fit_target
        return "local" if self.replace == "fold" else "original"


@dataclass
class PruneResult:
    """What was removed, in removal order, with the score that chose each layer."""

    chosen_by: str  # the criterion's name, or "user"
    removed: list[int]
    steps: list[dict] = field(default_factory=list)
    forward_passes: int = 0  # calibration forward passes (batches) spent, whole or partial
    calibration_passes: float = 0.0  # layer forwards spent ÷ one full pass of the original
    state_cache_mb: float = 0.0  # peak RAM of the stored boundary states
    state_spilled_mb: float = 0.0  # boundary states written to disk (over the RAM budget)
    reconstructed: list[int] = field(default_factory=list)  # layers whose projection was refit
    reconstructed_attention: list[int] = field(default_factory=list)  # ... attention's too
    reconstruct_s: float = 0.0  # time of those refits (in elapsed_s)
    first_pass_s: float | None = None  # greedy: time of the first, full scoring pass
    elapsed_s: float = 0.0
    # every layer's criterion (and scores, where measured) before the first cut: the page's curve
    initial: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


CHOSEN_BY = {
    "layers": "user",
    "block-influence": "block_influence",
    "angular-block": "angular_distance_last_token",
    "lstsq-block": "cosine_distance",
    "ppl-greedy": "calibration_perplexity",
    "ppl-oneshot": "calibration_perplexity",
}


def _score(stats: PairStats, key: str, ridge: float) -> float:
    """Higher = remove first."""
    if key == "replacement_error":
        return -replacement_error(stats, ridge)
    if key == "block_influence":
        return -(1.0 - float(stats.cos_sum / stats.n))
    return stats.scores()[key]


def _natural(key: str, ranked: float) -> float:
    """The criterion's own value from its ranking value (errors and distances were negated)."""
    return (
        -ranked
        if key in ("replacement_error", "block_influence", "calibration_perplexity")
        else ranked
    )


class _Pruner:
    """The state of one pruning run: the model, its calibration batches, and the record.

    Boundary states (see linearize.surgery.restart) let every pass after the first start at the first
    layer that a cut changed. Keys in the store: ("o", j, b) is the original model's stream
    entering original layer j on batch b (j = n: after the last layer); ("c", p, b) the
    pruned model's raw stream entering position p, kept only for p > ``clean``, the last
    position whose input still equals the original's.
    """

    def __init__(
        self, model: nn.Module, tokenizer, c: PruneConfig, on_step, on_progress: Progress
    ) -> None:
        self.model, self.c, self.on_step = model, c, on_step
        self.on_progress = on_progress
        n = arch.n_layers(model)
        self.n_orig = n
        self.k = c.check(n, model.config)
        self.protected = c.protected(n)
        # without the massive tokens, scores spread by ~1e-3 and are only ranked, never fitted
        # from: float32 products (within 1e-6) give back what keeping own moments costs
        # (ppl-oneshot fits its candidates from these statistics, so it keeps every token)
        massive = 0.0 if c.strategy == "ppl-oneshot" else c.massive
        self.scoring = {"fast": bool(massive), "massive": massive}
        # dropping named layers fits nothing: no calibration text (nor sampling from the model)
        needed = not (c.strategy == "layers" and c.replace == "none" and not c.refits)
        if needed:
            self.on_progress("calibration text", 0, 0)
        seqs = (
            calibration_sequences(model, tokenizer, c.calib, c.seq_len, c.tokens, on_progress)
            if needed
            else []
        )
        if needed and not seqs:
            raise LinearizeError(f"calibration source '{c.calib}' gave no tokens")
        pad = data.pad_id_of(tokenizer)
        self.batches = list(data.batches(seqs, c.batch_size, pad))
        self.masks = [
            None if bool(b["attention_mask"].all()) else b["attention_mask"].reshape(-1).bool()
            for b in self.batches
        ]
        if c.strategy.startswith("ppl-"):
            few, used = [], 0
            for s in seqs:
                if used >= c.ppl_tokens:
                    break
                few.append(s[: c.ppl_tokens - used])
                used += len(few[-1])
            self.ppl_batches = list(data.batches(few, c.batch_size, pad))
        self.n_rescore = _prefix_batches(self.batches, c.rescore_tokens)
        self.rescored: dict[int, PairStats] | None = None  # first pass, re-scoring tokens only
        self.alive = list(range(n))  # alive[p] = original index of the layer now at position p
        self.result = PruneResult(CHOSEN_BY.get(c.strategy, c.score), [])
        self.store = BoundaryStore(int(c.cache_gb * (1 << 30)))
        self.recorded = False  # original boundaries stored
        self.clean = n  # positions ≤ clean take their input from the original's boundaries
        self.valid = -1  # pruned boundaries are stored and current for positions ≤ valid
        self._layer_passes = 0  # layer forwards × batches, for calibration_passes

    def _allowed(self, p: int) -> bool:
        if self.alive[p] in self.protected:
            return False
        return p >= 1 or self.c.replace != "fold"  # fold needs an MLP before the run

    def pass_over(
        self, batches: list, what: str, layers: int | None = None
    ) -> Iterable[dict[str, Tensor]]:
        """Count a pass over ``batches`` through ``layers`` layers (default: all), and report
        its progress as ``what`` after every batch."""
        self.result.forward_passes += len(batches)
        self._layer_passes += len(batches) * (
            arch.n_layers(self.model) if layers is None else layers
        )
        return _ticking(batches, what, self.on_progress)

    def _names(self, start: int, stop: int) -> str:
        """Positions [start, stop) as original layer indices, for progress lines."""
        idx = self.alive[start:stop] or ["none"]
        return f"layer {idx[0]}" if len(idx) == 1 else f"layers {idx[0]}–{idx[-1]}"

    # -- boundary states ----------------------------------------------------------------------
    def _key(self, p: int) -> tuple:
        return ("o", p) if p <= self.clean else ("c", p)

    def _record(self, start: int):
        def on_boundary(b: int, j: int, h: Tensor) -> None:
            if j != start or not self.recorded:
                self.store.put(self._key(j) + (b,), h.clone())

        return on_boundary

    def _run(
        self,
        start: int,
        stop: int,
        before_batch=None,
        first: int | None = None,
        what: str = "calibration states",
    ) -> None:
        """Layers [start, stop) on every batch (or the ``first`` few) from the stored state at
        ``start``; records the boundaries start..stop, and marks them current when every batch
        ran."""
        state = None if start == 0 else (lambda b: self.store.get(self._key(start) + (b,)))
        batches = self.batches if first is None else self.batches[:first]
        run_from(
            self.model,
            self.pass_over(batches, f"{what}, {self._names(start, stop)}", stop - start),
            start,
            stop,
            state,
            self._record(start),
            None,
            before_batch,
        )
        self.recorded = True
        if len(batches) == len(self.batches):
            self.valid = max(self.valid, stop)

    def ensure_valid(self, p: int) -> None:
        """Make the stored stream entering position ``p`` current (runs only what is stale)."""
        if not self.recorded:  # first pass: the whole (still unpruned) model, every boundary
            self._run(0, arch.n_layers(self.model))
        if p > self.valid:
            self._run(self.valid, p)

    def score_from(self, p: int, first: int | None = None) -> dict[int, PairStats]:
        """Statistics of every layer from position ``p`` on (over all batches, or the ``first``
        few), recording the boundaries."""
        _, layers = arch.get_layers(self.model)
        n = len(layers)
        if p >= n:
            return {}
        if p > 0:
            self.ensure_valid(p)
        cap = LayerCapture(layers, range(p, n), stop_at_last=False, **self.scoring)

        def before_batch(b: int, batch: dict[str, Tensor]) -> None:
            cap.begin_batch(batch["attention_mask"])
            if b == self.n_rescore and first is None:  # what the re-scoring tokens alone give
                self.rescored = copy.deepcopy(cap.stats)

        self.rescored = None
        with cap:
            self._run(p, n, before_batch=before_batch, first=first, what="scoring")
        check_finite(cap.stats, self.model)
        return cap.stats

    def _target(self, end: int) -> int:
        """Original boundary that a run ending before position ``end`` must reproduce."""
        return self.alive[end] if end < len(self.alive) else self.n_orig

    def _stored_pairs(self, x: Callable[[int], Tensor], y: Callable[[int], Tensor]) -> PairStats:
        stats = PairStats()
        for b in range(len(self.batches)):
            stats.update(_masked_rows(x(b), self.masks[b]), _masked_rows(y(b), self.masks[b]))
        return stats

    def _changed(self, p: int) -> None:
        """Boundaries after position p are no longer current (p itself still is)."""
        self.store.drop_where(lambda key: key[0] == "c" and key[1] > p)
        self.valid = min(self.valid, p)
        self.clean = min(self.clean, p)  # inputs after p now differ from the original's

    # -- fits ---------------------------------------------------------------------------------
    def _fit(self, stats: PairStats, bias: bool = True) -> AffineMap:
        return fit_affine(stats, self.c.ridge, bias=bias, prior=self.c.prior, rank=self.c.rank)

    def _original_linear_stats(self, start: int, end: int) -> PairStats:
        """X: the pruned model's raw stream entering position ``start``; Y: the original's
        stream at the boundary the run [start, end) ends on."""
        self.ensure_valid(start)
        xk, yk = self._key(start), ("o", self._target(end))
        return self._stored_pairs(
            lambda b: self.store.get(xk + (b,)), lambda b: self.store.get(yk + (b,))
        )

    def _projection_pass(
        self,
        q: int,
        stop: int,
        use: Callable[..., None],
        proj: nn.Module | None = None,
        state: Callable[[int], Tensor] | None = None,
        what: str = "fitting at",
    ) -> None:
        """Layers [q, stop) on every batch from the stored state entering position q (or
        ``state(b)``), with ``use(b, g, m, h, h_stop, x)`` per batch: g and m the input and
        output of ``proj`` (default: layer q's MLP output projection) in h's shape, h layer
        q's output, h_stop the stream at ``stop``, x the state fed in. The rows the fold fits
        and the refits are made of."""
        self.ensure_valid(q)
        proj, held = proj or arch.mlp_out_proj(self.model, q), {}

        def keep(m, args, kwargs, out):
            held["g"], held["m"] = args[0] if args else kwargs["input"], out

        def on_boundary(b: int, j: int, h: Tensor) -> None:
            if j == q:
                held["x"] = h
            if j == q + 1:  # OPT's fc2 works on (B*T, ·) rows
                held["h"], held["m"] = h, held["m"].reshape(h.shape)
                held["g"] = held["g"].reshape(*h.shape[:-1], held["g"].shape[-1])
            if j == stop:
                use(b, held.pop("g"), held.pop("m"), held.pop("h"), h, held.pop("x"))

        key = self._key(q)
        run_from(
            self.model,
            self.pass_over(self.batches, f"{what} {self._names(q, q + 1)}", stop - q),
            q,
            stop,
            state or (lambda b: self.store.get(key + (b,))),
            on_boundary,
            lambda running: [(proj, keep)],
        )

    def _fold_stats(self, start: int, end: int, original: bool) -> PairStats:
        """Pairs for folding the run [start, end) into layer start−1's MLP output m: x = m,
        y = Y − h + m, with h that layer's output in the pruned model and Y the stream the
        fold must produce: the run's own output (local, capture.fold_stats's pairs) or the
        original's state where the run ends."""
        yk, stats = ("o", self._target(end)), PairStats()

        def use(b: int, g: Tensor, m: Tensor, h: Tensor, h_stop: Tensor, _x) -> None:
            y = (self.store.get(yk + (b,)).to(h) if original else h_stop) - h + m
            stats.update(_masked_rows(m, self.masks[b]), _masked_rows(y, self.masks[b]))

        what = f"folding {self._names(start, end)} into"
        self._projection_pass(start - 1, start if original else end, use, what=what)
        return stats

    # -- removal ------------------------------------------------------------------------------
    def remove_run(
        self, start: int, end: int, score: float | None, stats: PairStats | None = None
    ) -> int:
        """Remove positions [start, end) with the configured replacement; returns the first
        position whose input changed (where the next pass must start)."""
        c, model = self.c, self.model
        if c.refits:
            self.ensure_valid(0)  # the refits need the original's states: record them uncut
        original = c.target == "original"
        fit_error, changed = None, start
        if c.replace == "linear" and original:
            fs = self._original_linear_stats(start, end)
            fit = self._fit(fs)
            fit_error = relative_error(fs, fit)
            set_span_map_(model, start, end, fit)
        elif c.replace == "linear":
            if stats is None:
                what = f"fitting the map for {self._names(start, end)}"
                stats = span_stats(model, self.pass_over(self.batches, what), start, end)
            fit = self._fit(stats)
            fit_error = relative_error(stats, fit)
            replace_span_(model, start, end, fit)
        elif c.replace == "fold":
            fs = self._fold_stats(start, end, original)
            proj = arch.mlp_out_proj(model, start - 1)
            fit = self._fit(fs, bias=proj_has_bias(proj))
            fit_error = relative_error(fs, fit)
            fold_span_(model, start, end, fit)
            changed = start - 1
        else:
            replace_span_(model, start, end, None)
        originals = self.alive[start:end]
        del self.alive[start:end]
        self._changed(changed)
        for orig in originals:
            step = {
                "step": len(self.result.removed),
                "layer": orig,
                "score": score,
                "fit_error": fit_error,
                "elapsed_s": round(time.perf_counter() - self.t0, 2),
            }
            self.result.removed.append(orig)
            self.result.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)
        return changed

    def refit(self) -> None:
        """Refit every bridge once more, in order, from the pruned model's final upstream
        stream to the original's state: maps fitted early saw inputs that later upstream cuts
        changed."""
        for p in bridge_positions(self.model):
            set_bridge_(self.model, p, self._fit(self._original_linear_stats(p, p)))
            self._changed(p)

    def reconstruct(self) -> None:
        """Refit the MLP output projection W of the first ``c.reconstruct`` kept layers after
        every cut, in order:
        W = argmin ‖G W − (Y_orig − h + m)‖² + λ‖W − W₀‖², with G the projection's input and m
        its output in the pruned model, h the layer's output and Y_orig the original model's
        state that h stands for (before a bridge, the state the bridge was fitted from).
        A linear problem, because the projection is the last thing the layer adds to the
        stream: each refit takes up what the map before it could not express, as a function of
        the layer's own MLP features."""
        try:  # the projection a fold needs, for the same reason
            arch.check_foldable(self.model.config)
        except LinearizeError:
            warnings.warn(
                f"--reconstruct skipped: '{self.model.config.model_type}' has no MLP output "
                "projection added straight to the residual stream",
                stacklevel=2,
            )
            return
        n = len(self.alive)
        cuts = [p for p in range(n) if self.alive[p] != (self.alive[p - 1] + 1 if p else 0)]
        # not the layer before a cut: fitting a fold's projection to the original's state lost
        # out of domain on SmolLM2 (2.64× against 2.57× at k = 8), as --fit-target original did
        todo = {q for p in cuts for q in range(p, min(p + self.c.refits, n))}
        for q in sorted(todo):
            attn = arch.attn_out_proj(self.model, q) if self.c.reconstruct_attention else None
            if attn is not None:
                self._refit_attention(q, attn)
                self.result.reconstructed_attention.append(self.alive[q])
            proj = arch.mlp_out_proj(self.model, q)
            stats = self._projection_stats(q, proj)
            fit_into_(proj, fit_toward(stats, weight_rows(proj), self.c.reconstruct_ridge))
            self._changed(q)
            self.result.reconstructed.append(self.alive[q])

    def _refit_attention(self, q: int, proj: nn.Module) -> None:
        """Refit layer q's attention output projection O (``proj``), before its MLP's:
        O = argmin ‖G O − (Z_orig − x)‖² + λ‖O − O₀‖², with G the projection's input and x the
        layer's (bridged) input in the pruned model, Z_orig the original model's state between
        attention and MLP in the same layer. Linear, because the attention output is added
        straight to the stream; the MLP refit then sees it."""
        model = self.model
        start = ("o", self.alive[q])  # the original's stream entering this layer
        d = model.config.hidden_size
        ident = AffineMap(weight=torch.eye(d, dtype=torch.float64), bias=torch.zeros(d).double())
        bridge = get_bridge(model, q)

        def keep_mid(b: int, g: Tensor, o: Tensor, h: Tensor, h_stop: Tensor, x: Tensor) -> None:
            self.store.put(("z", b), (x + o).clone())

        # the original's middle state: its input through this (still original) attention
        with bridge_as(model, q, ident) if bridge is not None else contextlib.nullcontext():
            self._projection_pass(
                q,
                q + 1,
                keep_mid,
                proj,
                lambda b: self.store.get(start + (b,)),
                "the original attention of",
            )
        stats = RegressionStats(bias=proj_has_bias(proj))

        def use(b: int, g: Tensor, o: Tensor, h: Tensor, h_stop: Tensor, x: Tensor) -> None:
            xb = x if bridge is None else bridge(x)
            y = self.store.get(("z", b)).to(h) - xb  # the stream around the attention
            stats.update(_masked_rows(g, self.masks[b]), _masked_rows(y, self.masks[b]))

        self._projection_pass(q, q + 1, use, proj, what="refitting the attention of")
        fit_into_(proj, fit_toward(stats, weight_rows(proj), self.c.reconstruct_ridge))
        self.store.drop_where(lambda key: key[0] == "z")
        self._changed(q)

    def _projection_stats(self, q: int, proj: nn.Module) -> RegressionStats:
        """Rows (G, Y_orig − h + m) of layer q's MLP output projection on every batch."""
        bridged = q + 1 in bridge_positions(self.model)  # a map after q: match its input
        yk = ("o", self.alive[q] + 1 if bridged else self._target(q + 1))
        stats = RegressionStats(bias=proj_has_bias(proj))

        def use(b: int, g: Tensor, m: Tensor, h: Tensor, h_stop: Tensor, _x) -> None:
            y = self.store.get(yk + (b,)).to(h) - h + m
            stats.update(_masked_rows(g, self.masks[b]), _masked_rows(y, self.masks[b]))

        self._projection_pass(q, q + 1, use, what="refitting the MLP of")
        return stats

    # -- strategies ---------------------------------------------------------------------------
    def greedy_linear(self) -> None:
        t0 = time.perf_counter()
        stats = self.score_from(0)
        self.result.first_pass_s = round(time.perf_counter() - t0, 2)
        for step in range(self.k):
            scored = {
                p: _score(s, self.c.score, self.c.ridge)
                for p, s in stats.items()
                if self._allowed(p)
            }
            if step == 0:
                self._keep_initial(stats, scored)
            best = max(scored, key=scored.get)
            # a fit sees every calibration token, the massive ones too
            every_batch = (step == 0 or self.n_rescore == len(self.batches)) and not self.c.massive
            changed = self.remove_run(
                best,
                best + 1,
                _natural(self.c.score, scored[best]),
                stats[best] if every_batch else None,
            )
            if step + 1 < self.k:
                if step == 0 and self.rescored is not None:
                    stats = self.rescored  # later steps compare scores over the same tokens
                restart = changed if self.c.restart else 0
                kept = {p: s for p, s in stats.items() if p < restart}
                stats = kept | self.score_from(restart, first=self.n_rescore)

    def _keep_initial(self, stats: dict[int, PairStats], scored: dict[int, float]) -> None:
        """Record the criterion of every layer before the first cut (positions are original
        indices then); layers a strategy may not remove get their scores but no criterion."""
        key = self.result.chosen_by
        self.result.initial = [
            {
                "layer": p,
                "criterion": _natural(key, scored[p]) if p in scored else None,
                **({k: float(v) for k, v in stats[p].scores().items()} if p in stats else {}),
            }
            for p in sorted(set(stats) | set(scored))
        ]

    def greedy_ppl(self) -> None:
        for step in range(self.k):
            scored = {}
            for p in range(len(self.alive)):
                if self._allowed(p):
                    what = f"perplexity without {self._names(p, p + 1)}"
                    with arch.layers_removed(self.model, [p]):
                        scored[p] = -_batches_ppl(
                            self.model, self.pass_over(self.ppl_batches, what)
                        )
            if step == 0:
                self._keep_initial({}, scored)
            best = max(scored, key=scored.get)
            self.remove_run(best, best + 1, -scored[best])

    def ppl_alone(self) -> dict[int, float]:
        """Each allowed layer's calibration perplexity with it alone replaced: by its affine
        map fitted on every calibration token (the same fit as ``--fit-target original`` makes
        for a first cut), or dropped with ``--replace none``; ``fold`` is scored by the map
        it approximates. Higher = remove first, as for every ranking here."""
        stats = self.score_from(0)
        scored = {}
        for p in filter(self._allowed, range(len(self.alive))):
            fit = None if self.c.replace == "none" else self._fit(stats[p])
            what = (
                f"perplexity with {self._names(p, p + 1)} {'dropped' if fit is None else 'mapped'}"
            )
            with arch.layers_removed(self.model, [p]):
                with bridge_as(self.model, p, fit) if fit is not None else contextlib.nullcontext():
                    scored[p] = -_batches_ppl(self.model, self.pass_over(self.ppl_batches, what))
        self._keep_initial(stats, scored)
        return scored

    def choose_once(self) -> dict[int, float | None]:
        """Original indices → the score that chose them, for the one-shot strategies."""
        c, model, k = self.c, self.model, self.k
        if c.strategy == "layers":
            return {i: None for i in c.layers}
        if c.strategy in ("angular-block", "lstsq-block"):
            dist = block_distances(model, self.pass_over(self.batches, "block distances"), k)
            key = "angular_last" if c.strategy == "angular-block" else "cosine_all"
            starts = [s for s in range(len(dist[key])) if all(map(self._allowed, range(s, s + k)))]
            if not starts:
                raise LinearizeError(f"no run of {k} layers is free of --protect")
            best = min(starts, key=lambda s: dist[key][s])
            return {i: dist[key][best] for i in range(best, best + k)}
        if c.strategy == "ppl-oneshot":
            scored = self.ppl_alone()
        else:
            stats = (
                self.score_from(0)
                if c.target == "original"
                else collect_stats(model, self.pass_over(self.batches, "scoring"), **self.scoring)
            )
            scored = {
                p: _score(s, self.result.chosen_by, c.ridge)
                for p, s in stats.items()
                if self._allowed(p)
            }
            self._keep_initial(stats, scored)
        top = sorted(scored, key=scored.get, reverse=True)[:k]
        return {p: _natural(self.result.chosen_by, scored[p]) for p in top}

    def run(self) -> PruneResult:
        start = self.t0 = time.perf_counter()
        try:
            if self.c.strategy == "linear-greedy":
                self.greedy_linear()
            elif self.c.strategy == "ppl-greedy":
                self.greedy_ppl()
            else:
                chosen = self.choose_once()
                for lo, hi in runs_of(list(chosen)):
                    p = self.alive.index(lo)
                    self.remove_run(p, p + (hi - lo), chosen[lo])
            if self.c.refit and self.c.replace == "linear" and self.c.target == "original":
                self.refit()
            if self.c.refits:
                t0 = time.perf_counter()
                self.reconstruct()
                self.result.reconstruct_s = round(time.perf_counter() - t0, 2)
        finally:
            self.result.state_cache_mb = round(self.store.peak_ram / 2**20, 1)
            self.result.state_spilled_mb = round(self.store.spilled / 2**20, 1)
            self.store.close()
        self.result.calibration_passes = round(
            self._layer_passes / max(len(self.batches) * self.n_orig, 1), 2
        )
        self.result.elapsed_s = round(time.perf_counter() - start, 2)
        return self.result


def _prefix_batches(batches: list[dict[str, Tensor]], tokens: int) -> int:
    """How many leading batches hold at least ``tokens`` real tokens (all of them for 0)."""
    if tokens <= 0:
        return len(batches)
    seen = 0
    for i, b in enumerate(batches):
        seen += int(b["attention_mask"].sum())
        if seen >= tokens:
            return i + 1
    return len(batches)


@torch.no_grad()
def _batches_ppl(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Perplexity over already tokenised batches (SLEB's calibration criterion)."""
    nll, count = pooled_nll(model, batches)
    return math.exp(nll / max(count, 1))


def prune_model_(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    on_step: Callable[[dict], None] | None = None,
    on_progress: Progress = no_progress,
) -> PruneResult:
    """Prune ``model`` in place; returns what was removed (original numbering).
    ``on_progress(what, done, total)`` hears every pass over the calibration batches, after
    each batch (total 0: a phase of unknown length begins)."""
    return _Pruner(model, tokenizer, config, on_step, on_progress).run()


def _ticking(
    batches: list[dict[str, Tensor]], what: str, on_progress: Progress
) -> Iterator[dict[str, Tensor]]:
    on_progress(what, 0, len(batches))
    for i, b in enumerate(batches):
        yield b
        on_progress(what, i + 1, len(batches))


@releases_output
def prune(
    model: str | None = None,
    config: PruneConfig | None = None,
    eval_data: str | None = "builtin:eval",
    eval_tokens: int = 16384,
    out: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    on_step: Callable[[dict], None] | None = None,
    ood_data: str | None = "default",
    on_progress: Progress = no_progress,
) -> dict:
    """Load, prune, evaluate before/after, and write a loadable checkpoint to ``out``.

    Perplexity is taken on ``eval_data`` and on ``ood_data``, English of another kind than the
    calibration text ("default": ``data.default_ood()``, None to skip), because maps fitted on
    one domain can look much better there than elsewhere. Everything that can be checked is
    checked before the model is loaded: the output directory, the data sources, the layer
    count against ``remove`` / ``layers``, whether ``fold`` is possible for the architecture.
    """
    c = config or PruneConfig()
    out_dir = Path(out) if out is not None else Path("linearize-out") / "pruned"
    claim_output(out_dir)
    hf_config = models.load_config(model)
    n = getattr(hf_config, arch.n_layers_key(hf_config))
    c.check(n, hf_config)
    data.calib_parts(c.calib)
    ood_data = data.eval_sources(eval_data, ood_data)
    lm, tok = models.load(model, dtype=dtype, device=device, savable=True)
    held_out = _HeldOut(lm, tok, eval_data, ood_data, c.seq_len, eval_tokens, c.batch_size)
    on_progress("held-out perplexity, before", 0, 0)
    before = held_out("before")
    res = prune_model_(lm, tok, c, on_step, on_progress)
    on_progress("held-out perplexity, after", 0, 0)
    after = held_out("after")
    record = {
        "base_model": model or models.EMBEDDED_NAME,
        "original_layers": n,
        **asdict(c),
        **res.to_dict(),
        "version": __version__,
    }
    report = {
        **record,
        "eval_data": eval_data,
        "ood_data": ood_data,
        "eval_tokens": eval_tokens,
        **before,
        **after,
        **_ratios(before, after),
    }

    def write(tmp: Path) -> None:
        save(lm, tok, tmp, record)
        write_json(tmp / "prune.json", report)

    atomic_dir(out_dir, write)
    render(Path(out_dir) / "prune.json")  # in place: the page names the directory it is in
    return report


def _ratios(before: dict, after: dict) -> dict:
    """Perplexity after ÷ before, in domain and out of domain (where measured)."""
    return {
        f"ratio{sfx}": after[f"perplexity_after{sfx}"] / before[f"perplexity_before{sfx}"]
        for sfx in ("", "_ood")
        if before[f"perplexity_before{sfx}"]
    }


@dataclass
class _HeldOut:
    """Perplexity in and out of domain, and the parameter count, of a model being pruned."""

    lm: nn.Module
    tok: object
    eval_data: str | None
    ood_data: str | None
    seq_len: int
    tokens: int
    batch_size: int

    def __call__(self, when: str) -> dict:
        ppl, ood = held_out_perplexities(
            self.lm,
            self.tok,
            (self.eval_data, self.ood_data),
            self.seq_len,
            self.tokens,
            self.batch_size,
        )
        return {
            f"perplexity_{when}": ppl,
            f"perplexity_{when}_ood": ood,
            f"params_{when}": sum(p.numel() for p in self.lm.parameters()),
        }
