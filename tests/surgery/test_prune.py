"""Layer surgery and pruning on tiny models: exactness, save → load → generate, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import fixed_ids, make_tiny

from linearize import arch, data, load
from linearize.capture import collect_stats
from linearize.errors import LinearizeError
from linearize.surgery.prune import PruneConfig, parse_remove, prune_model_, replacement_error
from linearize.surgery.replace import bridge_positions, save

SURGERY_ARCHS = ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "opt", "falcon", "phi"]
KW = dict(tokens=600, seq_len=48, batch_size=4, calib="builtin:calib")


class _AffineLayer(torch.nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, dtype=dtype)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


def test_exactly_linear_layer_replaced_by_its_fit_leaves_logits_unchanged(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[2] = _AffineLayer(model.config.hidden_size, torch.float64)
    with torch.no_grad():
        before = model(fixed_ids()).logits
    res = prune_model_(model, tokenizer, PruneConfig(1, strategy="layers", layers=[2], **KW))
    assert res.removed == [2] and arch.n_layers(model) == 3
    with torch.no_grad():
        after = model(fixed_ids()).logits
    assert (after - before).abs().max() <= 1e-5


def test_greedy_picks_the_exactly_linear_layer(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[1] = _AffineLayer(model.config.hidden_size, torch.float64)
    res = prune_model_(model, tokenizer, PruneConfig(1, score="linearity", **KW))
    assert res.removed == [1] and res.steps[0]["score"] == pytest.approx(1.0, abs=1e-9)


class _Sink(torch.nn.Module):
    """Wraps a layer and makes the first token of every sequence massive, as attention sinks
    are in real models, through a map that is linear on that token only."""

    def __init__(self, layer, scale: float = 1e4):
        super().__init__()
        self.layer, self.scale = layer, scale

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        h = out if torch.is_tensor(out) else out[0]
        h = torch.cat([h[:, :1] * self.scale, h[:, 1:]], dim=1)
        return h if torch.is_tensor(out) else (h, *out[1:])


def test_greedy_without_massive_tokens_scores_the_text(tokenizer):
    """With a sink at layer 0, every later layer scores ~1 on all tokens (the sink row is all
    that counts); --massive scores them as analyze --massive does, on the other tokens."""
    from linearize.analyze import analyze_model

    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[0] = _Sink(model.model.layers[0])
    every = analyze_model(model, tokenizer, "builtin:calib", 600, 48, 4)
    typical = analyze_model(model, tokenizer, "builtin:calib", 600, 48, 4, massive=10)
    assert all(r["linearity"] > 0.9999 for r in every.layers[1:])
    assert all(r["linearity"] < 0.999 for r in typical.layers[1:])
    res = prune_model_(model, tokenizer, PruneConfig(1, massive=10, reconstruct=0, **KW))
    crit = {r["layer"]: r["criterion"] for r in res.initial}
    for r in typical.layers:
        assert crit[r["layer"]] == pytest.approx(r["linearity"], abs=1e-9)
    assert res.removed == [max(crit, key=crit.get)]


@pytest.mark.parametrize("strategy", ["linear-greedy", "block-influence", "angular-block"])
def test_protected_layers_are_never_removed(strategy, tokenizer):
    """The exactly linear layer 1 is what greedy would take first; --protect 1 and the last
    layer (-1) leave it and the last one in place, whatever the strategy."""
    model = make_tiny("llama", torch.float64, num_hidden_layers=5)
    model.model.layers[1] = _AffineLayer(model.config.hidden_size, torch.float64)
    cfg = PruneConfig(2, strategy=strategy, protect=[1, -1], reconstruct=0, **KW)
    res = prune_model_(model, tokenizer, cfg)
    assert len(res.removed) == 2 and not {1, 4} & set(res.removed)


def test_greedy_by_replacement_error_picks_the_exactly_linear_layer(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[2] = _AffineLayer(model.config.hidden_size, torch.float64)
    res = prune_model_(model, tokenizer, PruneConfig(1, score="replacement_error", **KW))
    assert res.removed == [2] and res.steps[0]["score"] == pytest.approx(0.0, abs=1e-9)


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
    assert set(idx) == {0, 1}  # every tiny architecture here numbers its attention layers
    assert bool(bridge_positions(model)) == (replace == "linear")
    with torch.no_grad():
        logits = model(fixed_ids()).logits
    save(model, tokenizer, tmp_path, {"removed": res.removed})
    loaded, tok = load(str(tmp_path), dtype="float32", device="cpu")
    assert bridge_positions(loaded) == bridge_positions(model)
    with torch.no_grad():
        assert torch.allclose(loaded(fixed_ids()).logits, logits, atol=1e-5)
    out = loaded.generate(
        fixed_ids(), max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0
    )
    no_cache = loaded.generate(
        fixed_ids(), max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0
    )
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
        (dict(remove=1, massive=0.5), "--massive"),
        (dict(remove=1, protect=[3]), "out of range"),
        (dict(remove=2, protect=[0, -1]), "too few layers left"),
        (dict(remove=1, strategy="layers", layers=[2], protect=[-1]), "--protect keeps"),
        (dict(remove=1, cache_gb=-1.0), "--cache-gb must be at least 0"),
        (dict(remove=1, ppl_tokens=0), "--ppl-tokens must be at least 1"),
        (dict(remove=1, rescore_tokens=-1), "--rescore-tokens must be at least 0"),
    ],
)
def test_bad_prune_requests_fail_before_work(kwargs, match, tokenizer):
    model = make_tiny("llama")
    with pytest.raises(LinearizeError, match=match):
        prune_model_(model, tokenizer, PruneConfig(**{**KW, **kwargs}))
    assert arch.n_layers(model) == 3


def test_parse_remove():
    assert parse_remove("25%", 32) == 8 and parse_remove(4, 30) == 4


# -- fold, block strategies, SLEB, remote code ---------------------------------------------------
class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_fold_of_an_identity_layer_leaves_logits_unchanged(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[2] = _Identity()
    with torch.no_grad():
        before = model(fixed_ids()).logits
    prune_model_(
        model, tokenizer, PruneConfig(1, strategy="layers", layers=[2], replace="fold", **KW)
    )
    with torch.no_grad():
        after = model(fixed_ids()).logits
    assert arch.n_layers(model) == 3 and not bridge_positions(model)
    assert (after - before).abs().max() <= 1e-5


def test_fold_fit_beats_dropping_on_its_calibration_pairs(tokenizer):
    from linearize.capture import fold_stats
    from linearize.stats import AffineMap, fit_affine, relative_error

    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    seqs = data.token_sequences(tokenizer, "builtin:calib", 48, 600)
    fs = fold_stats(model, list(data.batches(seqs, 4, 0)), 2, 4)
    d = model.config.hidden_size
    drop = AffineMap(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))
    assert relative_error(fs, fit_affine(fs, bias=False)) < relative_error(fs, drop)


FOLD_ARCHS = ["llama", "qwen3", "gpt2", "gpt_neox", "opt", "falcon", "phi"]


@pytest.mark.parametrize("model_type", FOLD_ARCHS)
def test_fold_checkpoint_is_stock(model_type, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny(model_type, num_hidden_layers=4)
    prune_model_(
        model, tokenizer, PruneConfig(2, strategy="layers", layers=[1, 2], replace="fold", **KW)
    )
    with torch.no_grad():
        logits = model(fixed_ids()).logits
    save(model, tokenizer, tmp_path, {"removed": [1, 2]})
    assert not (tmp_path / "modeling_linearize.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(plain(fixed_ids()).logits, logits, atol=1e-5)
    out = plain.generate(fixed_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)


def test_linear_checkpoint_loads_with_trust_remote_code(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen3", num_hidden_layers=4)
    prune_model_(model, tokenizer, PruneConfig(2, strategy="layers", layers=[1, 3], **KW))
    with torch.no_grad():
        logits = model(fixed_ids()).logits
    save(model, tokenizer, tmp_path, {"removed": [1, 3]})
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(remote).__name__ == "LinearizedQwen3ForCausalLM"
    with torch.no_grad():
        assert torch.allclose(remote(fixed_ids()).logits, logits, atol=1e-5)
    cached = remote.generate(fixed_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = remote.generate(
        fixed_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("strategy", ["angular-block", "lstsq-block"])
def test_block_strategies_remove_one_contiguous_block(strategy, tokenizer):
    model = make_tiny("mistral", num_hidden_layers=6)
    res = prune_model_(model, tokenizer, PruneConfig(3, strategy=strategy, reconstruct=0, **KW))
    r = sorted(res.removed)
    assert r == list(range(r[0], r[0] + 3)) and bridge_positions(model) == [r[0]]
    assert res.forward_passes == 2 * len(
        list(data.batches(data.token_sequences(tokenizer, KW["calib"], 48, 600), 4, 0))
    )  # one distance pass, one fit pass for the single run


def test_angular_block_picks_the_identity_block(tokenizer):
    model = make_tiny("llama", num_hidden_layers=6)
    model.model.layers[3] = _Identity()
    model.model.layers[4] = _Identity()
    res = prune_model_(
        model, tokenizer, PruneConfig(2, strategy="angular-block", replace="none", **KW)
    )
    assert sorted(res.removed) == [3, 4] and res.steps[0]["score"] == pytest.approx(0.0, abs=1e-6)


def _calib_perplexity(model, tokenizer, drop: int | None = None) -> float:
    """The 192-token calibration perplexity the ppl-* strategies measure, with ``drop`` out."""
    from linearize.eval.perplexity import perplexity

    with arch.layers_removed(model, [] if drop is None else [drop]):
        return perplexity(model, tokenizer, "builtin:calib", 48, 192, 4)


def test_ppl_greedy_removes_the_layer_whose_removal_costs_least(tokenizer):
    model = make_tiny("gemma2", num_hidden_layers=4)
    direct = {p: _calib_perplexity(model, tokenizer, p) for p in range(4)}
    cfg = PruneConfig(1, strategy="ppl-greedy", replace="none", ppl_tokens=192, **KW)
    res = prune_model_(model, tokenizer, cfg)
    best = min(direct, key=direct.get)
    assert res.removed == [best] and res.steps[0]["score"] == pytest.approx(direct[best], rel=1e-6)
    assert arch.n_layers(model) == 3 and len(model.config.layer_types) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_ppl_oneshot_drops_the_layers_whose_removal_alone_costs_least(tokenizer):
    model = make_tiny("gemma2", num_hidden_layers=5)
    direct = {p: _calib_perplexity(model, tokenizer, p) for p in range(5)}
    cfg = PruneConfig(2, strategy="ppl-oneshot", replace="none", ppl_tokens=192, **KW)
    res = prune_model_(model, tokenizer, cfg)
    cheapest = sorted(direct, key=direct.get)[:2]
    assert sorted(res.removed) == sorted(cheapest) and arch.n_layers(model) == 3
    assert [r["criterion"] for r in res.initial] == pytest.approx(
        [direct[p] for p in range(5)], rel=1e-6
    )


def test_ppl_oneshot_scores_each_layer_with_its_own_map_in_place(tokenizer):
    model = make_tiny("llama", torch.float64, num_hidden_layers=4)
    model.model.layers[2] = _AffineLayer(model.config.hidden_size, torch.float64)
    unpruned = _calib_perplexity(model, tokenizer)
    cfg = PruneConfig(1, strategy="ppl-oneshot", ppl_tokens=192, reconstruct=0, **KW)
    res = prune_model_(model, tokenizer, cfg)
    crit = {r["layer"]: r["criterion"] for r in res.initial}
    assert crit[2] == pytest.approx(unpruned, rel=1e-6)  # an exact map costs nothing
    assert res.removed == [min(crit, key=crit.get)] and arch.n_layers(model) == 3


def test_bridge_as_restores_what_was_there():
    from linearize.stats import AffineMap
    from linearize.surgery.replace import bridge_as, get_bridge, set_bridge_

    model = make_tiny("llama", torch.float64, num_hidden_layers=3)
    d = model.config.hidden_size
    fit = AffineMap(weight=2 * torch.eye(d, dtype=torch.float64), bias=torch.ones(d).double())
    with bridge_as(model, 1, fit):
        assert bridge_positions(model) == [1] and bool(get_bridge(model, 1).bias.eq(1).all())
    assert bridge_positions(model) == []
    set_bridge_(model, 3, fit)  # before the final norm
    with bridge_as(model, 3, AffineMap(weight=torch.eye(d).double(), bias=torch.zeros(d).double())):
        assert bool(get_bridge(model, 3).bias.eq(0).all())
    assert bool(get_bridge(model, 3).weight.diagonal().eq(2).all())


def test_layers_removed_context_restores_everything():
    model = make_tiny("gemma2", num_hidden_layers=4)
    types = list(model.config.layer_types)
    with arch.layers_removed(model, [0, 2]) as kept:
        assert kept == [1, 3] and arch.n_layers(model) == 2 and model.config.num_hidden_layers == 2
    assert arch.n_layers(model) == 4 and model.config.layer_types == types
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "model_type, kwargs, match",
    [
        ("mixtral", dict(strategy="layers", layers=[1]), "fold is not possible for 'mixtral'"),
        ("gemma2", dict(strategy="layers", layers=[1]), "fold is not possible for 'gemma2'"),
        ("llama", dict(strategy="layers", layers=[0, 1]), "cannot remove layer 0"),
    ],
)
def test_bad_fold_requests_fail_before_work(model_type, kwargs, match, tokenizer):
    model = make_tiny(model_type)
    with pytest.raises(LinearizeError, match=match):
        prune_model_(model, tokenizer, PruneConfig(replace="fold", **{**KW, **kwargs}))
    assert arch.n_layers(model) == 3


def test_greedy_fold_never_picks_layer_0(tokenizer):
    model = make_tiny("llama", num_hidden_layers=4)
    with torch.no_grad():  # layer 0 becomes the identity: the most linear, but nothing precedes it
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    res = prune_model_(model, tokenizer, PruneConfig(2, replace="fold", score="linearity", **KW))
    assert 0 not in res.removed and arch.n_layers(model) == 2


def test_runs_of():
    from linearize.surgery.prune import runs_of

    assert runs_of([7, 3, 4]) == [(3, 5), (7, 8)] and runs_of([]) == []


def test_dropping_named_layers_reads_no_calibration_text(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    model = make_tiny("llama")
    cfg = PruneConfig(strategy="layers", layers=[1], replace="none", calib="self", tokens=4096)
    res = prune_model_(model, tokenizer, cfg)
    assert res.removed == [1] and res.forward_passes == 0 and arch.n_layers(model) == 2
    assert not (tmp_path / "self-text").exists()  # nothing sampled from the model


@pytest.mark.parametrize("strategy", ["linear-greedy", "ppl-oneshot"])
def test_progress_hears_every_pass_to_its_end(strategy, tokenizer):
    """What the CLI's progress line shows: every pass over calibration batches starts at 0 and
    reaches its total, the totals add up to the passes prune.json counts, and the phases name
    layers by their original indices."""
    calls = []
    cfg = PruneConfig(2, strategy=strategy, ppl_tokens=192, **KW)
    model = make_tiny("llama", num_hidden_layers=4)
    res = prune_model_(model, tokenizer, cfg, on_progress=lambda *a: calls.append(a))
    starts = [(what, total) for what, done, total in calls if done == 0 and total]
    ends = [(what, total) for what, done, total in calls if done == total and total]
    assert starts == ends and sum(total for _, total in starts) == res.forward_passes
    assert calls[0] == ("calibration text", 0, 0)
    phases = {what for what, _ in starts}
    assert "scoring, layers 0–3" in phases
    assert any(w.startswith("refitting the MLP of layer") for w in phases)
    if strategy == "ppl-oneshot":
        assert {f"perplexity with layer {p} mapped" for p in range(4)} <= phases
    else:  # the re-scoring after a cut starts at the cut, in the original numbering
        later = {
            w for w in phases if w.startswith("scoring, layers ") and w != "scoring, layers 0–3"
        }
        assert later and all(w.endswith("–3") for w in later)
