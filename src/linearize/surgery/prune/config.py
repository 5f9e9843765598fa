"""What a pruning run is asked to do (``PruneConfig``) and what it did (``PruneResult``).

The config never names a strategy or a replacement: it asks the registries
(``strategies.get``, ``replacements.get``) for what each one needs checked, so adding either
touches no line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from linearize import arch
from linearize._fields import check_choices, int_list, option
from linearize.capture import check_massive
from linearize.errors import LinearizeError
from linearize.models import Placement
from linearize.stats import PRIORS
from linearize.surgery.prune import replacements, strategies
from linearize.surgery.prune.strategies.base import parse_remove

SCORES = ("linearity", "linearity_no_residual", "replacement_error")
FIT_TARGETS = ("auto", "local", "original")
Progress = Callable[[str, int, int], None]  # (what, batches done, batches in it; 0: unknown)


def no_progress(what: str, done: int, total: int) -> None:
    """The ``Progress`` that shows nothing."""


@dataclass
class PruneConfig(Placement):
    """One pruning request; every command and API entry point takes this."""

    remove: str | int = option(8, "layers to remove: a count (8) or a share (25%)", cli=str)
    strategy: str = option(
        "linear-greedy",
        "how layers are chosen (with --sweep: a list, or all)",
        choices=strategies.names,
        what="strategy",
        panel="Choice of layers",
    )
    replace: str = option(
        "linear",
        "what stands in for them (with --sweep: a list)",
        choices=replacements.names,
        what="replacement",
        panel="Replacement",
    )
    score: str = option(
        "linearity",
        "linear-*: the per-layer score",
        choices=SCORES,
        what="score",
        panel="Choice of layers",
    )
    layers: list[int] | None = option(
        None,
        "with --strategy layers: original 0-based indices, e.g. 3,7,9",
        cli=str,
        parse=int_list,
        panel="Choice of layers",
    )
    calib: str = option(
        "builtin:calib+self",
        "calibration sources joined by '+'; 'self' is text sampled from the model itself "
        "(generated once, cached)",
        panel="Calibration",
    )
    tokens: int = option(
        131072,
        "calibration tokens (half of them sampled from the model with the default --calib: "
        "more text is what made the fits hold on other text; see docs/prune.md)",
        panel="Calibration",
    )
    seq_len: int = option(512, "tokens per calibration sequence", panel="Calibration")
    batch_size: int = option(8, "sequences per forward pass", panel="Calibration")
    ridge: float = option(
        0.0, "ridge for the linear fits, relative to tr(XᵀX)/d", panel="Replacement"
    )
    protect: list[int] | None = option(
        None,
        "original layer indices that no strategy removes; negative ones count from the end "
        "(-1: the last layer)",
        cli=str,
        parse=int_list,
        panel="Choice of layers",
    )
    massive: float = option(
        0.0,
        "score layers without the tokens whose state norm passes this many times the batch "
        "median (attention sinks, which otherwise decide the linearity score); 0: all tokens",
        panel="Choice of layers",
    )
    ppl_tokens: int = option(
        4096, "ppl-*: calibration tokens scored per candidate removal", panel="Choice of layers"
    )
    fit_target: str = option(
        "auto",
        "what a map is fitted to (original: the original model's state, from the pruned "
        "model's actual input; local: the removed layers' own output; auto: original for "
        "linear, local for fold)",
        choices=FIT_TARGETS,
        what="fit target",
        panel="Replacement",
    )
    prior: str = option(
        "zero",
        "what --ridge pulls a map towards",
        choices=PRIORS,
        what="prior",
        panel="Replacement",
    )
    rank: int | None = option(
        None, "keep only a rank-r update W − I (default: full)", panel="Replacement"
    )
    fit_weight: str = option(
        "none",
        "fold: weight of each token in the fit (norm: 1/‖target‖, so the fit matches the "
        "direction the next layer's norm reads, ReplaceMe's cosine objective in closed form)",
        choices=("none", "norm"),
        what="--fit-weight",
        panel="Replacement",
    )
    refit: bool = option(
        False,
        "--fit-target original: refit every map once more at the end",
        panel="Replacement",
    )
    restart: bool = option(
        True,
        "greedy: re-run only the layers after each cut (--no-restart: full passes)",
        panel="Resources",
    )
    cache_gb: float = option(
        4.0, "RAM for stored calibration states (the rest spills to disk)", panel="Resources"
    )
    reconstruct: int | None = option(
        None,
        "refit the MLP output projection of the first N kept layers after each cut to the "
        "original model's state there (closed-form least squares, no training; default: 2 for "
        "linear and fold, 0 for none, which then only drops layers)",
        panel="Reconstruction",
    )
    reconstruct_attention: bool = option(
        True,
        "--reconstruct: refit each of those layers' attention output projection too (to the "
        "original's state between attention and MLP), before its MLP's",
        panel="Reconstruction",
    )
    reconstruct_ridge: float = option(
        0.1,
        "--reconstruct: ridge pulling each refit toward its weights, relative to tr(XᵀX)/d",
        panel="Reconstruction",
    )
    rescore_tokens: int = option(
        8192,
        "linear-greedy: calibration tokens that re-score the layers after each cut (the first "
        "pass and every fit use all --tokens; 0: all)",
        panel="Resources",
    )
    seed: int = option(0, "random seed (search: its mutations)", panel="Search")
    search_generations: int = option(
        12, "search: generations (each: offspring scored on growing token budgets)", panel="Search"
    )
    search_offspring: int = option(16, "search: offspring per generation", panel="Search")
    search_tokens: int = option(
        32768, "search: calibration tokens the runs' maps are fitted on", panel="Search"
    )
    search_eval_tokens: int = option(
        8192,
        "search: calibration tokens a generation's best offspring is scored on (the others: "
        "1/16 and 1/4 of them)",
        panel="Search",
    )
    search_heldout_tokens: int = option(
        8192,
        "search: the last calibration tokens, never searched on: the result and the seeds are "
        "scored there",
        panel="Search",
    )
    search_seeds: str = option(
        "auto",
        "search: strategies whose choices seed it, comma-separated (auto: every registered one "
        "but ppl-greedy, whose k × layers perplexity passes cost more than the search; all)",
        panel="Search",
    )

    def check(self, n: int, hf_config=None) -> int:
        """Validate against a model of ``n`` layers (and its config, for ``fold``); returns k.
        No work is done."""
        check_choices(self)
        self.check_placement()
        if self.rank is not None and self.rank < 0:
            raise LinearizeError(f"--rank must be at least 0, got {self.rank}")
        if self.ridge < 0:
            raise LinearizeError(f"--ridge must be at least 0, got {self.ridge}")
        protect = self.protect or []
        if any(not -n <= i < n for i in protect):
            raise LinearizeError(
                f"--protect {list(protect)} out of range: the model has {n} layers"
            )
        strategy = self.chooser
        if self.protected(n) & set(strategy.fixed(self) or []):
            raise LinearizeError("--layers names a layer that --protect keeps")
        check_massive(self.massive)
        k = strategy.check(self, n, hf_config)
        if k is None:
            k = parse_remove(self.remove, n)
            if k > n - len(self.protected(n)):
                raise LinearizeError(
                    f"--remove {k} with --protect {list(protect)}: too few layers left"
                )
        if self.replacement.needs_mlp_before:
            if hf_config is not None:
                arch.check_foldable(hf_config)
            if 0 in (strategy.fixed(self) or []):
                raise LinearizeError(
                    f"--replace {self.replace} cannot remove layer 0: no MLP comes before it"
                )
        self._check_amounts()
        return k

    def _check_amounts(self) -> None:
        if self.ppl_tokens < 1:
            raise LinearizeError(f"--ppl-tokens must be at least 1, got {self.ppl_tokens}")
        if (self.reconstruct or 0) < 0 or self.reconstruct_ridge < 0:
            raise LinearizeError("--reconstruct and --reconstruct-ridge must be at least 0")
        if self.cache_gb < 0:
            raise LinearizeError(f"--cache-gb must be at least 0, got {self.cache_gb}")
        if self.rescore_tokens < 0:
            raise LinearizeError(f"--rescore-tokens must be at least 0, got {self.rescore_tokens}")

    def protected(self, n: int) -> set[int]:
        """``protect`` as original indices of a model of ``n`` layers (negative from the end)."""
        return {i % n for i in self.protect or []}

    @property
    def needs_calibration(self) -> bool:
        """Whether the run reads calibration text at all (dropping named layers fits nothing,
        so it needs none, nor sampling from the model)."""
        return self.chooser.needs_calibration(self) or self.replacement.fits or bool(self.refits)

    @property
    def chooser(self) -> strategies.Strategy:
        """The registered strategy ``strategy`` names."""
        return strategies.get(self.strategy)

    @property
    def replacement(self) -> replacements.Replacement:
        return replacements.get(self.replace)

    @property
    def refits(self) -> int:
        """Layers refit after each cut: ``reconstruct``, by default 2 with a map or a fold
        and 0 for ``none``, so that plain dropping stays the baseline it is named for."""
        if self.reconstruct is None:
            return self.replacement.default_refits
        return self.reconstruct

    @property
    def target(self) -> str:
        """The fit target in force: ``auto`` is ``original`` for linear maps (measured better in
        and out of domain) and ``local`` for fold, where fitting one MLP projection to the
        original's state lost to the local fit (benchmarks/RESULTS.md)."""
        if self.fit_target != "auto":
            return self.fit_target
        return self.replacement.default_target


@dataclass
class PruneResult:
    """What was removed, in removal order, with the score that chose each layer."""

    chosen_by: str  # the criterion's name, or "user"
    removed: list[int]
    steps: list[dict] = field(default_factory=list)
    forward_passes: int = 0  # calibration forward passes (batches) spent, whole or partial
    calibration_passes: float = 0.0  # layer forwards spent ÷ one full pass of the original
    state_cache_mb: float = 0.0  # peak RAM of the stored boundary states
    state_spilled_mb: float = 0.0  # boundary states written to disk (over the RAM budget), in all
    state_disk_peak_mb: float = 0.0  # the most of them on disk at once
    reconstructed: list[int] = field(default_factory=list)  # layers whose projection was refit
    reconstructed_attention: list[int] = field(default_factory=list)  # ... attention's too
    reconstruct_s: float = 0.0  # time of those refits (in elapsed_s)
    first_pass_s: float | None = None  # greedy: time of the first, full scoring pass
    elapsed_s: float = 0.0
    # every layer's criterion (and scores, where measured) before the first cut: the page's curve
    initial: list[dict] = field(default_factory=list)
    search: dict | None = None  # the search strategy's seeds, trace and held-out check

    def to_dict(self) -> dict:
        return asdict(self)
