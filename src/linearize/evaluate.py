"""Evaluation protocols. Perplexity here is the one ``prune`` and ``eval`` share.

Protocol (fixed, so numbers from different commands compare): the source is cut into
non-overlapping windows of ``seq_len`` tokens by ``linearize.data`` (with the tokenizer's BOS
in front of each window when it adds one to ordinary text). Every token of a window except the
first is predicted from the tokens before it in that window only. perplexity =
exp(Σ NLL / number of predicted tokens), pooled over all windows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linearize import data
from linearize.errors import LinearizeError


@torch.no_grad()
def batch_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(Σ NLL, number of predicted tokens) of one padded batch: every real token but the first
    of its row, predicted from the tokens before it in that row."""
    device = model.get_input_embeddings().weight.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    tok_nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    keep = mask[:, 1:].bool()
    return float(tok_nll[keep].double().sum()), int(keep.sum())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = "builtin:eval",
    seq_len: int = 512,
    tokens: int | None = 32768,
    batch_size: int = 8,
) -> float:
    """Held-out perplexity by the protocol in this module's docstring."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    seqs = data.token_sequences(tokenizer, source, seq_len, tokens)
    try:
        for b in data.batches(seqs, batch_size, data.pad_id_of(tokenizer)):
            s, n = batch_nll(model, b)
            nll, count = nll + s, count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise LinearizeError(f"perplexity source '{source}' has no token to predict")
    return math.exp(nll / count)
