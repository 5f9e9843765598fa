"""analyze_model on tiny random models of many architectures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, make_tiny
from reference import reference_scores

from linearize import arch, data
from linearize.analyze import SCORE_KEYS, analyze_model
from linearize.capture import collect_stats

SEQ, TOKENS = 48, 600


@pytest.mark.parametrize("model_type", ARCHS)
def test_scores_equal_svd_reference_on_every_architecture(model_type, tokenizer):
    model = make_tiny(model_type, torch.float64)
    rep = analyze_model(model, tokenizer, "builtin", TOKENS, SEQ, batch_size=3)
    ref = reference_scores(model, tokenizer, "builtin", SEQ, TOKENS)
    assert rep.tokens == TOKENS
    assert [r["layer"] for r in rep.layers] == [0, 1, 2]
    for got, want in zip(rep.layers, ref, strict=True):
        for key in ("linearity", "linearity_no_residual", "cosine", "angular_distance"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (model_type, got["layer"], key)
        assert got["block_influence"] == pytest.approx(1 - got["cosine"], abs=1e-12)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "falcon"])
def test_float32_products_match_float64_products(model_type, tokenizer):
    """A float32 model: the default (float32 products per batch) against --exact and the
    stacked float64 SVD reference, at 1e-6; several batch sizes agree."""
    model = make_tiny(model_type)
    fast = [analyze_model(model, tokenizer, "builtin", TOKENS, SEQ, batch_size=b) for b in (1, 4)]
    exact = analyze_model(model, tokenizer, "builtin", TOKENS, SEQ, batch_size=4, exact=True)
    ref = reference_scores(model, tokenizer, "builtin", SEQ, TOKENS)
    for rows in zip(fast[0].layers, fast[1].layers, exact.layers, ref, strict=True):
        for key in ("linearity", "linearity_no_residual", "cosine", "angular_distance"):
            want = rows[3][key]
            assert all(r[key] == pytest.approx(want, abs=1e-6) for r in rows[:3]), (key, rows)


def test_batch_size_does_not_change_scores(tokenizer):
    model = make_tiny("llama", torch.float64)
    runs = [
        analyze_model(model, tokenizer, "builtin", TOKENS, SEQ, batch_size=b) for b in (1, 4, 13)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0].layers, other.layers, strict=True):
            for k in SCORE_KEYS:
                assert a[k] == pytest.approx(b[k], abs=1e-9)


def test_padding_never_counts(tokenizer, tmp_path):
    # records of very different lengths: batched with padding vs one at a time
    src = tmp_path / "recs.jsonl"
    texts = ["short one.", "a much longer record " * 8, "mid sized text here", "x"]
    src.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    model = make_tiny("qwen2", torch.float64)
    padded = analyze_model(model, tokenizer, str(src), None, 64, batch_size=4)
    alone = analyze_model(model, tokenizer, str(src), None, 64, batch_size=1)
    ref = reference_scores(model, tokenizer, str(src), 64, None, batch_size=1)
    n_real = sum(len(s) for s in data.token_sequences(tokenizer, str(src), 64))
    assert padded.tokens == alone.tokens == n_real
    for a, b, r in zip(padded.layers, alone.layers, ref, strict=True):
        for k in SCORE_KEYS:
            assert a[k] == pytest.approx(b[k], abs=1e-9)
        assert a["linearity"] == pytest.approx(r["linearity"], abs=1e-6)


class _LinearLayer(torch.nn.Module):
    """Stands in for a decoder layer: returns an affine map of its input."""

    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, dtype=torch.float64)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


def test_layer_replaced_by_linear_scores_one(tokenizer):
    model = make_tiny("llama", torch.float64)
    model.model.layers[1] = _LinearLayer(model.config.hidden_size)
    rep = analyze_model(model, tokenizer, "builtin", TOKENS, SEQ)
    assert rep.layers[1]["linearity"] == pytest.approx(1.0, abs=1e-9)
    assert rep.layers[1]["linearity_no_residual"] == pytest.approx(1.0, abs=1e-9)
    assert rep.layers[0]["linearity"] < 0.999


def test_consecutive_layers_share_moments(tokenizer):
    model = make_tiny("llama", torch.float64)
    seqs = data.token_sequences(tokenizer, "builtin", SEQ, TOKENS)
    stats = collect_stats(model, data.batches(seqs, 4, 0))
    assert stats[0].x_source is None
    assert stats[1].x_source is stats[0] and stats[2].x_source is stats[1]


def test_layer_subset_stops_early_and_matches_full_run(tokenizer):
    model = make_tiny("mistral", torch.float64)
    calls = []
    h = arch.get_layers(model)[1][2].register_forward_hook(lambda *a: calls.append(1))
    sub = analyze_model(model, tokenizer, "builtin", TOKENS, SEQ, layers=[0, 1])
    h.remove()
    full = analyze_model(model, tokenizer, "builtin", TOKENS, SEQ)
    assert not calls, "layer 2 ran although only layers 0 and 1 were asked for"
    assert [r["layer"] for r in sub.layers] == [0, 1]
    for a, b in zip(sub.layers, full.layers[:2], strict=True):
        assert a["linearity"] == pytest.approx(b["linearity"], abs=1e-12)


def test_lm_head_never_runs(tokenizer):
    model = make_tiny("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    analyze_model(model, tokenizer, "builtin", 200, 32)
    assert not calls


def test_few_tokens_warn_that_scores_are_trivial(tokenizer):
    model = make_tiny("llama")
    with pytest.warns(UserWarning, match="trivially near 1"):
        analyze_model(model, tokenizer, "builtin", 20, 10)


def test_anisotropy_is_optional(tokenizer):
    model = make_tiny("llama")
    assert "anisotropy" not in analyze_model(model, tokenizer, "builtin", 200, 32).layers[0]
    rep = analyze_model(model, tokenizer, "builtin", 200, 32, anisotropy=True)
    assert 0 < rep.layers[0]["anisotropy"] <= 1


def test_an_exception_inside_a_capture_leaves_no_hook_and_restores_the_mode(
    tokenizer, hook_spy, monkeypatch
):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = make_tiny("llama").train()
    batches = data.batches(data.token_sequences(tokenizer, "builtin", 32, 128), 2, 0)
    hook_spy.fail_in_layer(monkeypatch, LlamaDecoderLayer, after=2)
    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(model, batches)
    assert len(hook_spy.handles) == 6 and hook_spy.left() == 0  # 3 layers × (pre, post)
    assert model.training
