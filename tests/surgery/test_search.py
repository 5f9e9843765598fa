"""The ``search`` strategy: the removed set chosen by the cut model's KL from the original, with
replacements in place, seeded by every other strategy. Tiny models; a planted pair of layers
that are harmless only together, which every per-layer ranking misses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_run, kill_run, make_tiny, prune_args, saved_tiny

from linearize.stats.spans import SpanMoments, kl_from_top_k, top_k
from linearize.surgery.prune import PruneConfig, prune_model_

SMALL = dict(
    tokens=2400,
    seq_len=48,
    batch_size=4,
    calib="builtin:calib",
    search_tokens=768,
    search_eval_tokens=768,
    search_heldout_tokens=384,
    search_generations=6,
    search_offspring=8,
)


def test_span_moments_fit_every_run_as_a_direct_fit():
    """The map of any run from the one-pass moments equals least squares on the rows."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, 6, generator=g, dtype=torch.float64) + 5.0]
    for _ in range(4):
        xs.append(xs[-1] @ torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.5 + 1.0)
    mom = SpanMoments(5, 3)
    for lo in range(0, 300, 100):
        mom.update([x[lo : lo + 100] for x in xs])
    for lo, hi in [(0, 1), (1, 4), (2, 4)]:
        fit = mom.fit(lo, hi)
        design = torch.cat([xs[lo], torch.ones(300, 1, dtype=torch.float64)], 1)
        want = torch.linalg.lstsq(design, xs[hi]).solution
        torch.testing.assert_close(fit.weight, want[:-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fit.bias, want[-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="within 3 layers"):
        mom.fit(0, 4)


def test_top_k_kl_is_the_full_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    want = torch.nn.functional.kl_div(
        q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum"
    )
    got, n = kl_from_top_k(top_k(p, 11), q)
    assert n == 10 and got == pytest.approx(float(want), rel=1e-4)
    lower, _ = kl_from_top_k(top_k(p, 3), q)
    assert 0 <= lower <= got + 1e-6  # the top 3 plus one bucket: a lower bound
    assert kl_from_top_k(top_k(p, 3), p)[0] == pytest.approx(0.0, abs=1e-5)


def _planted(tokenizer, n=8, pair=(3, 4)):
    """A Llama whose layers ``pair`` cancel: the first adds f(x) (a quadratic function of
    dimensions 0-15, written to 16-31), the second adds −f(x). A huge norm epsilon makes every
    norm a plain scale (weights of 1e4 undo it), so the second sees the same dimensions 0-15
    as the first: removing both is exact, removing either alone leaves ±f, which no linear map
    can stand in for."""
    m = make_tiny("llama", num_hidden_layers=n, rms_norm_eps=1e8, seed=3)
    a, b = pair
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(50.0)  # a stream of unit scale
        m.lm_head.weight.mul_(50.0)
        m.model.norm.weight.fill_(1e4)
        for layer in m.model.layers:
            layer.input_layernorm.weight.fill_(1e4)
            layer.post_attention_layernorm.weight.fill_(1e4)
            layer.self_attn.o_proj.weight.mul_(10.0)
            layer.mlp.down_proj.weight.mul_(10.0)
        gate = torch.randn(64, 32, generator=g) * 3.0
        up = torch.randn(64, 32, generator=g) * 3.0
        gate[:, 16:] = up[:, 16:] = 0.0
        down = torch.randn(32, 64, generator=g) * 0.01
        down[:16] = 0.0
        for i, sign in ((a, 1.0), (b, -1.0)):
            layer = m.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(sign * down)
    return m


def test_search_finds_a_planted_pair_that_greedy_misses(tokenizer):
    base = dict(SMALL, replace="linear", reconstruct=0)
    greedy = prune_model_(_planted(tokenizer), tokenizer, PruneConfig(2, **base))
    assert sorted(greedy.removed) != [3, 4]
    res = prune_model_(
        _planted(tokenizer),
        tokenizer,
        PruneConfig(2, strategy="search", **{**base, "search_generations": 10}),
    )
    assert sorted(res.removed) == [3, 4], res.search
    s = res.search
    per_layer = ("linear-greedy", "linear-oneshot", "block-influence", "ppl-oneshot")
    assert s["seeds"]["linear-greedy"]["removed"] == sorted(greedy.removed)
    assert s["best"]["kl"] < 1e-4 < min(s["seeds"][name]["kl"] for name in per_layer), s
    assert s["best"]["kl_held_out"] < 1e-4 < min(s["seeds"][n]["kl_held_out"] for n in per_layer)


@pytest.mark.parametrize("replace", ["none", "linear", "fold"])
def test_search_is_never_worse_than_its_seeds(replace, tokenizer):
    m = make_tiny("llama", num_hidden_layers=6, seed=1)
    res = prune_model_(m, tokenizer, PruneConfig(2, strategy="search", replace=replace, **SMALL))
    s = res.search
    assert {"linear-greedy", "block-influence", "ppl-oneshot", "last-k"} <= set(s["seeds"])
    assert "ppl-greedy" not in s["seeds"]  # costly: only when asked for
    assert s["best"]["kl"] <= min(v["kl"] for v in s["seeds"].values()) + 1e-12
    assert [t["kl"] for t in s["trace"]] == sorted((t["kl"] for t in s["trace"]), reverse=True)
    assert s["trace"][-1]["evaluations"] == s["evaluations"] or s["evaluations"] >= 1
    assert sorted(res.removed) == s["best"]["removed"]
    if replace == "fold":
        assert 0 not in res.removed
    assert len(m.model.layers) == 4


def test_search_respects_protect(tokenizer):
    m = make_tiny("llama", num_hidden_layers=6, seed=1)
    cfg = PruneConfig(3, strategy="search", protect=[1, 2, 4], **SMALL)
    res = prune_model_(m, tokenizer, cfg)
    assert set(res.removed) == {0, 3, 5}


def test_search_keeps_whole_periods_of_a_layer_pattern(tokenizer):
    """Gemma 3's pattern (here 2 sliding + 1 full): a stock cut must remove whole periods, so
    the checkpoint still has the pattern its GGUF readers rebuild."""
    from linearize import arch

    m = make_tiny("gemma3_text", num_hidden_layers=9, sliding_window_pattern=3)
    period = arch.pattern_period(m.config)
    assert period == 3
    res = prune_model_(m, tokenizer, PruneConfig(3, strategy="search", replace="none", **SMALL))
    assert sorted(res.removed) == list(range(min(res.removed), min(res.removed) + 3))
    assert min(res.removed) % period == 0
    assert m.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2


def test_search_cli_records_its_trace_and_restarts_after_a_kill(tmp_path, tokenizer):
    model = saved_tiny(tmp_path / "m", tokenizer, num_hidden_layers=5)
    out = tmp_path / "p"
    args = [
        *prune_args(model, out, 2),
        "--strategy", "search", "--search-generations", 3, "--search-tokens", 300,
        "--search-eval-tokens", 300, "--search-heldout-tokens", 200, "--tokens", 1200,
    ]  # fmt: skip
    kill_run("call:linearize.surgery.prune.strategies.search._mutate:5", *args)
    assert not (out / "prune.json").exists()
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "prune.json").read_text())
    assert rec["strategy"] == "search" and len(rec["search"]["trace"]) == 4
    again = tmp_path / "q"
    assert cli_run(*[a if a != out else again for a in args]).exit_code == 0
    assert json.loads((again / "prune.json").read_text())["removed"] == rec["removed"]
    html = (out / "report.html").read_text()
    assert "search" in html and "KL" in html


def test_bad_search_settings_are_one_line(tmp_path, tiny_dir):
    from conftest import one_line

    res = cli_run(
        *prune_args(tiny_dir, tmp_path / "p"), "--strategy", "search", "--search-seeds", "nope"
    )
    one_line(res, "unknown strategy 'nope'")
