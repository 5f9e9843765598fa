"""linearize.arch, the one table that knows architectures: for every tiny family, it finds
the layers, their count's config key, and (where a fold is possible) each MLP's output
projection, and it refuses what it cannot handle."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, fixed_ids, make_tiny
from transformers import AutoConfig

from linearize import arch
from linearize.errors import LinearizeError


@pytest.mark.parametrize("model_type", ARCHS)
def test_layers_and_their_count_are_found(model_type):
    model = make_tiny(model_type)
    _, layers = arch.get_layers(model)
    assert (
        len(layers)
        == arch.n_layers(model)
        == getattr(model.config, arch.n_layers_key(model.config))
    )
    try:
        arch.check_foldable(model.config)
    except LinearizeError:
        return  # no projection added straight to the stream: fold refused in one line
    for p in range(len(layers)):
        proj = arch.mlp_out_proj(model, p)
        assert (
            proj.weight.shape[0] == model.config.hidden_size
            or proj.weight.shape[1] == model.config.hidden_size
        )


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_layers_removed_is_undone_on_exit(model_type):
    model = make_tiny(model_type)
    n = arch.n_layers(model)
    with torch.no_grad():
        before = model(fixed_ids()).logits
        with arch.layers_removed(model, [1]):
            assert arch.n_layers(model) == n - 1
            assert not torch.equal(model(fixed_ids()).logits, before)
        assert arch.n_layers(model) == n
        torch.testing.assert_close(model(fixed_ids()).logits, before)


def test_an_encoder_only_model_is_refused():
    config = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    with pytest.raises(LinearizeError, match="encoder-only"):
        arch.check_supported(config)
