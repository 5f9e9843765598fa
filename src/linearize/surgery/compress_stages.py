"""The stages of ``linearize compress``, each a function of the run that records what it found
(see linearize.surgery.compress for the chain and why it is one command)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearize import data, models
from linearize._io import write_json
from linearize.errors import LinearizeError
from linearize.eval.bench import BenchConfig, bench_loaded
from linearize.eval.perplexity import held_out_perplexities
from linearize.report import render
from linearize.report.labels import num
from linearize.surgery.export import export_gguf
from linearize.surgery.prune import PruneConfig, prune
from linearize.train.distill import DistillConfig, distill
from linearize.train.loop import latest_checkpoint

Progress = Callable[[str, int, int], None]
Say = Callable[[str], None]


@dataclass
class Run:
    """The state of one compress run: its directory, settings and ``compress.json``."""

    out: Path
    model: str | None
    c: Any  # CompressConfig
    prune: PruneConfig
    distill: DistillConfig
    bench: BenchConfig
    record: dict

    @property
    def json(self) -> Path:
        return self.out / "compress.json"

    def done(self, stage: str) -> bool:
        return self.record["stages"].get(stage, {}).get("status") == "done"

    def finish(self, stage: str, started: float, **found) -> None:
        """Record ``stage`` as done (atomically) and refresh the page."""
        elapsed = round(time.perf_counter() - started, 1)
        self.record["stages"][stage] = {**found, "status": "done", "elapsed_s": elapsed}
        write_json(self.json, self.record)
        render(self.json)


def model_dir(out: Path) -> Path:
    """Where the compressed stock checkpoint goes."""
    return out / "model"


def move_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (replacing it): one atomic step on one file system."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LinearizeError(f"cannot read '{path}': {type(e).__name__}") from None


def cut(run: Run, device: str, on_progress: Progress, say: Say) -> None:
    """Choose and remove the layers (``linearize prune``) into ``out/pruned``."""
    started = time.perf_counter()
    rep = prune(
        run.model,
        copy.deepcopy(run.prune),
        eval_data=run.c.eval_data or None,
        eval_tokens=run.c.eval_tokens,
        out=run.out / "pruned",
        device=device,
        on_step=lambda s: say(f"removed layer {s['layer']} (score {num(s['score'], 5)})"),
        ood_data=run.c.eval_ood,
        on_progress=on_progress,
    )
    keep = ("removed", "ood_data", "params_before", "params_after")
    run.finish("prune", started, **{k: rep.get(k) for k in keep})


def heal(run: Run, device: str, on_progress: Progress, say: Say) -> None:
    """Distil the cut model against the original (``linearize distill``) in ``out/heal``; its
    final checkpoint becomes ``out/model``. A killed healing resumes from its last checkpoint;
    the optimiser states are deleted once the model is in place."""
    started = time.perf_counter()
    work, final, dst = run.out / "heal", run.out / "heal" / "final", model_dir(run.out)
    if run.c.heal_tokens == 0:
        _copy_dir(run.out / "pruned", dst)
        run.finish("heal", started, skipped="--heal-tokens 0")
        return
    # the healed checkpoint carries its own record (config.linearize.distill): whichever of
    # out/heal/final, out/model, heal/distill.json a kill left, the checkpoint alone says
    # whether the healing ended; the optimiser states go only once out/model is in place
    if not (dst / "config.json").is_file():
        if not (final / "config.json").is_file():
            total = run.distill.tokens * run.distill.epochs

            def on_step(row: dict) -> None:
                done = min(int(row["tokens"]), total)
                on_progress(f"distilling, loss {row['loss']:.4g}", done, total)

            distill(
                str(run.out / "pruned"),
                copy.deepcopy(run.distill),
                work,
                resume=latest_checkpoint(work) is not None,
                device=device,
                on_step=on_step,
                on_progress=on_progress,
            )
        move_dir(final, dst)
    summary = (read_json(dst / "config.json").get("linearize") or {}).get("distill") or {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # out/model holds the result now
    keep = ("steps", "tokens_seen", "perplexity_before", "perplexity_after")
    run.finish("heal", started, **{k: summary.get(k) for k in keep})


def _copy_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    move_dir(tmp, dst)


def default_outtype(checkpoint: Path) -> str:
    """The GGUF type that keeps the checkpoint's precision at half the float32 size: bf16 for
    a bfloat16 model (whose range f16 may overflow), else f16."""
    cfg = read_json(checkpoint / "config.json")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    return "bf16" if "bfloat16" in dtype else "f16"


def export(run: Run, device: str, on_progress: Progress, say: Say) -> None:
    """``out/model.gguf`` (llama.cpp's converter), loaded back to check its logits."""
    started = time.perf_counter()
    if not run.c.gguf:
        run.finish("export", started, skipped="--no-gguf")
        return
    src = model_dir(run.out)
    outtype = default_outtype(src) if run.c.outtype == "auto" else run.c.outtype
    on_progress(f"converting to GGUF ({outtype})", 0, 0)
    rep = export_gguf(str(src), run.out / "model.gguf", outtype)
    on_progress("loading the GGUF back", 0, 0)
    err = gguf_logit_error(src, run.out / "model.gguf")
    run.finish("export", started, **rep, logit_error=err)


@torch.no_grad()
def gguf_logit_error(checkpoint: Path, gguf: Path, tokens: int = 256) -> float:
    """max |logits(GGUF) − logits(checkpoint)| ÷ max |logits(checkpoint)| on held-out text,
    both loaded by transformers in float32: what the GGUF's number type costs."""
    from transformers import AutoModelForCausalLM

    want, tok = models.load(str(checkpoint), dtype="float32", device="cpu")
    back = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    seqs = list(data.token_sequences(tok, "builtin:eval", min(tokens, 128), tokens))
    ids = data.pad_batch(seqs[:2], data.pad_id_of(tok))["input_ids"]
    a, b = want(ids).logits, back(ids).logits
    if a.shape != b.shape:
        raise LinearizeError(f"the GGUF gives logits of shape {tuple(b.shape)}, not {a.shape}")
    return float((b - a).abs().max() / a.abs().max())


def _ratios(row: dict, base: dict) -> dict:
    out = {}
    for sfx in ("", "_ood"):
        v, b = row.get(f"perplexity{sfx}"), base.get(f"perplexity{sfx}")
        out[f"ratio{sfx}"] = v / b if v and b else None
    return out


def quality_rows(prune_rep: dict, healed: tuple[float | None, float | None]) -> list[dict]:
    """Perplexity in and out of domain of the original, the cut and the healed model, with
    ratios to the original and the share of the cut's lost log-perplexity healing won back."""
    rows = [
        {"model": "original", "layers": prune_rep["original_layers"]},
        {"model": "cut", "layers": prune_rep["original_layers"] - len(prune_rep["removed"])},
        {"model": "compressed", "layers": prune_rep["original_layers"] - len(prune_rep["removed"])},
    ]
    for sfx in ("", "_ood"):
        rows[0][f"perplexity{sfx}"] = prune_rep.get(f"perplexity_before{sfx}")
        rows[1][f"perplexity{sfx}"] = prune_rep.get(f"perplexity_after{sfx}")
    rows[2]["perplexity"], rows[2]["perplexity_ood"] = healed
    for r in rows:
        r.update(_ratios(r, rows[0]))
    for sfx in ("", "_ood"):
        cut, heal = rows[1][f"ratio{sfx}"], rows[2][f"ratio{sfx}"]
        ok = cut and heal and cut > 1
        rows[2][f"recovered{sfx}"] = 1 - math.log(heal) / math.log(cut) if ok else None
    return rows


def measure(run: Run, device: str, on_progress: Progress, say: Say) -> None:
    """Held-out perplexity of the result beside the original's and the cut's, and the speed
    of the result against the original, measured interleaved in one process."""
    started = time.perf_counter()
    prune_rep = read_json(run.out / "pruned" / "prune.json")
    result, tok = models.load(str(model_dir(run.out)), device=device)
    on_progress("held-out perplexity of the result", 0, 0)
    ood = data.eval_sources(run.c.eval_data or None, run.c.eval_ood)
    healed = held_out_perplexities(
        result,
        tok,
        (run.c.eval_data or None, ood),
        run.prune.seq_len,
        run.c.eval_tokens,
        run.prune.batch_size,
    )
    rows = quality_rows(prune_rep, healed)
    speed: list[dict] = []
    if run.c.speed:
        original, otok = models.load(run.model, device=device)
        reps = run.bench.repeats
        on_progress("speed, interleaved rounds", 0, reps)
        entries = [
            ("original", original, otok, None),
            ("compressed", result, tok, str(model_dir(run.out))),
        ]
        speed = bench_loaded(entries, run.bench, lambda r: on_progress("speed", r, reps))
        for r, s in zip(rows[::2], speed, strict=True):  # the cut runs as fast as the result
            r.update({k: s[k] for k in ("prefill_tok_s_ratio", "decode_tok_s_b1_ratio")})
        rows[1].update({k: rows[2][k] for k in ("prefill_tok_s_ratio", "decode_tok_s_b1_ratio")})
    run.finish("measure", started, quality=rows, speed=speed)


STEPS = {"prune": cut, "heal": heal, "export": export, "measure": measure}
