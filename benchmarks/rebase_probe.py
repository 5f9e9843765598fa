"""Can a bridged cut become a stock model without losing the bridge? A probe, on Llama-family
cuts with one bridge.

    linearize prune --remove 8 --strategy layers --layers 12,13,14,15,16,17,18,19 --out p8
    python benchmarks/rebase_probe.py p8 [--tokens 8192]

The bridge maps the residual stream h ↦ h W + b after the last kept layer before the cut. A
stock model cannot apply W to the stream, but it can *carry the stream in W's basis* from
the start: the embedding becomes E W + b (untied from the output head), every layer before
the cut writes its attention and MLP outputs times W, and every reader before the cut takes
W⁻¹ into its input projections, with its norm weight folded in. RMSNorm is not equivariant
under a general W, so each reader is given a constant scale (the mean of rms(x W + b) ÷
rms(x) on calibration text) and the bias's share of its input is left out: both are exact
only for a scaled orthogonal W without bias, which tests/surgery/test_rebase_probe.py checks. The probe
prints the bridged and the rebased model's perplexity in and out of domain and the ratios the
constant scales stand in for.
"""

from __future__ import annotations

import argparse

import torch

from linearize import data, load
from linearize.eval.perplexity import perplexity
from linearize.hooks import hooks
from linearize.surgery._remote_modeling import BRIDGE

EVALS = ("builtin:eval", "fortunes")


def readers(layers, j: int) -> list:
    """(norm, input projections it feeds) of every layer before the bridge."""
    out = []
    for layer in layers[:j]:
        a, m = layer.self_attn, layer.mlp
        out.append((layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
        out.append((layer.post_attention_layernorm, [m.gate_proj, m.up_proj]))
    return out


@torch.no_grad()
def norm_ratios(model, j: int, seqs: list[list[int]], w, b) -> list[torch.Tensor]:
    """Per reader, rms(x W + b) ÷ rms(x) of every calibration token."""
    pairs = readers(model.model.layers, j)
    got: dict[int, list] = {id(n): [] for n, _ in pairs}

    def hook(mod, args, kwargs):
        x = args[0].double().reshape(-1, w.shape[0])
        got[id(mod)].append((x @ w + b).pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt())

    with hooks(pre=[(n, hook) for n, _ in pairs]):
        for s in seqs:
            model(torch.tensor([s]))
    return [torch.cat(got[id(n)]) for n, _ in pairs]


@torch.no_grad()
def rebase_(model, j: int, scales: list[float], bias_at_cut: bool = False) -> None:
    """Carry the stream before bridge ``j`` in its basis, then make the bridge the identity.
    ``bias_at_cut``: b enters as a bias of the last MLP before the cut (Llama's ``mlp_bias``)
    instead of through the embedding, so no reader sees it."""
    layers = model.model.layers
    bridge = getattr(layers[j], BRIDGE)
    w, b = bridge.weight.double(), bridge.bias.double()
    if bias_at_cut:
        down = layers[j - 1].mlp.down_proj
        down.bias = torch.nn.Parameter(b.float().clone())  # before W: the bias is not turned
        b = torch.zeros_like(b)
    w_inv_t = torch.linalg.inv(w).T
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight.data_ptr() == emb.data_ptr():  # tied: the head keeps E
        model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
        model.config.tie_word_embeddings = False
    emb.data = (emb.double() @ w + b).float()
    for (norm, projs), s in zip(readers(layers, j), scales, strict=True):
        g = norm.weight.double()
        for p in projs:
            p.weight.data = (s * p.weight.double() * g @ w_inv_t).float()
        norm.weight.data.fill_(1.0)
    for layer in layers[:j]:
        for p in (layer.self_attn.o_proj, layer.mlp.down_proj):
            p.weight.data = (w.T @ p.weight.double()).float()  # a bias set above stays as is
    bridge.weight.data = torch.eye(w.shape[0])
    bridge.bias.data.zero_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--bias-at-cut", action="store_true", help="b as the last MLP's bias")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load(a.pruned, dtype="float32", device="cpu")
    j = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer, BRIDGE))
    bridge = getattr(model.model.layers[j], BRIDGE)
    w, b = bridge.weight.double(), bridge.bias.double()
    print(f"bridge before layer {j}: cond(W) {torch.linalg.cond(w):.3g}, |b| {b.norm():.3g}")
    before = {s: perplexity(model, tok, s, 512, a.tokens) for s in EVALS}
    seqs = list(data.token_sequences(tok, "builtin:calib", 512, 4096))
    ratios = norm_ratios(model, j, seqs, w, 0 * b if a.bias_at_cut else b)
    for i, r in enumerate(ratios):
        print(f"reader {i:2d}: rms ratio mean {r.mean():.3f}, std {r.std():.3f}")
    rebase_(model, j, [r.mean().item() for r in ratios], a.bias_at_cut)
    after = {s: perplexity(model, tok, s, 512, a.tokens) for s in EVALS}
    for s in EVALS:
        print(
            f"{s}: bridged {before[s]:.2f}, rebased {after[s]:.4g} (× {after[s] / before[s]:.3g})"
        )


def check_exact_for_a_scaled_rotation() -> None:
    """With W = 2.5 Q (Q orthogonal) and no bias the rebase is exact (up to RMSNorm's eps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from linearize.surgery._remote_modeling import attach_bridge

    torch.manual_seed(0)
    c = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-9,
    )
    m = LlamaForCausalLM(c).eval()
    for layer in m.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    attach_bridge(m.model.layers[2], 32, torch.float32).weight.data = (2.5 * q).float()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want = m(ids).logits
        rebase_(m, 2, [2.5] * 4)
        got = m(ids).logits
    assert (want - got).abs().max() < 1e-4 * want.abs().max()


if __name__ == "__main__":
    main()
