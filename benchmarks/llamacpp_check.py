"""A pruned model's GGUF in llama.cpp itself (llama-cpp-python): does it load, does it compute
what transformers computes from the checkpoint it was exported from, and (given the original
exported the same way) how fast is it.

    pip install llama-cpp-python          # builds llama.cpp with cmake (~10+ min on 2 cores)
    linearize export ~/.cache/linearize/smollm2-135m-instruct --gguf original-f16.gguf --outtype f16
    python benchmarks/llamacpp_check.py c8/model.gguf --hf c8/model \
        [--original original-f16.gguf --hf-original ~/.cache/linearize/smollm2-135m-instruct]

Prints each GGUF's largest logit difference from transformers on the same 128 tokens (÷ the
largest logit), and with ``--original`` prefill (512 tokens) and decode (64 greedy tokens,
batch 1) speed in llama.cpp, the median of interleaved rounds in one process, as ratios to the
original.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from linearize.data import token_sequences


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(path: str, n: int, vocab: int) -> list[int]:
    """``n`` tokens of Debian's fortunes with the checkpoint's tokenizer, or, for a checkpoint
    without one (a test's random model), a fixed spread of ids."""
    try:
        from transformers import AutoTokenizer

        return next(iter(token_sequences(AutoTokenizer.from_pretrained(path), "fortunes", n, n)))
    except Exception:  # no tokenizer there: any fixed ids compare the two implementations
        return [(7 + 37 * i) % vocab for i in range(n)]


def logit_error(llm, model, ids: list[int]) -> float:
    """max |llama.cpp − transformers| ÷ max |transformers| over every position's logits."""
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def timed(llm, ids: list[int], decode: int) -> tuple[float, float]:
    """(prefill tokens/s over ``ids``, decode tokens/s for ``decode`` greedy tokens)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    token = int(np.argmax(llm.scores[len(ids) - 1]))
    t0 = time.perf_counter()
    for _ in range(decode):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, decode / (time.perf_counter() - t0)


def main() -> None:
    from llama_cpp import Llama

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", help="the pruned model's GGUF")
    ap.add_argument("--hf", required=True, help="the checkpoint it was exported from")
    ap.add_argument("--original", help="the original's GGUF, for speed ratios")
    ap.add_argument("--hf-original", help="the original's checkpoint")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    runs = {"pruned": (a.gguf, a.hf)}
    if a.original:
        runs = {"original": (a.original, a.hf_original), **runs}
    llms = {}
    for name, (gguf, hf) in runs.items():
        llm = Llama(
            model_path=gguf, n_ctx=1024, n_threads=a.threads, logits_all=True, verbose=False
        )
        ids = _ids(hf, 512, llm.n_vocab())
        err = logit_error(llm, _hf(hf), ids[:128])
        print(f"{name}: {gguf} loads in llama.cpp; logit error against transformers {err:.2e}")
        llms[name] = llm
    if not a.original:
        return
    speed: dict[str, list[tuple[float, float]]] = {k: [] for k in llms}
    for _ in range(a.rounds):
        for name, llm in llms.items():
            speed[name].append(timed(llm, ids, 64))
    base = np.median(speed["original"], axis=0)
    for name, rows in speed.items():
        pre, dec = np.median(rows, axis=0)
        print(
            f"{name}: prefill {pre:.0f} tok/s (×{pre / base[0]:.2f}), decode {dec:.1f} tok/s "
            f"(×{dec / base[1]:.2f}); median of {a.rounds} interleaved rounds"
        )


if __name__ == "__main__":
    main()
