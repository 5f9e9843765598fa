"""linearize.hooks: every hook comes off, whatever happens; record keeps what a pass saw."""

from __future__ import annotations

import pytest
import torch
from conftest import fixed_ids, make_tiny

from linearize import arch
from linearize.hooks import eval_mode, hooks, record


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_come_off_after_an_exception():
    model = make_tiny("llama")
    _, layers = arch.get_layers(model)
    before = _hook_count(model)

    def boom(module, args, kwargs, out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks(post=[(layers[1], boom)]):
        assert _hook_count(model) == before + 1
        model(fixed_ids())
    assert _hook_count(model) == before


def test_record_keeps_each_layers_input_and_output_of_the_last_pass():
    model = make_tiny("llama")
    _, layers = arch.get_layers(model)
    with torch.no_grad():  # transformers puts hooks of its own on at the first such pass
        model(fixed_ids(), output_hidden_states=True)
    before = _hook_count(model)
    with torch.no_grad(), record(inputs=list(layers), outputs=list(layers)) as rec:
        out = model(fixed_ids(), output_hidden_states=True)
    # a plain decoder stack: layer i's input is layer i-1's output, and HF's hidden_states[i]
    for i in range(len(layers)):
        torch.testing.assert_close(rec.inputs[i], out.hidden_states[i])
        if i:
            assert rec.inputs[i] is rec.outputs[i - 1]
    assert _hook_count(model) == before


def test_eval_mode_restores_the_training_flag_after_an_error():
    model = make_tiny("llama").train()
    with pytest.raises(ValueError), eval_mode(model):
        assert not model.training
        raise ValueError
    assert model.training
