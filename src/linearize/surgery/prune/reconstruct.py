"""Reconstruction (``--reconstruct N``, default 2 for ``linear`` and ``fold``, 0 for ``none``):
after the cuts, refit the MLP output projection of the first N kept layers after each cut, by
closed-form least squares, to the original model's state after the same layer. The layers
downstream of a map take up what it could not express. Where the architecture table knows
the attention's output projection (``--reconstruct-attention``, on by default), that is refit
first, to the original's state between the layer's attention and its MLP.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from linearize import arch, offload
from linearize.capture import masked_rows
from linearize.stats import AffineMap, RegressionStats, fit_toward
from linearize.surgery.replace import (
    bridge_as,
    bridge_positions,
    fit_into_,
    get_bridge,
    proj_has_bias,
    weight_rows,
)

if TYPE_CHECKING:
    from linearize.surgery.prune.session import Session


def reconstruct(s: Session) -> None:
    """Refit the MLP output projection W of the first ``c.refits`` kept layers after every
    cut, in order:
    W = argmin ‖G W − (Y_orig − h + m)‖² + λ‖W − W₀‖², with G the projection's input and m
    its output in the pruned model, h the layer's output and Y_orig the original model's
    state that h stands for (before a bridge, the state the bridge was fitted from).
    A linear problem, because the projection is the last thing the layer adds to the
    stream: each refit takes up what the map before it could not express, as a function of
    the layer's own MLP features."""
    if not arch.foldable(s.model.config):  # the projection a fold needs, for the same reason
        warnings.warn(
            f"--reconstruct skipped: '{s.model.config.model_type}' has no MLP output "
            "projection added straight to the residual stream",
            stacklevel=2,
        )
        return
    n, c = len(s.alive), s.c
    cuts = [p for p in range(n) if s.alive[p] != (s.alive[p - 1] + 1 if p else 0)]
    # not the layer before a cut: fitting a fold's projection to the original's state lost
    # out of domain on SmolLM2 (2.64× against 2.57× at k = 8), as --fit-target original did
    todo = {q for p in cuts for q in range(p, min(p + c.refits, n))}
    for q in sorted(todo):
        offload.resident_(s.model, arch.get_layers(s.model)[1][q])  # the refits must stick
        attn = arch.attn_out_proj(s.model, q) if c.reconstruct_attention else None
        if attn is not None:
            _refit_attention(s, q, attn)
            s.result.reconstructed_attention.append(s.alive[q])
        proj = arch.mlp_out_proj(s.model, q)
        stats = _projection_stats(s, q, proj)
        fit_into_(proj, fit_toward(stats, weight_rows(proj), c.reconstruct_ridge))
        s.changed(q)
        s.result.reconstructed.append(s.alive[q])


def _refit_attention(s: Session, q: int, proj: nn.Module) -> None:
    """Refit layer q's attention output projection O (``proj``), before its MLP's:
    O = argmin ‖G O − (Z_orig − x)‖² + λ‖O − O₀‖², with G the projection's input and x the
    layer's (bridged) input in the pruned model, Z_orig the original model's state between
    attention and MLP in the same layer. Linear, because the attention output is added
    straight to the stream; the MLP refit then sees it."""
    model = s.model
    start = ("o", s.alive[q])  # the original's stream entering this layer
    d = model.config.hidden_size
    ident = AffineMap(weight=torch.eye(d, dtype=torch.float64), bias=torch.zeros(d).double())
    bridge = get_bridge(model, q)

    def keep_mid(b: int, g: Tensor, o: Tensor, h: Tensor, h_stop: Tensor, x: Tensor) -> None:
        s.store.put(("z", b), (x + o).clone())

    # the original's middle state: its input through this (still original) attention
    with bridge_as(model, q, ident) if bridge is not None else contextlib.nullcontext():
        s.projection_pass(
            q,
            q + 1,
            keep_mid,
            proj,
            lambda b: s.store.get(start + (b,)),
            "the original attention of",
        )
    stats = RegressionStats(bias=proj_has_bias(proj))

    def use(b: int, g: Tensor, o: Tensor, h: Tensor, h_stop: Tensor, x: Tensor) -> None:
        xb = x if bridge is None else bridge(x)
        y = s.store.get(("z", b)).to(h) - xb  # the stream around the attention
        stats.update(masked_rows(g, s.masks[b]), masked_rows(y, s.masks[b]))

    s.projection_pass(q, q + 1, use, proj, what="refitting the attention of")
    fit_into_(proj, fit_toward(stats, weight_rows(proj), s.c.reconstruct_ridge))
    s.store.drop_where(lambda key: key[0] == "z")
    s.changed(q)


def _projection_stats(s: Session, q: int, proj: nn.Module) -> RegressionStats:
    """Rows (G, Y_orig − h + m) of layer q's MLP output projection on every batch."""
    bridged = q + 1 in bridge_positions(s.model)  # a map after q: match its input
    yk = ("o", s.alive[q] + 1 if bridged else s.target_of(q + 1))
    stats = RegressionStats(bias=proj_has_bias(proj))

    def use(b: int, g: Tensor, m: Tensor, h: Tensor, h_stop: Tensor, _x) -> None:
        y = s.store.get(yk + (b,)).to(h) - h + m
        stats.update(masked_rows(g, s.masks[b]), masked_rows(y, s.masks[b]))

    s.projection_pass(q, q + 1, use, what="refitting the MLP of")
    return stats
