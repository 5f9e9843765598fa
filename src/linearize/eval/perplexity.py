"""Evaluation protocols. Perplexity here is the one ``prune`` and ``eval`` share.

Protocol (fixed, so numbers from different commands compare): the source is cut into
non-overlapping windows of ``seq_len`` tokens by ``linearize.data`` (with the tokenizer's BOS
in front of each window when it adds one to ordinary text). Every token of a window except the
first is predicted from the tokens before it in that window only. perplexity =
exp(Σ NLL / number of predicted tokens), pooled over all windows.

With ``stride`` (sliding windows, as in the transformers perplexity guide): the source is one
token stream; a window of ``seq_len`` tokens (BOS first when the tokenizer adds one) starts
every ``stride`` tokens, and each window scores only the tokens no earlier window scored, so
every token after the first is predicted once, with up to ``seq_len − stride`` tokens of context
carried over. Lower perplexity than non-overlapping windows, at seq_len/stride times the cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from linearize import arch, data
from linearize.errors import LinearizeError
from linearize.hooks import eval_mode


@torch.no_grad()
def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(Σ NLL, number of predicted tokens) of one padded batch: every real token but the first
    of its row, predicted from the tokens before it in that row."""
    device = arch.input_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    tok_nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    keep = batch.get("score_mask", mask).to(device)[:, 1:].bool() & mask[:, 1:].bool()
    return float(tok_nll[keep].double().sum()), int(keep.sum())


def pooled_nll(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(Σ NLL, predicted tokens) over padded batches: the protocol's sum, for callers that
    already hold their token windows (perplexity = exp(Σ NLL / predicted tokens))."""
    nll, count = 0.0, 0
    for b in batches:
        s, n = batch_nll(model, b)
        nll, count = nll + s, count + n
    return nll, count


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = "builtin:eval",
    seq_len: int = 512,
    tokens: int | None = 32768,
    batch_size: int = 8,
    stride: int | None = None,
) -> float:
    """Held-out perplexity by the protocol in this module's docstring."""
    if stride is None:
        seqs = data.token_sequences(tokenizer, source, seq_len, tokens)
        batches = data.batches(seqs, batch_size, data.pad_id_of(tokenizer))
    else:
        batches = _sliding_batches(tokenizer, source, seq_len, tokens, stride, batch_size)
    with eval_mode(model):
        nll, count = pooled_nll(model, batches)
    if count == 0:
        raise LinearizeError(f"perplexity source '{source}' has no token to predict")
    return math.exp(nll / count)


def _sliding_batches(
    tokenizer, source: str, seq_len: int, tokens: int | None, stride: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of overlapping windows with a ``score_mask`` of the newly scored tokens."""
    prefix = data.bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if not 1 <= stride <= body:
        raise LinearizeError(f"--stride must be between 1 and {body} (the window without BOS)")
    stream: list[int] = []
    for seq in data.token_sequences(tokenizer, source, body + len(prefix), tokens):
        stream.extend(seq[len(prefix) :] if prefix and seq[: len(prefix)] == prefix else seq)
    windows, scored_to = [], 0
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + body, len(stream))
        ids = prefix + stream[begin:end]
        score = [0] * (len(ids) - (end - scored_to)) + [1] * (end - scored_to)
        windows.append((ids, score))
        scored_to = end
        if end == len(stream):
            break
    pad = data.pad_id_of(tokenizer)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        b = data.pad_batch([w[0] for w in group], pad)
        b["score_mask"] = torch.zeros_like(b["attention_mask"])
        for r, (_, score) in enumerate(group):
            b["score_mask"][r, : len(score)] = torch.tensor(score)
        yield b


def held_out_perplexities(
    model: nn.Module,
    tok,
    sources: tuple[str | None, ...],
    seq_len: int,
    tokens: int,
    batch_size: int,
) -> tuple[float | None, ...]:
    """Perplexity of ``model`` on each source (None where none is given): the in-domain and
    out-of-domain pair that ``prune`` and ``sweep`` report, by one protocol."""
    return tuple(
        perplexity(model, tok, src, seq_len, tokens, batch_size) if src else None for src in sources
    )
