"""The pruning engine: one run's model, calibration batches, stored states, fits and record.

It never names a strategy or a replacement: the strategy (``strategies``) decides which
positions go, through ``score_from``, ``remove_run`` and the pass helpers; the replacement
(``replacements``) decides what stands in for them; ``reconstruct`` refits the kept layers.

Boundary states (see linearize.surgery.restart) let every pass after the first start at the
first layer that a cut changed. Keys in the store: ("o", j, b) is the original model's stream
entering original layer j on batch b (j = n: after the last layer); ("c", p, b) the pruned
model's raw stream entering position p, kept only for p > ``clean``, the last position whose
input still equals the original's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from linearize import arch, data
from linearize.capture import LayerCapture, check_finite, masked_rows
from linearize.errors import LinearizeError
from linearize.selfgen import calibration_sequences
from linearize.stats import AffineMap, PairStats, fit_affine
from linearize.surgery.prune import reconstruct
from linearize.surgery.prune.config import Progress, PruneConfig, PruneResult
from linearize.surgery.restart import BoundaryStore, run_from


class Session:
    """The state of one pruning run (see the module's docstring)."""

    def __init__(
        self, model: nn.Module, tokenizer, c: PruneConfig, on_step, on_progress: Progress
    ) -> None:
        self.model, self.c, self.on_step = model, c, on_step
        self.on_progress = on_progress
        self.strategy, self.replacement = c.chooser, c.replacement
        n = self.n_orig = arch.n_layers(model)
        self.k = c.check(n, model.config)
        self.protected = c.protected(n)
        # without the massive tokens, scores spread by ~1e-3 and are only ranked, never fitted
        # from: float32 products (within 1e-6) give back what keeping own moments costs
        massive = 0.0 if self.strategy.every_token else c.massive
        self.scoring = {"fast": bool(massive), "massive": massive}
        seqs = _calibration(self, tokenizer)
        pad = data.pad_id_of(tokenizer)
        self.batches = list(data.batches(seqs, c.batch_size, pad))
        self.masks = [
            None if bool(b["attention_mask"].all()) else b["attention_mask"].reshape(-1).bool()
            for b in self.batches
        ]
        if self.strategy.needs_ppl_batches:
            self.ppl_batches = list(
                data.batches(_first_tokens(seqs, c.ppl_tokens), c.batch_size, pad)
            )
        self.n_rescore = _prefix_batches(self.batches, c.rescore_tokens)
        self.rescored: dict[int, PairStats] | None = None  # first pass, re-scoring tokens only
        self.alive = list(range(n))  # alive[p] = original index of the layer now at position p
        chosen_by = self.strategy.chosen_by or c.score
        self.result = PruneResult(chosen_by, [])
        self.store = BoundaryStore(int(c.cache_gb * (1 << 30)))
        self.recorded = False  # original boundaries stored
        self.clean = n  # positions ≤ clean take their input from the original's boundaries
        self.valid = -1  # pruned boundaries are stored and current for positions ≤ valid
        self._layer_passes = 0  # layer forwards × batches, for calibration_passes
        self._first_pass: tuple | None = None  # (stats, rescored) of the uncut model's scoring

    def allowed(self, p: int) -> bool:
        """Whether the layer now at position ``p`` may be removed."""
        if self.alive[p] in self.protected:
            return False
        return p >= 1 or not self.replacement.needs_mlp_before

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

    def names(self, start: int, stop: int) -> str:
        """Positions [start, stop) as original layer indices, for progress lines."""
        idx = self.alive[start:stop] or ["none"]
        return f"layer {idx[0]}" if len(idx) == 1 else f"layers {idx[0]}–{idx[-1]}"

    # -- boundary states ----------------------------------------------------------------------
    def key(self, p: int) -> tuple:
        return ("o", p) if p <= self.clean else ("c", p)

    def _record(self, start: int):
        def on_boundary(b: int, j: int, h: Tensor) -> None:
            if j != start or not self.recorded:
                self.store.put(self.key(j) + (b,), h.clone())

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
        state = None if start == 0 else (lambda b: self.store.get(self.key(start) + (b,)))
        batches = self.batches if first is None else self.batches[:first]
        run_from(
            self.model,
            self.pass_over(batches, f"{what}, {self.names(start, stop)}", stop - start),
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
        whole = p == 0 and first is None and n == self.n_orig  # the first pass, uncut
        if whole and self._first_pass is not None:  # a second strategy asks (search's seeds)
            self.rescored = self._first_pass[1]
            return dict(self._first_pass[0])
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
        if whole:
            self._first_pass = (dict(cap.stats), self.rescored)
        return cap.stats

    @property
    def scored_once(self) -> bool:
        """Whether the uncut model's statistics are at hand (another strategy scored it)."""
        return self._first_pass is not None

    def target_of(self, end: int) -> int:
        """Original boundary that a run ending before position ``end`` must reproduce."""
        return self.alive[end] if end < len(self.alive) else self.n_orig

    def stored_pairs(self, x: Callable[[int], Tensor], y: Callable[[int], Tensor]) -> PairStats:
        """Statistics of the pairs (x(b), y(b)) over every batch, padding left out."""
        stats = PairStats()
        for b in range(len(self.batches)):
            stats.update(masked_rows(x(b), self.masks[b]), masked_rows(y(b), self.masks[b]))
        return stats

    def changed(self, p: int) -> None:
        """Boundaries after position p are no longer current (p itself still is)."""
        self.store.drop_where(lambda key: key[0] == "c" and key[1] > p)
        self.valid = min(self.valid, p)
        self.clean = min(self.clean, p)  # inputs after p now differ from the original's

    def fit(self, stats: PairStats, bias: bool = True) -> AffineMap:
        c = self.c
        return fit_affine(stats, c.ridge, bias=bias, prior=c.prior, rank=c.rank)

    def projection_pass(
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

        key = self.key(q)
        run_from(
            self.model,
            self.pass_over(self.batches, f"{what} {self.names(q, q + 1)}", stop - q),
            q,
            stop,
            state or (lambda b: self.store.get(key + (b,))),
            on_boundary,
            lambda running: [(proj, keep)],
        )

    # -- removal ------------------------------------------------------------------------------
    def remove_run(
        self, start: int, end: int, score: float | None, stats: PairStats | None = None
    ) -> int:
        """Remove positions [start, end) with the configured replacement; returns the first
        position whose input changed (where the next pass must start)."""
        if self.c.refits:
            self.ensure_valid(0)  # the refits need the original's states: record them uncut
        fit_error, changed = self.replacement.apply(self, start, end, stats)
        originals = self.alive[start:end]
        del self.alive[start:end]
        self.changed(changed)
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

    def run(self) -> PruneResult:
        start = self.t0 = time.perf_counter()
        try:
            self.strategy.prune(self)
            self.replacement.finish(self)
            if self.c.refits:
                t0 = time.perf_counter()
                reconstruct.reconstruct(self)
                self.result.reconstruct_s = round(time.perf_counter() - t0, 2)
        finally:
            self.result.state_cache_mb = round(self.store.peak_ram / 2**20, 1)
            self.result.state_spilled_mb = round(self.store.spilled / 2**20, 1)
            self.result.state_disk_peak_mb = round(self.store.peak_disk / 2**20, 1)
            self.store.close()
        self.result.calibration_passes = round(
            self._layer_passes / max(len(self.batches) * self.n_orig, 1), 2
        )
        self.result.elapsed_s = round(time.perf_counter() - start, 2)
        return self.result


def _calibration(s: Session, tokenizer) -> list:
    """The calibration sequences, or none when nothing will be fitted or scored (dropping
    named layers needs no text, nor sampling from the model)."""
    c = s.c
    if not c.needs_calibration:
        return []
    s.on_progress("calibration text", 0, 0)
    seqs = calibration_sequences(s.model, tokenizer, c.calib, c.seq_len, c.tokens, s.on_progress)
    if not seqs:
        raise LinearizeError(f"calibration source '{c.calib}' gave no tokens")
    return seqs


def _first_tokens(seqs: list, tokens: int) -> list:
    """The leading sequences holding ``tokens`` tokens, the last one cut to fit."""
    few, used = [], 0
    for s in seqs:
        if used >= tokens:
            break
        few.append(s[: tokens - used])
        used += len(few[-1])
    return few


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


def _ticking(
    batches: list[dict[str, Tensor]], what: str, on_progress: Progress
) -> Iterator[dict[str, Tensor]]:
    on_progress(what, 0, len(batches))
    for i, b in enumerate(batches):
        yield b
        on_progress(what, i + 1, len(batches))
