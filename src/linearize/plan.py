"""What a run will need, before it runs: peak RAM, disk, passes over the text, and (when the
weights are at hand) time, from the model's config alone.

The model is built on the meta device (no weights read, no memory taken), so a user can plan
an 8B or 70B run from a directory that holds only ``config.json``. Every figure is an estimate
from the sizes that dominate (weights, stored boundary states, float64 statistics, optimizer
states, outputs), with the assumption each rests on written next to it in ``notes``.
Commands refuse up front a run whose plan does not fit the free disk or the RAM given
(``check_fits``), in one line that names the flag that changes it.
"""

from __future__ import annotations

import copy
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from linearize import arch, data, models
from linearize.errors import LinearizeError
from linearize.surgery.replace import runs_of

if TYPE_CHECKING:
    from linearize.surgery.prune.config import PruneConfig
    from linearize.train.distill import DistillConfig

GB = 1 << 30
BASE_RAM = int(0.7 * GB)  # python, torch, transformers and the tokenizer, measured ~0.6–0.8 GB
# stored boundary states at their most, in copies of one pass's states: the original's, the
# fits' share of the pruned model's (STATE_FITS), and for a greedy strategy the pruned model's
# from the first cut on for the re-scoring tokens (STATE_SUFFIX of the depth: a first cut mid-way).
# Measured on SmolLM2 at k = 8: 1.44 at 16,384 tokens (8,192 re-scoring), 1.07 at 131,072
# in float32 and in bfloat16.
STATE_FITS = 0.05
STATE_SUFFIX = 0.6
STATE_COPIES_BOUND = 2.0


@dataclass
class Shape:
    """The sizes a plan is made of, read from a config."""

    layers: int
    hidden: int
    ffn: int
    vocab: int
    params: int
    bytes_per: int  # of the dtype the run computes in

    @property
    def weights(self) -> int:
        return self.params * self.bytes_per

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (all layers alike)."""
        return max(self.params - 2 * self.vocab * self.hidden, 0) // max(self.layers, 1)


def shape_of(config, dtype: torch.dtype) -> Shape:
    """Count the parameters of the model ``config`` describes on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is not a second matrix
    params = sum(p.numel() for p in model.parameters())
    n = getattr(config, arch.n_layers_key(config))
    hidden = config.hidden_size
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    return Shape(n, hidden, ffn or 4 * hidden, config.vocab_size, params, dtype.itemsize)


@dataclass
class Plan:
    """What one command will need. Bytes, passes over the calibration tokens, seconds."""

    command: str
    model: str
    params: int
    dtype: str
    peak_ram: int
    disk: int  # at the end of the run, outputs included
    spill_disk: int = 0  # of ``disk``: temporary states in the temporary directory
    removed: int = 0  # layers the run removes
    passes: float = 1.0
    seconds: float | None = None
    parts: dict[str, int] = field(default_factory=dict)  # what the peak RAM is made of
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        """The plan as a user reads it."""
        out = [
            f"plan for linearize {self.command} on {self.model} "
            f"({self.params / 1e9:.3g}B parameters, {self.dtype}):",
            f"  peak RAM   ~{_gb(self.peak_ram)} ("
            + ", ".join(f"{k} {_gb(v)}" for k, v in self.parts.items() if v)
            + ")",
            f"  disk       ~{_gb(self.disk)}"
            + (f" (of which {_gb(self.spill_disk)} temporary states)" if self.spill_disk else ""),
            f"  passes     ~{self.passes:.3g} over the calibration text",
        ]
        if self.seconds is not None:
            out.append(f"  time       ~{_duration(self.seconds)} (from a timed forward pass here)")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB" if n >= GB / 10 else f"{n / (1 << 20):.3g} MB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _stats_bytes(s: Shape, layers: int) -> int:
    """PairStats of ``layers`` layers in float64: X'X', X'D', D'D' (d² each) and the shifts."""
    return layers * 3 * s.hidden * s.hidden * 8


def _activations(s: Shape, batch: int, seq: int) -> int:
    """One layer's working set on one batch (its MLP's width dominates), in float32."""
    return batch * seq * (4 * s.hidden + 3 * s.ffn) * 4


def _plan(command: str, model: str, s: Shape, dtype, parts: dict[str, int], **kw) -> Plan:
    """A plan whose peak RAM is the sum of ``parts``."""
    name = str(dtype).removeprefix("torch.")
    return Plan(command, model, s.params, name, sum(parts.values()), parts=parts, **kw)


def _weights_in_ram(s: Shape, c, copies: int = 1) -> int:
    """The weights a run keeps in RAM: all of them, or with ``--device-map`` and a CPU limit
    in ``--max-memory``, at most that limit per loaded model (the rest is offloaded)."""
    offload = c.offload() if c.device_map else None
    limit = (offload.max_memory or {}).get("cpu") if offload is not None else None
    if limit is None:
        return copies * s.weights
    from accelerate.utils import convert_file_size_to_int

    return copies * min(s.weights, convert_file_size_to_int(limit))


def _logits(s: Shape, batch: int, seq: int) -> int:
    """A batch's float32 logits and their log-softmax: the perplexity's peak."""
    return 2 * batch * seq * s.vocab * 4


def analyze_plan(config, model: str, tokens: int, batch: int, seq: int, dtype) -> Plan:
    s = shape_of(config, dtype)
    parts = {
        "weights": s.weights,
        "statistics": _stats_bytes(s, s.layers),
        "activations": _activations(s, batch, seq),
        "runtime": BASE_RAM,
    }
    return _plan("analyze", model, s, dtype, parts, disk=1 << 20, passes=1.0)


def prune_plan(config, model: str, c: PruneConfig, eval_tokens: int, dtype) -> Plan:
    """Boundary states: d × bytes per token at each of the n + 1 boundaries, in RAM up to
    ``--cache-gb`` and the rest spilled to the temporary directory; the checkpoint: the kept
    layers' weights."""
    s = shape_of(config, dtype)
    k = c.check(s.layers, config)
    tokens = c.tokens if c.needs_calibration else 0
    one_copy = (s.layers + 1) * tokens * s.hidden * s.bytes_per
    copies = state_copies(c, tokens)
    states = int(one_copy * copies)
    in_ram = min(states, int(c.cache_gb * GB))
    spill = states - in_ram
    checkpoint = s.weights - k * s.layer_params * s.bytes_per
    parts = {
        "weights": _weights_in_ram(s, c),
        "stored states": in_ram,
        # every layer's statistics, and the copy the re-scoring tokens keep
        "statistics": 2 * _stats_bytes(s, s.layers),
        "activations": _activations(s, c.batch_size, c.seq_len),
        "held-out logits": _logits(s, c.batch_size, c.seq_len) if eval_tokens else 0,
        "runtime": BASE_RAM,
    }
    rescore = min(1.0, c.rescore_tokens / max(tokens, 1)) if c.rescore_tokens else 1.0
    passes = 1.0 + k * rescore * 0.5 + (0.2 * k if c.refits else 0.0)
    extra, more_passes, more_notes = c.chooser.plan(c, s.layers, s.hidden, s.weights, k)
    parts.update(extra)
    passes += more_passes
    notes = [
        f"stored states at most ~{copies:.2f}× one pass's ({_gb(one_copy)}): the original's, "
        "and the pruned model's where fits and re-scoring need them; up to "
        f"{STATE_COPIES_BOUND:g}× if the first cut is layer 0",
    ]
    notes += _export_notes(config, c) + more_notes
    if data.SELF in data.calib_parts(c.calib):
        notes.append(
            "text sampled from the model (half of --tokens) is generated once per model and "
            "cached; the first run spends ~3 forward passes' time on it"
        )
    return _plan(
        "prune",
        model,
        s,
        dtype,
        parts,
        disk=spill + checkpoint,
        spill_disk=spill,
        passes=round(passes, 2),
        removed=k,
        notes=notes,
    )


def state_copies(c: PruneConfig, tokens: int) -> float:
    """The stored states at their most, in copies of one pass's (see STATE_FITS)."""
    if not c.chooser.greedy or not tokens:
        return 1.0 + STATE_FITS
    share = min(1.0, c.rescore_tokens / tokens) if c.rescore_tokens else 1.0
    return 1.0 + STATE_FITS + STATE_SUFFIX * share


def _export_notes(config, c: PruneConfig) -> list[str]:
    """What a checkpoint that exports to GGUF needs, where this request would not give it:
    whole periods of a per-layer attention pattern, and a replacement that leaves no bridge."""
    period = arch.pattern_period(config)
    stock = "fold" if arch.foldable(config) else "none"
    notes = []
    if period and c.strategy != "pattern-periods":
        notes.append(
            f"this model's attention pattern repeats every {period} layers and GGUF readers "
            "rebuild it from the depth: for a checkpoint that exports, --strategy "
            f"pattern-periods (whole periods, --remove a multiple of {period})"
        )
    if c.replace == "linear":
        notes.append(
            f"--replace linear leaves bridges that no stock architecture holds: --replace {stock} "
            "for a checkpoint that exports to GGUF"
        )
    return notes


def distill_plan(config, model: str, c: DistillConfig, dtype) -> Plan:
    """Student and teacher weights, AdamW's two moments and the gradients of the share of the
    student that ``c.train`` trains, activations kept for the backward, the teacher's state
    cache on disk when batches repeat, and the checkpoints."""
    s = shape_of(config, dtype)
    return _distill_plan(s, model, c, trainable_share(s, config, c.train), dtype)


def _distill_plan(s: Shape, model: str, c: DistillConfig, trainable: float, dtype) -> Plan:
    train = int(s.params * trainable)
    parts = {
        "student and teacher": _weights_in_ram(s, c, copies=2),
        "optimizer and gradients": train * 4 * 3,
        "activations": _activations(s, c.batch_size, c.seq_len) * s.layers,
        # the student's and the teacher's logits and the KL's gradient, in float32
        "logits": 3 * _logits(s, c.batch_size, c.seq_len) // 2,
        "runtime": BASE_RAM,
    }
    cache = 0
    if c.cache_teacher != "off" and c.epochs > 1:
        cache = c.tokens // max(c.epochs, 1) * (s.layers + 1) * s.hidden * s.bytes_per
    disk = 2 * (s.weights + train * 4 * 2) + cache  # the latest checkpoint and the final model
    notes = [f"trains ~{trainable:.0%} of the student's parameters ({c.train})"]
    return _plan("distill", model, s, dtype, parts, disk=disk, passes=float(c.epochs), notes=notes)


def free_disk(path: str | Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def total_ram() -> int:
    """The memory this process may use: the machine's, or less under a limit on the process
    (``ulimit -v``) or on its cgroup (a container's or a job scheduler's memory.max)."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limits.append(soft)
    for f in (
        Path("/sys/fs/cgroup/memory.max"),
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max", or cgroup v1's "no limit"
            limits.append(int(text))
    return min(limits)


def check_fits(plan: Plan, out: str | Path, ram_flag: str, disk_flags: str) -> None:
    """Refuse, in one line naming the flags that change it, a run whose plan does not fit."""
    spill_at = tempfile.gettempdir()
    need = {Path(spill_at).resolve(): plan.spill_disk}
    here = Path(out).resolve()
    need[here] = need.get(here, 0) + plan.disk - plan.spill_disk
    for where, n in need.items():
        free = free_disk(where) if n else 0
        if n > free:
            raise LinearizeError(
                f"this {plan.command} needs ~{_gb(n)} of disk at {where} and "
                f"{_gb(free)} is free: {disk_flags}"
            )
    ram = total_ram()
    if plan.peak_ram > ram:
        raise LinearizeError(
            f"this {plan.command} needs ~{_gb(plan.peak_ram)} of RAM and this process may use "
            f"{_gb(ram)}: {ram_flag}"
        )


def timed_seconds(model, tokenizer, tokens_total: float, batch: int, seq: int) -> float:
    """Seconds for ``tokens_total`` tokens of forward passes, from one timed batch here."""
    ids = torch.full((batch, seq), tokenizer.eos_token_id or 0, dtype=torch.long)
    device = arch.input_device(model)
    body = arch.get_body(model)
    with torch.no_grad():
        body(input_ids=ids[:1, :8].to(device))  # warm-up
        t0 = time.perf_counter()
        body(input_ids=ids.to(device))
        per_token = (time.perf_counter() - t0) / ids.numel()
    return tokens_total * per_token


def has_weights(name: str | None) -> bool:
    """Whether the model's weights are here (embedded, a .gguf, a directory with weight files)
    without downloading anything: a Hub id or a config-only directory plans without a time."""
    where, kw = models.resolve_model(name)
    path = Path(where)
    if "gguf_file" in kw:
        return True
    patterns = ("*.safetensors", "*.bin", "*.pt", "model*.gguf")
    return path.is_dir() and any(next(path.glob(g), None) is not None for g in patterns)


def planned(
    command: str,
    name: str | None,
    build,
    dtype: str = "auto",
    device: str = "auto",
    timing: tuple[Callable[[Plan], float], int, int] | None = None,
) -> Plan:
    """The plan of ``command`` on ``name``: ``build(config, label, torch_dtype)`` makes it
    from the config; ``timing`` (tokens(plan), batch, seq) adds the time of that many tokens
    of forward passes, from one timed batch, when the weights are here."""
    config = models.load_config(name)
    torch_dtype = models.pick_dtype(dtype, models.pick_device(device))
    plan = build(config, name or models.EMBEDDED_NAME, torch_dtype)
    if timing is not None and has_weights(name):
        model, tok = models.load(name, dtype=dtype, device=device)
        tokens, batch, seq = timing
        plan.seconds = timed_seconds(model, tok, tokens(plan), batch, seq)
    return plan


def trainable_share(s: Shape, config, mode: str) -> float:
    """The share of a pruned student's parameters (sizes ``s``) ``--train mode`` trains, from
    its pruning record (each run of removed layers: its map or fold, and the kept layers beside
    it)."""
    record = getattr(config, "linearize", None) or {}
    runs = len(runs_of(sorted(record.get("removed", [])))) or 1
    layer = s.layer_params / max(s.params, 1)
    maps = runs * s.hidden * max(s.hidden, s.ffn) / max(s.params, 1)
    return {
        "all": 1.0,
        "lora": 0.01,
        "replacements": maps,
        "replacements+neighbors": min(1.0, maps + 2 * runs * layer),
    }.get(mode, 1.0)


def cut_config(config, k: int):
    """``config`` with its last ``k`` layers gone: what a cut model's plan is made from (only
    the sizes matter, not which layers)."""
    cut = copy.deepcopy(config)
    arch.keep_layers_in_config_(cut, list(range(getattr(config, arch.n_layers_key(config)) - k)))
    return cut


def compress_plan(config, model: str, prune_c, distill_c, eval_tokens: int, dtype) -> Plan:
    """The cut (prune), the healing (distill) on the cut model, the GGUF (two bytes per
    parameter at f16) and the stages' outputs: peak RAM is the larger stage's, disk adds up."""
    cut = prune_plan(config, model, prune_c, eval_tokens, dtype)
    small = cut_config(config, cut.removed)
    s = shape_of(small, dtype)
    heal = _distill_plan(s, model, distill_c, trainable_share(s, small, distill_c.train), dtype)
    gguf = s.params * torch.float16.itemsize
    peak = max(cut, heal, key=lambda p: p.peak_ram)
    return Plan(
        "compress",
        model,
        cut.params,
        cut.dtype,
        peak.peak_ram,
        disk=cut.disk + heal.disk + gguf,
        spill_disk=cut.spill_disk,
        passes=cut.passes + heal.passes,
        removed=cut.removed,
        parts=peak.parts,
        notes=[f"peak RAM in the {peak.command} stage", *cut.notes, *heal.notes],
    )
