"""The paper's path, for comparison: stack every layer's input and output, then score."""

from __future__ import annotations

import torch

from linearize import arch, data
from linearize.stats import procrustes_linearity


@torch.no_grad()
def stacked_states(model, tokenizer, source, seq_len, tokens, batch_size=4):
    """Per layer (X, Y): all non-padding rows, stacked (memory grows with tokens: tests only)."""
    _, layers = arch.get_layers(model)
    xs = {i: [] for i in range(len(layers))}
    ys = {i: [] for i in range(len(layers))}
    mask_ref = {}

    def keep(h):
        rows = h.reshape(-1, h.shape[-1])
        return rows[mask_ref["m"]].detach().to(torch.float64)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: xs[i].append(keep(a[0] if a else k["hidden_states"])),
                with_kwargs=True,
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, o, i=i: ys[i].append(keep(o if torch.is_tensor(o) else o[0]))
            )
        )
    try:
        seqs = data.token_sequences(tokenizer, source, seq_len, tokens)
        for b in data.batches(seqs, batch_size, data.pad_id_of(tokenizer)):
            mask_ref["m"] = b["attention_mask"].reshape(-1).bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: (torch.cat(xs[i]), torch.cat(ys[i])) for i in xs}


def reference_scores(model, tokenizer, source, seq_len, tokens, batch_size=4):
    out = []
    for i, (x, y) in stacked_states(model, tokenizer, source, seq_len, tokens, batch_size).items():
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        out.append(
            {
                "layer": i,
                "linearity": procrustes_linearity(x, y),
                "linearity_no_residual": procrustes_linearity(x, y - x),
                "cosine": float(cos.mean()),
                "angular_distance": float(torch.arccos(cos.clamp(-1, 1)).mean() / torch.pi),
            }
        )
    return out
