"""Pretrain a Mistral-architecture model with the paper's linearity regulariser.

The objective is ``LM loss + reg_weight · R``. With h_0 the input of the first decoder layer and
h_i the output of layer i (captured by hooks in the same forward, before the final norm), over
the L layer pairs (h_{i-1}, h_i), i = 1..L, and the N real (non-padding) tokens:

* ``cosine``: R = Σ_i (1/N) Σ_t (1 − cos(h_{i-1,t}, h_{i,t}))
* ``mse``:    R = Σ_i (1/N) Σ_t ‖h_{i,t} − h_{i-1,t}‖²  (divided by the hidden size when
  ``reg_normalize``, so the weight means the same at any width)
* ``none``:   no term; the ``cosine`` R is still computed (without gradient) and logged, so
  runs with and without the regulariser compare on the same number

Razzhigaev et al. (2024) report that the cosine term (λ = 0.5) lowers per-layer linearity and
improves the model; they give no configs, so the presets below are ours (see ``PRESETS``).
Every ``probe_every`` steps the analysis core (``linearize.analyze_model``) scores each layer on
a fixed held-out set, and held-out perplexity is measured; both go to ``probe.jsonl`` and
``metrics.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize import arch, data, models
from linearize._fields import check_choices, coerce, option, parse_value
from linearize._io import (
    claim_output,
    releases_output,
    strict_json,
    write_json,
    write_text,
)
from linearize.analyze import analyze_model
from linearize.errors import LinearizeError
from linearize.eval.perplexity import perplexity
from linearize.hooks import eval_mode, record
from linearize.train.loop import Every, Loop, Schedule

REGS = ("cosine", "mse", "none")

# Mistral configs. Sizes follow the paper's two scales (≈150M and ≈650M parameters with the
# 49,152-token SmolLM2 tokenizer, embeddings tied); the shapes are the usual ones for those sizes
# (head dim 64/96, GQA, MLP ≈ 2.7× hidden). `tiny` (7.5M) exists to train on a CPU in minutes.
PRESETS: dict[str, dict] = {
    "tiny": {
        "model": dict(
            hidden_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=384,
        ),
        "seq_len": 128,
        "batch_size": 8,
        "lr": 2e-3,
        "tokens": 400_000,
        "warmup": 0.05,
        "probe_every": 50,
        "probe_tokens": 4096,
        "save_every": 100,
    },
    "150m": {
        "model": dict(
            hidden_size=768,
            num_hidden_layers=18,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
        ),
        "seq_len": 1024,
        "batch_size": 16,
        "grad_accum": 4,
        "lr": 6e-4,
        "tokens": 3_000_000_000,
        "warmup": 0.01,
        "probe_every": 1000,
        "save_every": 2000,
    },
    "650m": {
        "model": dict(
            hidden_size=1536,
            num_hidden_layers=22,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=4096,
        ),
        "seq_len": 1024,
        "batch_size": 16,
        "grad_accum": 8,
        "lr": 3e-4,
        "tokens": 10_000_000_000,
        "warmup": 0.01,
        "probe_every": 1000,
        "save_every": 2000,
    },
}


@dataclass
class PretrainConfig:
    """One pretraining run; a YAML file or ``key=value`` overrides set any field
    (``model.KEY`` sets a MistralConfig argument)."""

    model: dict = field(default_factory=lambda: dict(PRESETS["tiny"]["model"]))
    data: str = option(
        "builtin:calib",
        "training sources, comma-separated, interleaved by sequence (e.g. roneneldan/TinyStories)",
    )
    tokenizer: str | None = option(
        None, "tokenizer name or directory (default: the embedded SmolLM2's)"
    )
    tokens: int = option(400_000, "training tokens, all processes together")
    seq_len: int = 128
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    reg: str = option(
        "cosine", "the term between consecutive layers' states", choices=REGS, what="--reg"
    )
    reg_weight: float = option(0.5, "λ, the regulariser's weight")
    reg_normalize: bool = True  # mse only: divide by the hidden size
    probe_data: str = "builtin:eval"
    probe_tokens: int = 4096
    probe_every: int = option(50, "steps between linearity probes")
    save_every: int = option(100, "steps between checkpoints")
    seed: int = option(0, "random seed")

    def check(self) -> None:
        check_choices(self)
        if self.reg_weight < 0:
            raise LinearizeError(f"--reg-weight must be >= 0, got {self.reg_weight}")
        for name in ("tokens", "seq_len", "batch_size", "grad_accum", "probe_every", "save_every"):
            if getattr(self, name) < 1:
                raise LinearizeError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise LinearizeError("lr must be positive")
        from transformers import MistralConfig

        known = MistralConfig()
        for k in self.model:
            if not hasattr(known, k):
                raise LinearizeError(f"unknown model key 'model.{k}' (not a MistralConfig field)")


def load_config(
    name: str = "tiny", overrides: list[str] | None = None, **options
) -> PretrainConfig:
    """A preset name or a YAML file, then ``key=value`` overrides, then keyword options."""
    import yaml

    keys = {f.name for f in fields(PretrainConfig)}
    if name in PRESETS:
        raw = json.loads(json.dumps(PRESETS[name]))
    else:
        path = Path(name)
        if not path.is_file():
            raise LinearizeError(
                f"unknown config '{name}' (presets: {', '.join(PRESETS)}; or a YAML file)"
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LinearizeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise LinearizeError(f"{path}: expected a mapping of settings")
        base = raw.pop("preset", "tiny")
        if base not in PRESETS:
            raise LinearizeError(f"{path}: unknown preset '{base}'")
        merged = json.loads(json.dumps(PRESETS[base]))
        merged["model"].update(raw.pop("model", None) or {})
        merged.update(raw)
        raw = merged
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise LinearizeError(f"override '{item}' is not KEY=VALUE")
        if key.startswith("model."):
            raw.setdefault("model", {})[key[6:]] = parse_value(value)
        else:
            raw[key] = parse_value(value)
    raw.update({k: v for k, v in options.items() if v is not None})
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise LinearizeError(
            f"unknown config key '{unknown[0]}' (known: {', '.join(sorted(keys))})"
        )
    defaults = PretrainConfig()
    for k, v in raw.items():
        raw[k] = coerce(k, v, getattr(defaults, k))
    cfg = PretrainConfig(**raw)
    cfg.check()
    return cfg


def regulariser(states: list[Tensor], mask: Tensor, kind: str, normalize: bool = True) -> Tensor:
    """R over consecutive states (see the module docstring); ``states`` = [h_0, …, h_L]."""
    m = mask.bool()
    total = states[0].new_zeros((), dtype=torch.float32)
    if kind == "none":
        return total
    for a, b in zip(states[:-1], states[1:]):
        a, b = a.float()[m], b.float()[m]  # (N, d)
        if kind == "cosine":
            total = total + (1.0 - F.cosine_similarity(a, b, dim=-1)).mean()
        else:
            sq = (b - a).square().sum(-1)
            total = total + (sq / a.shape[-1] if normalize else sq).mean()
    return total


def build_model(cfg: PretrainConfig, tokenizer) -> nn.Module:
    from transformers import AutoModelForCausalLM, MistralConfig

    kw = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(cfg.seq_len, 2048),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=data.pad_id_of(tokenizer),
    )
    kw.update(cfg.model)
    return AutoModelForCausalLM.from_config(MistralConfig(**kw))


def training_sequences(
    tokenizer, specs: str, seq_len: int, rank: int, world: int, skip: int = 0
) -> Iterator[list[int]]:
    """Full-length packed sequences, sources interleaved one sequence at a time, repeating the
    data when it runs out; global sequence j goes to rank j mod world, after ``skip`` of them."""
    sources = [s.strip() for s in specs.split(",") if s.strip()]
    for s in sources:
        data.resolve_source(s)
    j = 0
    while True:
        streams = [data.token_sequences(tokenizer, s, seq_len) for s in sources]
        produced = 0
        while streams:
            for st in list(streams):
                seq = next(st, None)
                if seq is None or len(seq) < seq_len:
                    streams.remove(st)
                    continue
                produced += 1
                if j >= skip and j % world == rank:
                    yield seq
                j += 1
        if produced == 0:
            raise LinearizeError(f"data '{specs}' is shorter than one sequence of {seq_len} tokens")


def _tokenizer(name: str | None):
    from transformers import AutoTokenizer

    where, kw = models.resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(where, **kw)
    except Exception as e:
        raise LinearizeError(f"cannot load tokenizer '{name}': {str(e).splitlines()[0]}") from None


def _probe(model: nn.Module, tok, c: PretrainConfig, step: int, per_step: int) -> dict:
    """Per-layer linearity and held-out perplexity of ``model`` now (one probe.jsonl line)."""
    with eval_mode(model), torch.no_grad():
        rep = analyze_model(model, tok, c.probe_data, c.probe_tokens, c.seq_len, c.batch_size)
        ppl = perplexity(model, tok, c.probe_data, c.seq_len, c.probe_tokens, c.batch_size)
    return {
        "step": step,
        "tokens": step * per_step,
        "perplexity": ppl,
        **rep.means(),
        "linearity": rep.column("linearity"),
        "linearity_no_residual": rep.column("linearity_no_residual"),
    }


@dataclass
class _PretrainStep:
    """LM loss plus the regulariser on one micro-batch; everything else is the loop's."""

    c: PretrainConfig
    loop: Loop
    seqs: Iterator[list[int]]
    pad: int

    def __post_init__(self) -> None:
        self.layers = arch.get_layers(self.loop.unwrapped())[1]

    def __call__(self, index: int) -> dict[str, Tensor]:
        c = self.c
        b = data.pad_batch([next(self.seqs) for _ in range(c.batch_size)], self.pad)
        b = {k: v.to(self.loop.acc.device) for k, v in b.items()}
        # h_0 (the first layer's input) and every layer's output, with their graph
        with self.loop.acc.autocast(), record(inputs=self.layers[:1], outputs=self.layers) as cap:
            lm = self.loop.model(**b, labels=b["input_ids"], use_cache=False).loss
        states = cap.inputs + cap.outputs
        if c.reg == "none":  # log what the cosine term would be, without training on it
            with torch.no_grad():
                reg = regulariser(states, b["attention_mask"], "cosine")
            return {"loss": lm, "lm_loss": lm, "reg": reg}
        reg = regulariser(states, b["attention_mask"], c.reg, c.reg_normalize)
        return {"loss": lm + c.reg_weight * reg, "lm_loss": lm, "reg": reg}


def _save_model(model: nn.Module, tok, where: Path) -> None:
    model.save_pretrained(where)
    tok.save_pretrained(where)


def _read_probes(path: Path, up_to: int) -> list[dict]:
    """The probes a resumed run keeps: those up to its checkpoint's step."""
    if not path.exists():
        return []
    return [p for p in map(json.loads, path.read_text().splitlines()) if p["step"] <= up_to]


def _write_probes(path: Path, probes: list[dict]) -> None:
    write_text(path, "".join(strict_json(p, indent=None) + "\n" for p in probes))


@releases_output
def pretrain(
    config: PretrainConfig | None = None,
    out: str | Path = "linearize-out/pretrain",
    resume: bool = False,
    device: str = "auto",
    on_step: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train from scratch; checkpoints (with a loadable model) every ``save_every`` steps,
    ``out/final`` (a stock HF checkpoint), ``metrics.csv``, ``probe.jsonl``, ``pretrain.json``."""
    from accelerate.utils import set_seed

    c = config or PretrainConfig()
    c.check()
    out = Path(out)
    claim_output(out)
    loop = Loop(out, c.grad_accum, device)
    per_step = loop.tokens_per_step(c.seq_len, c.batch_size, c.tokens)
    total_steps = c.tokens // per_step
    tok = _tokenizer(c.tokenizer)
    next(training_sequences(tok, c.data, c.seq_len, 0, 1))  # data shorter than a sequence: fail now
    set_seed(c.seed)
    schedule = Schedule(
        c.lr, total_steps, c.warmup, c.weight_decay, c.max_grad_norm, betas=(0.9, 0.95)
    )
    step = loop.prepare(build_model(c, tok), schedule, resume)
    probes_path = out / "probe.jsonl"
    probes = _read_probes(probes_path, step) if resume else []
    skip = step * c.batch_size * c.grad_accum * loop.world
    seqs = training_sequences(tok, c.data, c.seq_len, loop.rank, loop.world, skip=skip)

    def evaluate(step: int) -> dict:
        probes.append(_probe(loop.unwrapped(), tok, c, step, per_step))
        keys = ("perplexity", "mean_linearity", "mean_linearity_no_residual")
        return {k: probes[-1][k] for k in keys}

    def save_model(tmp: Path) -> None:  # each checkpoint is a model dynamics can load
        _save_model(loop.unwrapped(), tok, tmp / "model")
        _write_probes(probes_path, probes)

    if step == 0:
        probes.append(_probe(loop.unwrapped(), tok, c, 0, per_step))
    every = Every(c.save_every, c.probe_every, evaluate, save_model, on_step)
    loop.run(_PretrainStep(c, loop, seqs, data.pad_id_of(tok)), every, max_steps)
    summary = {
        "config": asdict(c),
        **loop.summary(),
        "parameters": sum(p.numel() for p in loop.unwrapped().parameters()),
        "final": probes[-1] if probes else None,
    }
    if loop.finished:
        loop.save_final(lambda tmp: _save_model(loop.unwrapped(), tok, tmp))
        if loop.is_main:
            _write_probes(probes_path, probes)
            write_json(out / "pretrain.json", summary)
    return summary
