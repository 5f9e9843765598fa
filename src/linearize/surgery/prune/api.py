"""``prune``: load a model, prune it, measure it before and after, write a loadable checkpoint;
``prune_model_`` for a model already in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from linearize import arch, data, models, plan
from linearize._io import atomic_dir, claim_output, releases_output, write_json
from linearize._version import __version__
from linearize.errors import memory_errors
from linearize.eval.perplexity import held_out_perplexities
from linearize.report import render
from linearize.surgery.prune.config import Progress, PruneConfig, PruneResult, no_progress
from linearize.surgery.prune.session import Session
from linearize.surgery.replace import save


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
    return Session(model, tokenizer, config, on_step, on_progress).run()


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
    claim_output(out_dir, model=model, replaces="prune.json")
    hf_config = models.load_config(model)
    n = getattr(hf_config, arch.n_layers_key(hf_config))
    c.check(n, hf_config)
    data.calib_parts(c.calib)
    ood_data = data.eval_sources(eval_data, ood_data)
    _refuse_what_does_not_fit(hf_config, model, c, eval_tokens, dtype, device, out_dir)
    with memory_errors(_LESS_MEMORY):
        lm, tok = models.load(model, dtype, device, c.device_map, savable=True, offload=c.offload())
        placement = models.placement_of(lm)  # as loaded, before any layer goes
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
        "strategy_reference": c.chooser.reference,
        **res.to_dict(),
        "version": __version__,
    }
    protocol = dict(
        eval_data=eval_data, ood_data=ood_data, eval_tokens=eval_tokens, placement=placement
    )
    report = {**record, **protocol, **before, **after, **_ratios(before, after)}

    def write(tmp: Path) -> None:
        save(lm, tok, tmp, record)
        write_json(tmp / "prune.json", report)

    atomic_dir(out_dir, write)
    render(Path(out_dir) / "prune.json")  # in place: the page names the directory it is in
    return report


_LESS_MEMORY = (
    "lower --cache-gb (more of the stored states go to disk), --tokens or --batch-size, or "
    "load the model with --dtype bfloat16"
)


def _refuse_what_does_not_fit(hf_config, model, c, eval_tokens, dtype, device, out_dir) -> None:
    """The plan of this prune (``--dry-run`` prints it), checked against the free disk and
    the machine's RAM before the model is loaded."""
    torch_dtype = models.pick_dtype(dtype, models.pick_device(device))
    label = model or models.EMBEDDED_NAME
    need = plan.prune_plan(hf_config, label, c, eval_tokens, torch_dtype)
    plan.check_fits(
        need,
        out_dir,
        ram_flag="lower --cache-gb (more of the stored states go to disk)",
        disk_flags="raise --cache-gb (more states in RAM), lower --tokens (fewer states), "
        "or point TMPDIR / --out at a larger disk",
    )


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
