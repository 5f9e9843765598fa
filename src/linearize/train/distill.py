"""Heal a pruned model: layer-wise distillation against the model it was cut from.

The student is a checkpoint written by ``linearize prune``; ``config.linearize`` says which
original layers it kept. Its residual stream at the input of each kept layer (after any
replacement map) and at the input of the final norm is aligned with the teacher's stream at the
input of the same original layer, and at its final norm. The loss is

    w_hidden · Σ_b hidden(s_b, t_b) / B  +  w_kl · T² · KL(softmax(t/T) ‖ softmax(s/T))
    + w_lm · cross-entropy,

averaged over real tokens, where b runs over the B aligned boundaries and ``hidden`` is
``mse``: ‖s − t‖² / ‖t‖² per token (relative, so boundaries of very different scale count
alike), ``cosine``: 1 − cos(s, t), or ``both``. Teacher states come from a forward pass under
``no_grad`` on the same batch, or, with ``cache_teacher`` (automatic when batches repeat), from safetensors shards written the
first time each batch is seen (worth it with ``epochs`` > 1 or repeated runs).
In one process the student's frozen leading layers, copies of the teacher's, do not run: its
forward starts from the teacher's state where they end (``shared_prefix``), which changes no
loss or gradient and skips about half the student's forward after a mid-depth cut.

The loop runs on accelerate: one CPU process, or DDP under ``torchrun`` / ``accelerate
launch``, bf16 autocast on GPUs, gradient accumulation, warmup + cosine schedule, clipping,
checkpoints every ``save_every`` steps (``resume=True`` continues from the last one with the
same data order), held-out perplexity every ``eval_every`` steps into ``metrics.csv`` (and
TensorBoard event files under ``out/tensorboard`` when tensorboard is installed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor, nn

from linearize import arch, data, models, offload
from linearize._fields import check_choices, option
from linearize._io import claim_output, releases_output, write_json
from linearize.errors import LinearizeError
from linearize.eval.perplexity import held_out_perplexities
from linearize.hooks import record
from linearize.report import render
from linearize.selfgen import Progress, calibration_sequences
from linearize.surgery.replace import save
from linearize.surgery.restart import starting_at
from linearize.train.distill_losses import distill_loss
from linearize.train.loop import Every, Loop, Schedule
from linearize.train.student import boundaries, select_trainable_, shared_prefix
from linearize.train.teacher import TeacherCache, teacher_cache, teacher_pass

TRAIN_MODES = ("replacements", "replacements+neighbors", "from-cut", "lora", "all")
HIDDEN_LOSSES = ("mse", "cosine", "both")


@dataclass
class DistillConfig(models.Placement):
    """One distillation run. Every field is an option of ``linearize distill``."""

    teacher: str | None = option(None, "the original model (default: the one recorded in STUDENT)")
    data: str = option(
        "builtin:calib",
        "training text source; '+self' adds text sampled from the teacher (e.g. "
        "builtin:calib+self: half each, sampled once and cached)",
    )
    tokens: int = option(
        200_000,
        "training tokens, all processes together (~30 min for SmolLM2 on 2 CPU cores: the "
        "built-in text about twice, the second pass from the teacher cache)",
    )
    seq_len: int = option(512, "tokens per sequence")
    batch_size: int = option(8, "sequences per process per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(5e-4, "peak learning rate (chosen by benchmarks/heal_recipes.py)")
    warmup: float = option(0.05, "share of steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    w_hidden: float = option(1.0, "weight of the layer-wise hidden-state loss")
    w_kl: float = option(1.0, "weight of KL(teacher || student) on logits")
    w_lm: float = option(0.0, "weight of the language-modelling loss")
    hidden_loss: str = option("mse", "the hidden-state loss", choices=HIDDEN_LOSSES)
    temperature: float = option(1.0, "KL temperature")
    train: str = option(
        "replacements+neighbors",
        "what trains (replacements+neighbors: the maps and the kept layers beside each cut; "
        "from-cut: every layer from the one before the first cut to the last)",
        choices=TRAIN_MODES,
    )
    lora_rank: int = option(16, "LoRA rank with --train lora")
    eval_data: str = option(
        "builtin:eval", "held-out perplexity source ('' to skip)", flag="--eval"
    )
    eval_ood: str = option(
        "default",
        "out-of-domain held-out perplexity source, measured beside --eval ('' to skip; default: "
        "'fortunes' when Debian's fortunes package is installed)",
    )
    eval_tokens: int = option(8192, "held-out tokens")
    eval_every: int = option(50, "steps between held-out perplexities")
    save_every: int = option(100, "steps between checkpoints")
    seed: int = option(0, "random seed")
    epochs: int = option(1, "passes over the --tokens training tokens")
    teacher_dtype: str = option(
        "float32", "float32 | bfloat16 | float16 (bfloat16/float16 halve the teacher's memory)"
    )
    cache_teacher: str | None = option(
        None,
        "directory for teacher states, reused by later epochs/runs (default: one in the user "
        "cache when batches repeat; 'off')",
    )

    def check(self) -> None:
        check_choices(self)
        self.check_placement()
        if self.device_map and self.train == "lora":
            raise LinearizeError(
                "--train lora wraps every linear layer, offloaded ones too: not with --device-map"
            )
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise LinearizeError(
                f"unknown --teacher-dtype '{self.teacher_dtype}' (float32, bfloat16, float16)"
            )
        names = ("tokens", "eval_tokens", "seq_len", "batch_size", "grad_accum", "eval_every")
        for name in (*names, "save_every", "epochs"):
            if getattr(self, name) < 1:
                raise LinearizeError(f"--{name.replace('_', '-')} must be at least 1")
        if (
            min(self.w_hidden, self.w_kl, self.w_lm) < 0
            or self.w_hidden + self.w_kl + self.w_lm == 0
        ):
            raise LinearizeError("loss weights must be >= 0 and not all 0")
        if self.temperature <= 0 or self.lr <= 0:
            raise LinearizeError("--temperature and --lr must be positive")


# -- alignment and what trains -------------------------------------------------------------------
def _teacher_name(student_dir: str, student, teacher: str | None) -> str | None:
    if teacher:
        return teacher
    rec = getattr(student.config, "linearize", None)
    if not rec:
        raise LinearizeError(
            f"'{student_dir}' is not a pruned checkpoint (no config.linearize): "
            "name the original model with --teacher"
        )
    base = rec["base_model"]
    return None if base == models.EMBEDDED_NAME else base


def _check_tokenizers(s_tok, t_tok, student, teacher) -> None:
    if s_tok.get_vocab() != t_tok.get_vocab() or (
        student.get_output_embeddings().weight.shape[0]
        != teacher.get_output_embeddings().weight.shape[0]
    ):
        raise LinearizeError("student and teacher have different tokenizers or vocabularies")


def _steps_per_epoch(c: DistillConfig, have: int, per_pass: int, per_step: int) -> int:
    """Optimizer steps that give ``--tokens`` from a source of ``have`` tokens, ``per_pass``
    steps a pass: one pass when it holds them, else as many passes as needed, the last one
    stopping at ``--tokens`` rather than at the source's end."""
    if have >= c.tokens:
        return per_pass
    whole_passes = per_pass * math.ceil(c.tokens / (per_pass * per_step))
    return min(whole_passes, math.ceil(c.tokens * per_pass / have))


def _load_pair(student_dir: str, c: DistillConfig, device: str):
    """(student, its tokenizer, the frozen teacher, the teacher's name) on ``device``."""
    place = dict(device_map=c.device_map, offload=c.offload())
    student, s_tok = models.load(student_dir, "float32", device, savable=True, **place)
    teacher_name = _teacher_name(student_dir, student, c.teacher)
    teacher, t_tok = models.load(teacher_name, c.teacher_dtype, device, **place)
    _check_tokenizers(s_tok, t_tok, student, teacher)
    teacher.requires_grad_(False)
    return student, s_tok, teacher, teacher_name or models.EMBEDDED_NAME


def _micro_batches(
    c: DistillConfig,
    tok,
    loop: Loop,
    per_step: int,
    teacher: nn.Module,
    on_progress: Progress | None = None,
) -> tuple[list[dict[str, Tensor]], int, float, int]:
    """This process's micro-batches of one pass over ``--data``, the optimizer steps of the
    whole run, how often the source repeats to give ``--tokens`` (1.5: one pass and a half),
    and the tokens it holds."""
    if data.SELF in data.calib_parts(c.data):  # every process samples the same (seeded) text
        seqs = calibration_sequences(teacher, tok, c.data, c.seq_len, c.tokens, on_progress)
        seqs = seqs[loop.rank :: loop.world]
    else:
        seqs = list(
            data.token_sequences(
                tok, c.data, c.seq_len, c.tokens, rank=loop.rank, world_size=loop.world
            )
        )
    micro = list(data.batches(seqs, c.batch_size, data.pad_id_of(tok)))
    per_epoch = max(1, len(micro) // c.grad_accum)
    have = sum(len(q) for q in seqs) * loop.world
    if have == 0:
        raise LinearizeError(f"--data {c.data} holds no training tokens")
    steps = _steps_per_epoch(c, have, per_epoch, per_step)
    return micro[: per_epoch * c.grad_accum], steps * c.epochs, steps / per_epoch, have


@dataclass
class _DistillStep:
    """The loss of one micro-batch: everything else is the loop's."""

    c: DistillConfig
    loop: Loop
    teacher: nn.Module
    pairs: list[tuple[nn.Module, nn.Module]]
    micro: list[dict[str, Tensor]]
    cache: TeacherCache | None

    def __post_init__(self) -> None:
        self.s_mods, self.t_mods = [p[0] for p in self.pairs], [p[1] for p in self.pairs]
        # hidden-only losses need no student logits: ask for one position instead of all
        forward = inspect.signature(self.loop.unwrapped().forward).parameters
        hidden_only = not (self.c.w_kl or self.c.w_lm)
        self.head_kw = {"logits_to_keep": 1} if hidden_only and "logits_to_keep" in forward else {}
        # one process: start the student where it stops being a copy of the teacher (DDP keeps
        # the whole forward: its reducer expects the module structure it wrapped; LoRA trains
        # every layer, so nothing is shared)
        student = self.loop.unwrapped()
        shortcut = self.loop.world == 1 and self.c.train != "lora"
        self.start = shared_prefix(student, self.teacher) if shortcut else 0
        if self.start:
            first = arch.get_layers(student)[1][self.start]
            self.start_pair = self.s_mods.index(first)

    def __call__(self, index: int) -> dict[str, Tensor]:
        index %= len(self.micro)  # the same batches every epoch
        b = {k: v.to(self.loop.acc.device) for k, v in self.micro[index].items()}
        t_logits, t_states = teacher_pass(
            self.teacher, self.t_mods, b, index, self.cache, bool(self.c.w_kl)
        )
        shortcut = (
            starting_at(self.loop.unwrapped(), self.start, lambda: t_states[self.start_pair])
            if self.start
            else contextlib.nullcontext()
        )
        with self.loop.acc.autocast(), record(inputs=self.s_mods) as s_in, shortcut:
            s_logits = self.loop.model(**b, use_cache=False, **self.head_kw).logits
        # boundaries inside the shared prefix did not run: they equal the teacher's
        s_states = [t if s is None else s for s, t in zip(s_in.inputs, t_states, strict=True)]
        return distill_loss(s_logits, t_logits, s_states, t_states, b, self.c)


def _last_perplexity(rows: list[dict], key: str = "perplexity") -> float | None:
    found = [r[key] for r in rows if r.get(key) not in (None, "")]
    return float(found[-1]) if found else None


def _held_out(c: DistillConfig, loop: Loop, tok) -> tuple[Callable | None, dict, str | None]:
    """The held-out evaluation (None with no --eval), the perplexities before training (taken
    now, or read back from the step-0 row of a resumed run) and the out-of-domain source."""
    if not c.eval_data:
        return None, {}, None
    ood = data.eval_sources(c.eval_data, c.eval_ood)

    def held_out(step: int) -> dict:
        ppl, ppl_ood = held_out_perplexities(
            loop.unwrapped(), tok, (c.eval_data, ood), c.seq_len, c.eval_tokens, c.batch_size
        )
        return {"perplexity": ppl, **({"perplexity_ood": ppl_ood} if ood else {})}

    before: dict = {}
    if loop.step == 0 and loop.is_main:
        before = held_out(0)
        loop.rows.insert(0, {"step": 0, "tokens": 0, **before})
    elif loop.rows and str(loop.rows[0].get("step")) == "0":  # resumed: its step-0 row (CSV)
        before = {k: float(v) for k, v in loop.rows[0].items() if k.startswith("perplexity") and v}
    return held_out, before, ood


@releases_output
def distill(
    student_dir: str,
    config: DistillConfig | None = None,
    out: str | Path = "linearize-out/distilled",
    resume: bool = False,
    device: str = "auto",
    on_step: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
    on_progress: Progress | None = None,
) -> dict:
    """Distill ``student_dir`` against its teacher; writes ``out/final`` and returns a summary.
    ``on_progress`` sees the work before the first step (text sampled from the teacher, which
    takes minutes when the pool on disk lacks it); ``on_step`` sees every step.

    ``max_steps`` stops early (after saving a checkpoint), as a kill would; the schedule still
    follows ``config.tokens``.
    """
    from accelerate.utils import set_seed

    c = config or DistillConfig()
    c.check()
    out = Path(out)
    claim_output(out, model=[student_dir, c.teacher])
    data.calib_parts(c.data)
    if c.eval_data:  # both held-out sources are checked before anything loads
        data.eval_sources(c.eval_data, c.eval_ood)
    loop = Loop(out, c.grad_accum, device)
    per_step = loop.tokens_per_step(c.seq_len, c.batch_size, c.tokens)
    student, tok, teacher, name = _load_pair(student_dir, c, loop.device)
    pairs = boundaries(student, teacher)
    set_seed(c.seed)
    trainable = select_trainable_(student, c.train, c.lora_rank)
    offload.resident_trainable_(student)  # an optimizer steps weights that stay put
    sampling = on_progress if loop.is_main else None
    micro, total_steps, passes, have = _micro_batches(c, tok, loop, per_step, teacher, sampling)
    cache = teacher_cache(c, loop.acc, teacher, name, pairs, passes)
    if passes > 1 and loop.is_main:
        _say_repeats(c, have, passes, total_steps, cache)
    schedule = Schedule(c.lr, total_steps, c.warmup, c.weight_decay, c.max_grad_norm)
    loop.prepare(trainable, schedule, resume)

    held_out, before, ood = _held_out(c, loop, tok)
    every = Every(c.save_every, c.eval_every, held_out, on_step=on_step)
    loop.run(_DistillStep(c, loop, teacher, pairs, micro, cache), every, max_steps)
    summary = {
        "student": student_dir,
        "teacher": name,
        "config": asdict(c),
        "eval_ood_data": ood,
        "placement": models.placement_of(student),
        **loop.summary(),
        "perplexity_before": before.get("perplexity"),
        "perplexity_after": _last_perplexity(loop.rows),
        "perplexity_before_ood": before.get("perplexity_ood"),
        "perplexity_after_ood": _last_perplexity(loop.rows, "perplexity_ood"),
    }
    if loop.finished:  # a run stopped early keeps its state in the checkpoint
        _save_final(loop, c, tok, summary)
    return summary


def _say_repeats(
    c: DistillConfig, have: int, passes: float, total_steps: int, cache: TeacherCache | None
) -> None:
    cached = f"; teacher states cached in {cache.root}" if cache is not None else ""
    warnings.warn(
        f"--data {c.data} holds {have:,} training tokens, under --tokens {c.tokens:,}: "
        f"repeating it {passes:.3g}× ({total_steps} steps){cached}",
        stacklevel=3,
    )


def _save_final(loop: Loop, c: DistillConfig, tok, summary: dict) -> None:
    """``out/final``: the healed student (LoRA merged), with the run in config.linearize."""

    def write(tmp: Path) -> None:
        final = loop.unwrapped()
        if c.train == "lora":
            final = final.merge_and_unload()
        final.eval()
        rec = dict(getattr(final.config, "linearize", None) or {})
        rec["distill"] = summary
        save(final, tok, tmp, rec)

    if loop.is_main:  # the record first: out/final in place means the run has ended
        write_json(loop.out / "distill.json", {**summary, "rows": loop.rows})
    loop.save_final(write)
    if loop.is_main:
        render(loop.out / "distill.json")
