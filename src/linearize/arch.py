"""The one module that knows where things live inside each model architecture.

An explicit table keyed by ``config.model_type`` (as tuned-lens and mergekit do) says where the
decoder layers are, the final norm, each layer's MLP output projection and the config key
holding the layer count. Models missing from the table fall back to the largest ModuleList of
blocks, with a warning, because a wrong guess there silently gives wrong numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from linearize.errors import LinearizeError


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its parts. Paths are dotted attributes from the CausalLM."""

    layers: str  # the nn.ModuleList of decoder layers
    final_norm: str | None  # norm applied after the last layer
    # per layer: the MLP's output projection, whose output is added unscaled to the residual
    # stream, so a linear map can be folded into it. None: not foldable (MoE experts, a norm
    # after the MLP as in Gemma 2/3 and OLMo 2, a residual multiplier as in Granite).
    mlp_out: str | None
    n_layers_key: str = "num_hidden_layers"  # config attribute holding the layer count
    # config attributes holding one entry per layer; surgery must keep them in step
    per_layer_keys: tuple[str, ...] = field(default=("layer_types",))
    # per layer: the attention's output projection, whose output is added unscaled to the
    # residual stream, so refitting it toward the original's stream right after the attention
    # is a linear problem. None: not in the table (only the MLP is refit there).
    attn_out: str | None = None


_LLAMA_LIKE = ArchSpec("model.layers", "model.norm", "mlp.down_proj", attn_out="self_attn.o_proj")
_NORM_AFTER_MLP = ArchSpec("model.layers", "model.norm", None)

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        t: _LLAMA_LIKE
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "phi3",
            "olmo",
            "cohere",
            "cohere2",
            "smollm3",
            "ministral",
            "helium",
            "glm",
        )
    },
    **{t: _NORM_AFTER_MLP for t in ("gemma2", "gemma3_text", "olmo2", "granite", "exaone4")},
    "mixtral": ArchSpec("model.layers", "model.norm", None, per_layer_keys=("layer_types",)),
    "qwen2_moe": ArchSpec("model.layers", "model.norm", None),
    "qwen3_moe": ArchSpec("model.layers", "model.norm", None, per_layer_keys=("mlp_only_layers",)),
    "olmoe": ArchSpec("model.layers", "model.norm", None),
    "stablelm": ArchSpec("model.layers", "model.norm", "mlp.down_proj"),
    "starcoder2": ArchSpec("model.layers", "model.norm", "mlp.c_proj"),
    "phi": ArchSpec("model.layers", "model.final_layernorm", "mlp.fc2"),
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "mlp.c_proj", "n_layer"),
    "gpt_bigcode": ArchSpec("transformer.h", "transformer.ln_f", "mlp.c_proj", "n_layer"),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f", "mlp.fc_out", "n_layer"),
    "gpt_neo": ArchSpec("transformer.h", "transformer.ln_f", "mlp.c_proj", "num_layers"),
    "bloom": ArchSpec("transformer.h", "transformer.ln_f", "mlp.dense_4h_to_h", "n_layer"),
    "falcon": ArchSpec("transformer.h", "transformer.ln_f", "mlp.dense_4h_to_h"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", "model.decoder.final_layer_norm", "fc2"),
}

# Models that have no causal decoder stack to analyse: refused with a clear message.
ENCODER_ONLY = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "modernbert",
        "camembert",
        "mpnet",
        "xlm",
        "ernie",
        "nomic_bert",
    }
)


def get_spec(config) -> ArchSpec | None:
    """The table entry for this config, None when the architecture is not in the table.

    Raises LinearizeError for encoder-only and encoder-decoder models, which this tool cannot
    analyse, so that the refusal happens before any weights are loaded.
    """
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in ENCODER_ONLY:
        raise LinearizeError(
            f"model type '{model_type}' is encoder-only; linearize analyses decoder-only causal LMs"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise LinearizeError(
            f"model type '{model_type}' is encoder-decoder; linearize analyses decoder-only "
            "causal LMs"
        )
    return ARCHITECTURES.get(model_type)


def get_attr(root: object, dotted: str) -> object:
    """Follow a dotted attribute path ('model.decoder.layers')."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _guess_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return best


def get_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the decoder layers."""
    spec = get_spec(model.config)
    if spec is not None:
        return spec.layers, get_attr(model, spec.layers)
    model_type = getattr(model.config, "model_type", "unknown")
    guess = _guess_layers(model)
    if guess is None:
        raise LinearizeError(f"unsupported architecture '{model_type}': no decoder layers found")
    warnings.warn(
        f"architecture '{model_type}' is not in linearize's table; guessing that its decoder "
        f"layers are '{guess[0]}' ({len(guess[1])} layers). Check the results.",
        stacklevel=2,
    )
    return guess


def get_body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (``model.base_model``), so analysis skips the head."""
    return getattr(model, "base_model", model)


def n_layers(model: nn.Module) -> int:
    return len(get_layers(model)[1])


def check_supported(config) -> None:
    """Fail early, before loading weights, for configs this tool cannot analyse."""
    if get_spec(config) is not None:
        return
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        model_type = getattr(config, "model_type", "unknown")
        raise LinearizeError(
            f"unsupported architecture '{model_type}' ({', '.join(archs)}): "
            "not a decoder-only causal LM"
        )


def set_attr(root: object, dotted: str, value: object) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(get_attr(root, parent) if parent else root, last, value)


def get_final_norm(model: nn.Module) -> nn.Module | None:
    spec = get_spec(model.config)
    return get_attr(model, spec.final_norm) if spec and spec.final_norm else None


def logits_from_final(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits from the stream after its last layer (the final norm's input):
    norm, LM head and Gemma's soft cap, as the model's own forward applies them."""
    logits = model.get_output_embeddings()(get_final_norm(model)(x))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def n_layers_key(config) -> str:
    """The config attribute that holds the layer count (``n_layer`` for GPT-2, …)."""
    spec = get_spec(config)
    return spec.n_layers_key if spec else "num_hidden_layers"


def _per_layer_config_keys(config, spec: ArchSpec | None, n: int) -> list[str]:
    keys = set(spec.per_layer_keys if spec else ())
    keys |= {k for k, v in vars(config).items() if "layer" in k and isinstance(v, (list, tuple))}
    return [
        k
        for k in sorted(keys)
        if isinstance(getattr(config, k, None), (list, tuple)) and len(getattr(config, k)) == n
    ]


def remove_layers_(model: nn.Module, drop: Iterable[int]) -> list[int]:
    """Delete decoder layers in place and keep the model consistent; returns kept indices.

    After the cut: every module's ``layer_idx`` is renumbered (KV caches index by it), the
    layer-count config key is updated, and config lists with one entry per layer
    (``layer_types``, sliding-window patterns, …) are trimmed to the kept layers, so that
    ``generate()`` with a cache works and save → load round-trips.
    """
    path, layers = get_layers(model)
    n = len(layers)
    drop = sorted(set(drop))
    if any(not 0 <= i < n for i in drop):
        raise LinearizeError(f"layer indices {drop} out of range: the model has {n} layers")
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise LinearizeError(f"cannot remove all {n} layers")
    set_attr(model, path, nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(get_attr(model, path)):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx
    keep_layers_in_config_(model.config, keep)
    return keep


def keep_layers_in_config_(config, keep: list[int]) -> None:
    """Make ``config`` describe only the layers ``keep`` (original indices): the layer count,
    and every list with one entry per layer (``layer_types``, sliding-window patterns, …)."""
    n = getattr(config, n_layers_key(config))
    for key in _per_layer_config_keys(config, get_spec(config), n):
        old = getattr(config, key)
        setattr(config, key, type(old)(old[i] for i in keep))
    setattr(config, n_layers_key(config), len(keep))


def foldable(config) -> bool:
    """Whether ``--replace fold`` works for this architecture (see check_foldable)."""
    try:
        check_foldable(config)
    except LinearizeError:
        return False
    return True


def check_foldable(config) -> None:
    """Raise LinearizeError unless a map can be folded into each layer's MLP output projection."""
    spec = get_spec(config)
    model_type = getattr(config, "model_type", "unknown")
    if spec is None or spec.mlp_out is None:
        raise LinearizeError(
            f"--replace fold is not possible for '{model_type}': its layers have no MLP output "
            "projection added straight to the residual stream (use --replace linear)"
        )
    if getattr(config, "do_layer_norm_before", True) is False:  # OPT-350m: post-LN
        raise LinearizeError(
            f"--replace fold is not possible for this '{model_type}': it normalises after the "
            "residual add (do_layer_norm_before=False); use --replace linear"
        )


def mlp_out_proj(model: nn.Module, position: int) -> nn.Module:
    """The MLP output projection of the layer at ``position``, into which a linear map on the
    residual stream can be folded. Raises LinearizeError when this architecture has none."""
    check_foldable(model.config)
    _, layers = get_layers(model)
    return get_attr(layers[position], get_spec(model.config).mlp_out)


def attn_out_proj(model: nn.Module, position: int) -> nn.Module | None:
    """The attention output projection of the layer at ``position`` (see ArchSpec.attn_out);
    None when this architecture has none that the table knows."""
    spec = get_spec(model.config)
    if spec is None or spec.attn_out is None:
        return None
    _, layers = get_layers(model)
    return get_attr(layers[position], spec.attn_out)


@contextmanager
def layers_removed(model: nn.Module, drop: Iterable[int]) -> Iterator[list[int]]:
    """Remove layers for the duration of a ``with`` block, then put everything back.

    For scoring a removal without paying for a copy of the model (SLEB's perplexity search):
    the layer list, each module's ``layer_idx`` and the config entries change inside the block
    and are restored in ``finally``.
    """
    path, layers = get_layers(model)
    config = model.config
    saved_cfg = {
        k: getattr(config, k)
        for k in vars(config)
        if isinstance(getattr(config, k), (list, tuple, int))
    }
    saved_idx = [
        (m, m.layer_idx) for m in layers.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ]
    try:
        yield remove_layers_(model, drop)
    finally:
        set_attr(model, path, layers)
        for m, idx in saved_idx:
            m.layer_idx = idx
        for k, v in saved_cfg.items():
            setattr(config, k, v)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device, or, when accelerate offloaded
    the embedding (its weight on the meta device), the device its hook runs it on."""
    emb = model.get_input_embeddings()
    if emb.weight.device.type != "meta":
        return emb.weight.device
    hook = getattr(emb, "_hf_hook", None) or getattr(model, "_hf_hook", None)
    where = getattr(hook, "execution_device", None)
    return torch.device(where if where is not None and where != "disk" else "cpu")


def pattern_period(config) -> int | None:
    """The period of a model's per-layer attention pattern (``layer_types``: Gemma 3's five
    sliding-window layers then one full, period 6), or None for a uniform or aperiodic one.
    GGUF stores no such pattern: readers rebuild it from the depth, so a cut that keeps it
    must remove whole periods."""
    types = list(getattr(config, "layer_types", None) or [])
    if len(set(types)) < 2:
        return None
    for period in range(2, len(types) + 1):
        if all(types[i] == types[i % period] for i in range(len(types))):
            return period
    return None
