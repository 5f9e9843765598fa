"""The real embedded SmolLM2-135M (30 layers, d=576): exactness and the user's commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reference import reference_scores

from linearize.analyze import analyze_model

pytestmark = pytest.mark.slow


def test_streaming_scores_equal_svd_reference_on_8k_tokens(smollm2):
    model, tok = smollm2
    rep = analyze_model(model, tok, "builtin", 8192, 512, batch_size=4)
    ref = reference_scores(model, tok, "builtin", 512, 8192, batch_size=4)
    assert rep.tokens == 8192 and len(rep.layers) == 30
    worst = 0.0
    for got, want in zip(rep.layers, ref, strict=True):
        for key in ("linearity", "linearity_no_residual", "cosine", "angular_distance"):
            worst = max(worst, abs(got[key] - want[key]))
    assert worst <= 1e-5, worst
    mean = sum(r["linearity"] for r in rep.layers) / 30
    assert 0.9 < mean < 1.0  # the paper's finding: decoder layers are close to linear


def test_default_command_analyzes_embedded_model(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "linearize.cli", "analyze", "--tokens", "2048", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "linearize-out" / "analyze-smollm2-135m-instruct"
    rep = json.loads((out / "linearity.json").read_text())
    assert rep["model"] == "SmolLM2-135M-Instruct" and rep["tokens"] == 2048
    assert len(rep["layers"]) == 30 and (out / "report.html").exists()


@pytest.mark.parametrize("replace", ["none", "linear", "fold"])
def test_pruned_smollm2_saves_loads_and_generates(replace, smollm2, tmp_path):
    import copy

    import torch

    from linearize import arch, load
    from linearize.eval.perplexity import perplexity
    from linearize.surgery.prune import PruneConfig, prune_model_
    from linearize.surgery.replace import save

    model, tok = smollm2
    pruned = copy.deepcopy(model)
    cfg = PruneConfig(  # no text sampled from the model: tiny-model tests cover 'self'
        strategy="layers", layers=[14, 15, 16], replace=replace, tokens=2048, calib="builtin:calib"
    )
    prune_model_(pruned, tok, cfg)
    save(pruned, tok, tmp_path, {"removed": [14, 15, 16]})
    loaded, tok2 = load(str(tmp_path), dtype="float32", device="cpu")
    assert arch.n_layers(loaded) == 27 and loaded.config.num_hidden_layers == 27
    ids = tok2("The Python language", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-4)
    cached = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(
        cached, loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    )
    full = perplexity(model, tok, "builtin:eval", 512, 2048)
    cut = perplexity(loaded, tok2, "builtin:eval", 512, 2048)
    assert full < cut < 20 * full  # three middle layers cost something, not everything
