"""Layer surgery and pruning on tiny models: exactness, save → load → generate, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from linearize import arch, data, load
from linearize.capture import collect_stats
from linearize.errors import LinearizeError
from linearize.prune import PruneConfig, parse_remove, prune_model_, replacement_error
from linearize.replace import bridge_positions, save

SURGERY_ARCHS = ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "opt", "falcon", "phi"]
KW = dict(tokens=600, seq_len=48, batch_size=4, calib="builtin:calib")


class _AffineLayer(torch.nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, dtype=dtype)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


def _ids():
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def test_exactly_linear_layer_replaced_by_its_fit_leaves_logits_unchanged(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[2] = _AffineLayer(model.config.hidden_size, torch.float64)
    with torch.no_grad():
        before = model(_ids()).logits
    res = prune_model_(model, tokenizer, PruneConfig(1, strategy="layers", layers=[2], **KW))
    assert res.removed == [2] and arch.n_layers(model) == 3
    with torch.no_grad():
        after = model(_ids()).logits
    assert (after - before).abs().max() <= 1e-5


def test_greedy_picks_the_exactly_linear_layer(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[1] = _AffineLayer(model.config.hidden_size, torch.float64)
    res = prune_model_(model, tokenizer, PruneConfig(1, **KW))
    assert res.removed == [1] and res.steps[0]["score"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("model_type", SURGERY_ARCHS)
@pytest.mark.parametrize("replace", ["none", "linear"])
def test_prune_save_load_generate(model_type, replace, tokenizer, tmp_path):
    model = make_tiny(model_type, num_hidden_layers=4)
    res = prune_model_(model, tokenizer, PruneConfig(2, replace=replace, **KW))
    assert len(res.removed) == 2 and arch.n_layers(model) == 2
    cfg = model.config
    assert getattr(cfg, arch.get_spec(cfg).n_layers_key) == 2
    for key in ("layer_types",):
        if getattr(cfg, key, None) is not None:
            assert len(getattr(cfg, key)) == 2
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert set(idx) <= {0, 1}
    assert bool(bridge_positions(model)) == (replace == "linear")
    with torch.no_grad():
        logits = model(_ids()).logits
    save(model, tokenizer, tmp_path, {"removed": res.removed})
    loaded, tok = load(str(tmp_path), dtype="float32", device="cpu")
    assert bridge_positions(loaded) == bridge_positions(model)
    with torch.no_grad():
        assert torch.allclose(loaded(_ids()).logits, logits, atol=1e-5)
    out = loaded.generate(_ids(), max_new_tokens=5, do_sample=False, use_cache=True,
                          pad_token_id=0)  # fmt: skip
    no_cache = loaded.generate(_ids(), max_new_tokens=5, do_sample=False, use_cache=False,
                               pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 17) and torch.equal(out, no_cache)


def test_adjacent_removals_compose_into_one_bridge(tokenizer):
    model = make_tiny("mistral", num_hidden_layers=5)
    prune_model_(model, tokenizer, PruneConfig(2, strategy="layers", layers=[1, 2], **KW))
    assert bridge_positions(model) == [1]


def test_replacement_error_matches_direct_computation(tokenizer):
    model = make_tiny("llama", torch.float64)
    seqs = data.token_sequences(tokenizer, "builtin", 48, 400)
    stats = collect_stats(model, data.batches(seqs, 4, 0))
    from reference import stacked_states

    x, y = stacked_states(model, tokenizer, "builtin", 48, 400)[1]
    from linearize.stats import fit_affine

    fit = fit_affine(stats[1])
    direct = float(((x @ fit.weight + fit.bias - y) ** 2).sum() / (y**2).sum())
    assert replacement_error(stats[1]) == pytest.approx(direct, rel=1e-8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(remove=3), "all 3 layers"),
        (dict(remove="100%"), "all 3 layers"),
        (dict(remove=0), "removes no layer"),
        (dict(remove=1, strategy="layers", layers=[1, 1]), "duplicate"),
        (dict(remove=1, strategy="layers", layers=[5]), "out of range"),
        (dict(remove=1, strategy="layers", layers=[0, 1, 2]), "at least one must stay"),
        (dict(remove=1, strategy="magic"), "unknown strategy"),
    ],
)
def test_bad_prune_requests_fail_before_work(kwargs, match, tokenizer):
    model = make_tiny("llama")
    with pytest.raises(LinearizeError, match=match):
        prune_model_(model, tokenizer, PruneConfig(**{**KW, **kwargs}))
    assert arch.n_layers(model) == 3


def test_parse_remove():
    assert parse_remove("25%", 32) == 8 and parse_remove(4, 30) == 4
