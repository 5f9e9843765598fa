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
import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize import arch, data, models
from linearize._fields import option
from linearize._io import atomic_write, claim_output, releases_output, write_json
from linearize.capture import record
from linearize.errors import LinearizeError
from linearize.eval.perplexity import held_out_perplexities
from linearize.report import render
from linearize.selfgen import calibration_sequences
from linearize.surgery.replace import BRIDGE, runs_of, save
from linearize.surgery.restart import starting_at
from linearize.train.loop import Every, Loop, Schedule

TRAIN_MODES = ("replacements", "replacements+neighbors", "lora", "all")
HIDDEN_LOSSES = ("mse", "cosine", "both")


@dataclass
class DistillConfig:
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
    hidden_loss: str = option("mse", "mse | cosine | both")
    temperature: float = option(1.0, "KL temperature")
    train: str = option(
        "replacements+neighbors",
        "replacements+neighbors (the maps and the kept layers beside each cut) | replacements "
        "| lora | all",
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
        if self.train not in TRAIN_MODES:
            raise LinearizeError(
                f"unknown --train '{self.train}' (choose from {', '.join(TRAIN_MODES)})"
            )
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise LinearizeError(
                f"unknown --hidden-loss '{self.hidden_loss}' (choose from {', '.join(HIDDEN_LOSSES)})"
            )
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise LinearizeError(
                f"unknown --teacher-dtype '{self.teacher_dtype}' (float32, bfloat16, float16)"
            )
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "epochs"):
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
def kept_layers(student: nn.Module) -> list[int]:
    """Original indices of the student's layers, from the pruning record (or 1:1)."""
    rec = getattr(student.config, "linearize", None) or {}
    n = arch.n_layers(student)
    if not rec:
        return list(range(n))
    removed = set(rec["removed"])
    kept = [i for i in range(rec["original_layers"]) if i not in removed]
    if len(kept) != n:
        raise LinearizeError(f"the pruning record keeps {len(kept)} layers but the model has {n}")
    return kept


def boundaries(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(student module, teacher module) pairs whose *inputs* are the aligned streams."""
    kept = kept_layers(student)
    _, s_layers = arch.get_layers(student)
    _, t_layers = arch.get_layers(teacher)
    if kept[-1] >= len(t_layers):
        raise LinearizeError(
            f"the teacher has {len(t_layers)} layers; the student needs {kept[-1] + 1}"
        )
    pairs = [(s_layers[j], t_layers[i]) for j, i in enumerate(kept) if j > 0 or i > 0]
    s_norm, t_norm = arch.get_final_norm(student), arch.get_final_norm(teacher)
    if s_norm is not None and t_norm is not None:
        pairs.append((s_norm, t_norm))
    return pairs


def select_trainable_(student: nn.Module, mode: str, lora_rank: int = 16) -> nn.Module:
    """Set requires_grad for ``mode``; returns the model to train (a PEFT wrapper for lora)."""
    rec = getattr(student.config, "linearize", None) or {}
    kept = kept_layers(student)
    _, layers = arch.get_layers(student)
    runs = runs_of(rec.get("removed", []))
    # positions of kept layers right before / after a removed run
    before = [kept.index(lo - 1) for lo, _ in runs if lo - 1 in kept]
    after = [kept.index(hi) for _, hi in runs if hi in kept]
    for p in student.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        return student
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules="all-linear")
        student = get_peft_model(student, cfg)
    for name, p in student.named_parameters():
        if BRIDGE in name:
            p.requires_grad_(True)
    if rec.get("replace") == "fold":  # the maps live in these projections
        for pos in before:
            for p in arch.mlp_out_proj(student, pos).parameters():
                p.requires_grad_(True)
    if mode == "replacements+neighbors":
        for pos in set(before) | set(after):
            for p in layers[pos].parameters():
                p.requires_grad_(True)
    if not any(p.requires_grad for p in student.parameters()):
        raise LinearizeError(
            f"--train {mode}: this student has no replacement to train "
            "(it was pruned with --replace none); use --train replacements+neighbors, all or lora"
        )
    return student


def shared_prefix(student: nn.Module, teacher: nn.Module) -> int:
    """How many leading student layers are frozen, bridge-free copies of the teacher's (same
    embedding, same weights, same dtype), up to a boundary whose teacher state the teacher
    pass records. The student's forward can start there from that state: the same loss and
    gradients for about half the student's forward after a mid-depth cut. 0 when nothing is
    shared (e.g. ``--train all`` or ``lora``)."""
    kept = kept_layers(student)
    _, s_layers = arch.get_layers(student)
    _, t_layers = arch.get_layers(teacher)
    # the teacher pass records its stream at kept layers only: stop at one (kept[p] == p)
    p = 0
    while (
        p + 1 < len(s_layers)
        and kept[p + 1] == p + 1
        and getattr(s_layers[p], BRIDGE, None) is None
        and not any(q.requires_grad for q in s_layers[p].parameters())
    ):
        p += 1
    shared = [(student.get_input_embeddings(), teacher.get_input_embeddings())]
    shared += [(s_layers[i], t_layers[i]) for i in range(p)]
    for s_mod, t_mod in shared:
        a, b = s_mod.state_dict(), t_mod.state_dict()
        if a.keys() != b.keys() or any(
            a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])
            for k in a
        ):
            return 0
        if any(q.requires_grad for q in s_mod.parameters()):
            return 0
    return p


# -- the loss ------------------------------------------------------------------------------------
def hidden_loss(s: Tensor, t: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Mean over real tokens of the chosen per-token loss between (B, T, d) streams."""
    s, t = s.float(), t.float()
    out = s.new_zeros(())
    if kind in ("mse", "both"):
        rel = (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
        out = out + rel[mask].mean()
    if kind in ("cosine", "both"):
        out = out + (1.0 - F.cosine_similarity(s, t, dim=-1))[mask].mean()
    return out


def _log_probs(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(log softmax, softmax) of x/τ in float32 from one exp pass."""
    z = x.float() / tau if tau != 1.0 else x.float()
    z = z - z.amax(-1, keepdim=True)
    e = z.exp()
    total = e.sum(-1, keepdim=True)
    return z - total.log(), e / total


class _ChunkedKL(torch.autograd.Function):
    """Σ_rows τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), a chunk of rows at a time. The forward also
    writes the gradient, τ·(p_s − p_t), which the backward only scales: no float32 copy,
    log-softmax or autograd intermediate of the whole (N, V) logits is ever held, and each
    chunk takes one exp pass per side."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, tau: float, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], chunk):
            ls, ps = _log_probs(s[i : i + chunk], tau)
            lt, pt = _log_probs(t[i : i + chunk], tau)
            total += (pt * (lt - ls)).sum(dtype=torch.float64)
            grad[i : i + chunk] = ((ps - pt) * tau).to(s.dtype)
        ctx.save_for_backward(grad)
        return (total * tau**2).float()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def chunked_kl(student: Tensor, teacher: Tensor, tau: float = 1.0, chunk: int = 16) -> Tensor:
    """τ²·KL(teacher ‖ student) per row, averaged over the (N, V) rows: what
    ``F.kl_div(log_softmax(s/τ), log_softmax(t/τ), log_target=True, reduction="batchmean")·τ²``
    gives, at a fraction of the memory traffic. ``chunk`` rows of a 49k vocabulary are ~3 MB,
    about what stays in cache: 16 rows measured 2.3× faster than the whole-tensor path on
    2 CPU cores, 512 rows slower than it."""
    return _ChunkedKL.apply(student, teacher.detach(), tau, chunk) / student.shape[0]


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    s_states: list[Tensor],
    t_states: list[Tensor],
    batch: dict[str, Tensor],
    c: DistillConfig,
) -> dict[str, Tensor]:
    mask = batch["attention_mask"].bool()  # (B, T)
    parts: dict[str, Tensor] = {}
    if c.w_hidden:
        losses = [
            hidden_loss(s, t.to(s.device), mask, c.hidden_loss) for s, t in zip(s_states, t_states)
        ]
        parts["hidden"] = torch.stack(losses).mean() if losses else s_states[0].new_zeros(())
    if c.w_kl:
        full = bool(mask.all())
        rows = (lambda x: x.flatten(0, 1)) if full else (lambda x: x[mask])  # (N, V), real tokens
        s_rows, t_rows = rows(student_logits), rows(teacher_logits)
        parts["kl"] = chunked_kl(s_rows, t_rows, c.temperature)
    if c.w_lm:
        ids = batch["input_ids"]
        keep = mask[:, 1:]
        parts["lm"] = F.cross_entropy(student_logits[:, :-1][keep].float(), ids[:, 1:][keep])
    total = (
        c.w_hidden * parts.get("hidden", 0.0)
        + c.w_kl * parts.get("kl", 0.0)
        + c.w_lm * parts.get("lm", 0.0)
    )
    return {"loss": total, **parts}


# -- teacher states on disk ------------------------------------------------------------------------
class TeacherCache:
    """Teacher boundary states of each micro-batch as safetensors shards, one file per batch.

    Only the boundary *inputs* are stored (the last one is the final norm's input); logits are
    recomputed from it through the teacher's norm and LM head, a d×V product instead of V floats
    per token on disk. ``manifest.json`` pins what the shards were computed from, so a cache is
    never reused for other data, another teacher or another batch layout.
    """

    def __init__(self, root: str | Path, manifest: dict, rank: int) -> None:
        self.root, self.rank = Path(root), rank
        path = self.root / "manifest.json"
        if path.exists():
            found = json.loads(path.read_text())
            if found != manifest:
                diff = sorted(k for k in manifest if found.get(k) != manifest[k])
                raise LinearizeError(
                    f"--cache-teacher {root} was written for other settings "
                    f"({', '.join(diff)}); use another directory"
                )
        elif rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(path, manifest)

    def _file(self, index: int) -> Path:
        return self.root / f"rank{self.rank}-{index:06d}.safetensors"

    def get(self, index: int, device) -> list[Tensor] | None:
        from safetensors.torch import load_file

        f = self._file(index)
        if not f.exists():
            return None
        d = load_file(str(f), device=str(device))
        return [d[f"b{i}"] for i in range(len(d))]

    def put(self, index: int, states: list[Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"b{i}": s.detach().contiguous().cpu() for i, s in enumerate(states)}
        atomic_write(self._file(index), lambda tmp: save_file(tensors, str(tmp)))


def logits_from_final(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits from the input of its final norm (Gemma's soft cap included)."""
    logits = teacher.get_output_embeddings()(arch.get_final_norm(teacher)(x))
    cap = getattr(teacher.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# -- the run --------------------------------------------------------------------------------------
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


def _passes(c: DistillConfig, have: int, one_pass: int) -> int:
    """How often a source of ``have`` tokens, shorter than ``--tokens``, must repeat to give
    them (1 when it is not shorter); ``one_pass`` is what one pass trains on."""
    if have >= c.tokens or one_pass <= 0:
        return 1
    return math.ceil(c.tokens / one_pass)


def _auto_cache_dir(manifest: dict, teacher: nn.Module, t_mods: list[nn.Module]) -> Path:
    """Where teacher states go when a batch will be seen again and no --cache-teacher was
    given: the user cache, keyed by everything the states depend on (which teacher modules
    feed the boundaries included)."""
    names = {id(m): n for n, m in teacher.named_modules()}
    key = json.dumps(
        [manifest, models.weights_digest(teacher), [names.get(id(m), "?") for m in t_mods]],
        sort_keys=True,
    )
    return models.cache_dir() / "teacher-states" / hashlib.sha1(key.encode()).hexdigest()[:16]


def _teacher_cache(
    c: DistillConfig, acc, teacher: nn.Module, name: str, pairs: list, passes: int
) -> TeacherCache | None:
    """The teacher-state cache: ``--cache-teacher DIR``, or by itself in the user cache when a
    batch will be seen again (epochs, repeats), or none (``off``, or nothing repeats)."""
    manifest = {
        "teacher": name,
        "data": c.data,
        "tokens": c.tokens,
        "seq_len": c.seq_len,
        "batch_size": c.batch_size,
        "world_size": acc.num_processes,
        "boundaries": len(pairs),
        "dtype": c.teacher_dtype,
    }
    cache_dir = c.cache_teacher
    if cache_dir is None and c.epochs * passes > 1 and arch.get_final_norm(teacher) is not None:
        cache_dir = str(_auto_cache_dir(manifest, teacher, [p[1] for p in pairs]))
    if not cache_dir or cache_dir == "off":
        return None
    if arch.get_final_norm(teacher) is None:
        raise LinearizeError(
            "--cache-teacher needs a model with a final norm in the architecture table"
        )
    acc.wait_for_everyone()
    return TeacherCache(cache_dir, manifest, acc.process_index)


def _load_pair(student_dir: str, c: DistillConfig, device: str):
    """(student, its tokenizer, the frozen teacher, the teacher's name) on ``device``."""
    student, s_tok = models.load(student_dir, dtype="float32", device=device, savable=True)
    teacher_name = _teacher_name(student_dir, student, c.teacher)
    teacher, t_tok = models.load(teacher_name, dtype=c.teacher_dtype, device=device)
    _check_tokenizers(s_tok, t_tok, student, teacher)
    teacher.requires_grad_(False)
    return student, s_tok, teacher, teacher_name or models.EMBEDDED_NAME


def _micro_batches(
    c: DistillConfig, tok, loop: Loop, per_step: int, teacher: nn.Module
) -> tuple[list[dict[str, Tensor]], int, int, int]:
    """This process's micro-batches of one pass over ``--data``, the optimizer steps of the
    whole run, how often the source repeats to give ``--tokens``, and the tokens it holds."""
    if data.SELF in data.calib_parts(c.data):  # every process samples the same (seeded) text
        seqs = calibration_sequences(teacher, tok, c.data, c.seq_len, c.tokens)
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
    passes = _passes(c, have, per_epoch * per_step)
    return micro[: per_epoch * c.grad_accum], per_epoch * c.epochs * passes, passes, have


def _teacher_pass(
    teacher: nn.Module,
    t_mods: list[nn.Module],
    b: dict[str, Tensor],
    index: int,
    cache: TeacherCache | None,
    want_logits: bool,
) -> tuple[Tensor | None, list[Tensor]]:
    """Teacher logits (when the loss needs them) and boundary states for micro-batch
    ``index``, read from the cache when it holds them."""
    states = cache.get(index, b["input_ids"].device) if cache is not None else None
    with torch.no_grad():
        if states is not None:
            return (logits_from_final(teacher, states[-1]) if want_logits else None), states
        with record(inputs=t_mods) as t_in:
            if want_logits:
                logits = teacher(**b, use_cache=False).logits
            else:  # only the states are needed: the body alone, no LM head
                teacher.base_model(**b, use_cache=False)
                logits = None
    if cache is not None:
        cache.put(index, t_in.inputs)
    return logits, t_in.inputs


@dataclass
class _Step:
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
        t_logits, t_states = _teacher_pass(
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
) -> dict:
    """Distill ``student_dir`` against its teacher; writes ``out/final`` and returns a summary.

    ``max_steps`` stops early (after saving a checkpoint), as a kill would; the schedule still
    follows ``config.tokens``.
    """
    from accelerate.utils import set_seed

    c = config or DistillConfig()
    c.check()
    out = Path(out)
    claim_output(out)
    data.calib_parts(c.data)
    if c.eval_data:  # both held-out sources are checked before anything loads
        data.eval_sources(c.eval_data, c.eval_ood)
    loop = Loop(out, c.grad_accum, device)
    per_step = loop.tokens_per_step(c.seq_len, c.batch_size, c.tokens)
    student, tok, teacher, name = _load_pair(student_dir, c, loop.device)
    pairs = boundaries(student, teacher)
    set_seed(c.seed)
    trainable = select_trainable_(student, c.train, c.lora_rank)
    micro, total_steps, passes, have = _micro_batches(c, tok, loop, per_step, teacher)
    cache = _teacher_cache(c, loop.acc, teacher, name, pairs, passes)
    if passes > 1 and loop.is_main:
        _say_repeats(c, have, passes, total_steps, cache)
    schedule = Schedule(c.lr, total_steps, c.warmup, c.weight_decay, c.max_grad_norm)
    loop.prepare(trainable, schedule, resume)

    held_out, before, ood = _held_out(c, loop, tok)
    every = Every(c.save_every, c.eval_every, held_out, on_step=on_step)
    loop.run(_Step(c, loop, teacher, pairs, micro, cache), every, max_steps)
    summary = {
        "student": student_dir,
        "teacher": name,
        "config": asdict(c),
        "eval_ood_data": ood,
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
    c: DistillConfig, have: int, passes: int, total_steps: int, cache: TeacherCache | None
) -> None:
    cached = f"; teacher states cached in {cache.root}" if cache is not None else ""
    warnings.warn(
        f"--data {c.data} holds {have:,} training tokens, under --tokens {c.tokens:,}: "
        f"repeating it {passes}× ({total_steps} steps){cached}",
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

    loop.save_final(write)
    if loop.is_main:
        write_json(loop.out / "distill.json", {**summary, "rows": loop.rows})
        render(loop.out / "distill.json")
