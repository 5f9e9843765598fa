"""Calibration text sampled from the model itself ("self" in a calibration spec).

Linear replacements fitted on one kind of text fit that kind of text: on SmolLM2, maps fitted
on Python documentation alone lose much more on other English than on held-out documentation
(benchmarks/RESULTS.md). What a model writes when left to itself covers its own general
distribution, so mixing it into the calibration text is a data-free way to make the fits
broader (as LLM-QAT does for quantisation with self-generated data). Each sequence starts from
one of a fixed list of everyday openings and is sampled (temperature 1, top-k 50, top-p 0.95) to
the full sequence length, so no sequence stops early. The samples are one pool per model,
tokenizer and settings on disk, grown as runs need more: a second run on the same model, or ``distill`` after
``prune``, pays only for tokens no earlier run sampled.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from linearize import arch, data, models
from linearize._cache import discard_damaged
from linearize._io import write_text
from linearize.hooks import eval_mode

# Openings from many walks of life, none about code: the model continues each freely.
OPENINGS = (
    "Once upon a time",
    "The history of",
    "Yesterday the city council",
    "Scientists have discovered",
    "My grandmother always said",
    "The best way to cook",
    "Dear friend,",
    "In the summer of",
    "The team won",
    "Doctors recommend",
    "The law states that",
    "She opened the door and",
    "A good teacher",
    "The river",
    "When I was young",
    "The economy",
    "Travelers visiting",
    "The poem begins",
    "He looked at the sky",
    "The museum",
    "Farmers in the valley",
    "The old house on the hill",
    "According to the report,",
    "Music has always",
    "The children ran",
    "In ancient Rome,",
    "The recipe calls for",
    "After the storm,",
    "Every morning, the baker",
    "The election",
    "Birds migrate",
    "The letter arrived",
)
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}  # transformers' defaults, written out
BATCH = 32  # sequences per generate call (64 sampled no more tokens/s at 512 on 2 CPU cores)


class _TopKTopP:
    """transformers' top-k then top-p (nucleus) filtering, with the same result, but cheaper.

    transformers' nucleus step sorts the whole vocabulary at every token even after top-k has
    left ``k`` finite logits; on SmolLM2's 49k-token vocabulary, finding it among the ``k``
    instead takes 12% off each batch of 32 x 512 tokens on 2 CPU cores."""

    def __init__(self, top_k: int, top_p: float):
        self.top_k, self.top_p = top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, index = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        probs = values.float().softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the likelier tokens
        keep = before < self.top_p
        keep[:, 0] = True
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(-1, index, values.masked_fill(~keep, -float("inf")))


Progress = Callable[[str, int, int], None]  # (what, batches done, batches in all)


def _fingerprint(model: nn.Module, tokenizer, seq_len: int, seed: int, batch_size: int) -> str:
    """A key that changes with the weights, the tokenizer and every setting but the token
    count: one pool per model and settings, which any count reads a prefix of."""
    h = hashlib.sha256(models.weights_digest(model).encode())
    h.update(
        json.dumps(
            [
                len(tokenizer),
                tokenizer("The river")["input_ids"],
                seq_len,
                seed,
                batch_size,
                OPENINGS,
                SAMPLING,
            ]
        ).encode()
    )
    return h.hexdigest()[:24]


@torch.no_grad()
def _sample_batch(
    model: nn.Module, tokenizer, seq_len: int, seed: int, batch_size: int, index: int
) -> list[list[int]]:
    """Batch ``index`` of the pool: ``batch_size`` sequences of ``seq_len`` tokens, seeded by
    its own index, so the pool's first batches are the same however far it is grown. One
    batched, KV-cached ``generate`` call; openings are left-padded so every row ends where
    sampling starts, and sampling runs until the shortest opening has ``seq_len`` tokens, so
    that every row, cut to ``seq_len``, is full (a pool of n batches holds exactly n ×
    ``batch_size`` × ``seq_len`` tokens: a count of whole batches samples no extra batch)."""
    pad = data.pad_id_of(tokenizer)
    prefix = data.bos_prefix(tokenizer)
    device = arch.input_device(model)
    prompts = [
        prefix
        + tokenizer(OPENINGS[(index * batch_size + j) % len(OPENINGS)], add_special_tokens=False)[
            "input_ids"
        ]
        for j in range(batch_size)
    ]
    width = max(map(len, prompts))
    ids = torch.full((batch_size, width), pad, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, width - len(p) :] = torch.tensor(p)
        mask[j, width - len(p) :] = 1
    new = seq_len - min(map(len, prompts))
    from transformers import LogitsProcessorList

    nucleus = _TopKTopP(SAMPLING["top_k"], SAMPLING["top_p"])
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + index)
        gen = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
            temperature=SAMPLING["temperature"],
            top_k=0,  # both filters are the processor's
            top_p=None,
            logits_processor=LogitsProcessorList([nucleus]),
        )
    return [gen[j, width - len(p) :][:seq_len].tolist() for j, p in enumerate(prompts)]


def _read_pool(path: Path, vocab: int, seq_len: int) -> list[list[int]]:
    """The pool on disk: sequences of at most ``seq_len`` token ids below ``vocab``. A pool that does
    not parse or holds anything else (a cut file, a hand edit) is discarded with a warning and
    sampled again: one bad id would end a run far from where it was read."""
    if not path.exists():
        return []
    try:
        seqs = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        discard_damaged(path, type(e).__name__)
        return []
    ok = isinstance(seqs, list) and all(
        isinstance(q, list)
        and 0 < len(q) <= seq_len
        and all(type(t) is int and 0 <= t < vocab for t in q)
        for q in seqs
    )
    if not ok:
        discard_damaged(path, f"not sequences of up to {seq_len} token ids below {vocab}")
        return []
    return seqs


def _vocab_size(model: nn.Module, tokenizer) -> int:
    """The ids the model can embed (the tokenizer may know fewer, never more, that it uses)."""
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else len(tokenizer)


def self_sequences(
    model: nn.Module,
    tokenizer,
    seq_len: int,
    tokens: int,
    seed: int = 0,
    batch_size: int = BATCH,
    cache: Path | None = None,
    on_progress: Progress | None = None,
) -> list[list[int]]:
    """About ``tokens`` tokens of text sampled from ``model``, as sequences of ``seq_len``
    tokens (the last one cut to the total).

    The samples form one pool per model and settings on disk, grown a batch at a time and
    saved after each: a run that needs more tokens than an earlier one samples only the
    difference, ``prune`` and ``distill`` share the text they both use, and a killed sampling
    run keeps the batches it finished."""
    if tokens < 1:
        return []
    root = cache or (models.cache_dir() / "self-text")
    path = root / f"{_fingerprint(model, tokenizer, seq_len, seed, batch_size)}.json"
    seqs = _read_pool(path, _vocab_size(model, tokenizer), seq_len)
    have = sum(map(len, seqs))
    if have < tokens:
        total = len(seqs) // batch_size + -(-(tokens - have) // (seq_len * batch_size))
        warnings.warn(
            f"sampling {tokens - have:,} calibration tokens from the model (once; cached in {root})",
            stacklevel=2,
        )
        what = "sampling text from the model"
        while have < tokens:
            done = len(seqs) // batch_size
            if on_progress is not None:
                on_progress(what, done, total)
            seqs += _sample_batch(model, tokenizer, seq_len, seed, batch_size, done)
            have = sum(map(len, seqs))
            try:
                write_text(path, json.dumps(seqs))
            except OSError:  # a read-only cache costs time next run, never the result
                pass
        if on_progress is not None:
            on_progress(what, total, total)
    used, keep = 0, []
    for s in seqs:
        s = s[: tokens - used]
        if s:
            keep.append(s)
            used += len(s)
    return keep


def calibration_sequences(
    model: nn.Module,
    tokenizer,
    spec: str,
    seq_len: int,
    tokens: int,
    on_progress: Progress | None = None,
) -> list[list[int]]:
    """The calibration sequences of a spec such as ``builtin:calib+self``: each part gets an
    equal share of ``tokens``, and the parts are interleaved sequence by sequence, so any
    prefix of the list (a batch, SLEB's scoring subset) mixes them."""
    parts = data.calib_parts(spec)
    shares = [tokens // len(parts)] * len(parts)
    shares[0] += tokens - sum(shares)
    streams = []
    for part, share in zip(parts, shares, strict=True):
        if part == data.SELF:
            streams.append(
                self_sequences(model, tokenizer, seq_len, share, on_progress=on_progress)
            )
        else:
            streams.append(list(data.token_sequences(tokenizer, part, seq_len, share)))
    out: list[list[int]] = []
    for i in range(max(map(len, streams))):
        out.extend(s[i] for s in streams if i < len(s))
    return out
