"""Refitting the MLP output projections after a cut to the original model's states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny
from test_prune_fit import KW, _calib_batches, _final_states

from linearize import arch
from linearize.stats import RegressionStats, fit_toward
from linearize.surgery.prune import PruneConfig, prune_model_


def _rows(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(300, 4, generator=g, dtype=torch.float64) + (2.0 if bias else 0)
    s = RegressionStats(bias=bias)
    s.update(x[:100], y[:100])
    s.update(x[100:], y[100:])  # batches add up
    return s, x, y


def test_fit_toward_is_least_squares_without_ridge_and_the_prior_with_infinite_ridge():
    s, x, y = _rows(bias=True)
    ones = torch.ones(300, 1, dtype=torch.float64)
    ols = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    prior = torch.randn(8, 4, dtype=torch.float64)
    assert torch.allclose(fit_toward(s, prior, 0.0), ols, atol=1e-10)
    assert torch.equal(fit_toward(s, prior, math.inf), prior)
    near = fit_toward(s, prior, 1e6)
    assert torch.allclose(near[:7], prior[:7], atol=1e-4)  # weights pulled to the prior …
    # … the bias row is not: it still takes up the mean the pulled weights leave
    assert torch.allclose(near[7], (y - x @ prior[:7]).mean(0), atol=1e-3)


def test_fit_toward_moves_monotonically_from_least_squares_to_the_prior():
    s, *_ = _rows(bias=False)
    prior = torch.zeros(7, 4, dtype=torch.float64)
    dists = [float(fit_toward(s, prior, r).norm()) for r in (0.0, 0.1, 1.0, 100.0)]
    assert dists == sorted(dists, reverse=True) and dists[-1] < 0.05 * dists[0]


@pytest.mark.parametrize(
    "model_type,replace,layers",
    [
        ("llama", "linear", [2, 3]),
        ("llama", "fold", [1, 3]),
        ("llama", "none", [2]),  # with --reconstruct: a stock checkpoint, no map
        ("gpt2", "linear", [1, 2]),  # Conv1D projection with a bias
        ("opt", "linear", [2]),  # fc2 on (B*T, d) rows
    ],
)
def test_reconstruct_brings_the_pruned_model_closer_to_the_original(
    tokenizer, model_type, replace, layers
):
    base = make_tiny(model_type, torch.float64, num_hidden_layers=6, seed=3)
    batches = _calib_batches(tokenizer)
    want = _final_states(base, batches)
    errors, results = {}, {}
    for n in (0, 2):
        m = copy.deepcopy(base)
        cfg = PruneConfig(len(layers), strategy="layers", layers=layers, replace=replace, **KW)
        cfg.reconstruct = n
        results[n] = prune_model_(m, tokenizer, cfg)
        got = _final_states(m, batches)
        errors[n] = float((got - want).square().sum() / want.square().sum())
    assert errors[2] < errors[0], errors
    assert results[0].reconstructed == []
    kept = [i for i in range(6) if i not in layers]
    after = [kept[p] for p in range(len(kept)) if p and kept[p] != kept[p - 1] + 1]
    assert set(results[2].reconstructed) >= set(after) and results[2].reconstructed


def test_dropping_layers_refits_only_when_asked(tokenizer):
    base = make_tiny("llama", torch.float64, num_hidden_layers=5, seed=3)
    cfg = PruneConfig(2, strategy="layers", layers=[2, 3], replace="none", **KW)
    assert prune_model_(copy.deepcopy(base), tokenizer, cfg).reconstructed == []  # a baseline
    cfg.reconstruct = 1
    assert prune_model_(copy.deepcopy(base), tokenizer, cfg).reconstructed == [4]


def test_reconstruct_is_skipped_with_a_warning_where_no_projection_can_take_it(tokenizer):
    m = make_tiny("gemma2", torch.float64, num_hidden_layers=4)
    with pytest.warns(UserWarning, match="--reconstruct skipped"):
        res = prune_model_(m, tokenizer, PruneConfig(1, **KW))
    assert res.reconstructed == [] and len(res.removed) == 1


def _mid_states(model, layer, batches):
    """The stream between attention and MLP of ``layer`` (after any bridge) on every batch."""
    held, out = {}, []
    pre = layer.register_forward_pre_hook(
        lambda m, a, k: held.update(x=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    post = layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: out.append(held["x"] + o))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        pre.remove(), post.remove()
    return torch.cat([z[b["attention_mask"].bool()] for z, b in zip(out, batches, strict=True)])


@pytest.mark.parametrize("ridge", [0.0, math.inf])
def test_attention_refit_moves_the_middle_state_toward_the_original(tokenizer, ridge):
    base = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=3)
    batches = _calib_batches(tokenizer)  # the calibration rows themselves
    want = _mid_states(base, base.model.layers[4], batches)
    errors, results = {}, {}
    for attention in (False, True):
        m = copy.deepcopy(base)
        cfg = PruneConfig(2, strategy="layers", layers=[2, 3], reconstruct=1, **KW)
        cfg.reconstruct_ridge, cfg.reconstruct_attention = ridge, attention
        results[attention] = prune_model_(m, tokenizer, cfg)
        errors[attention] = float((_mid_states(m, m.model.layers[2], batches) - want).norm())
    assert results[True].reconstructed_attention == [4] == results[True].reconstructed
    assert results[False].reconstructed_attention == []
    if ridge == 0.0:  # least squares on these very rows: the refit can only come closer
        assert errors[True] < 0.98 * errors[False], errors
    else:  # an infinite pull keeps the projection as it was
        assert errors[True] == pytest.approx(errors[False], rel=1e-9)


def test_attention_refit_only_where_the_table_knows_the_projection(tokenizer):
    assert arch.attn_out_proj(make_tiny("llama", num_hidden_layers=2), 1) is not None
    m = make_tiny("gpt2", torch.float64, num_hidden_layers=4)
    assert arch.attn_out_proj(m, 1) is None
    cfg = PruneConfig(1, strategy="layers", layers=[1], reconstruct_attention=True, **KW)
    res = prune_model_(m, tokenizer, cfg)
    assert res.reconstructed == [2, 3] and res.reconstructed_attention == []
