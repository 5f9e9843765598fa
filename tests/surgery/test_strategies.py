"""The strategy registry: what a new strategy needs (one class), and the last-k baseline that
proves it."""

from __future__ import annotations

import pytest
from conftest import make_tiny

from linearize.errors import LinearizeError
from linearize.surgery.prune import PruneConfig, prune_model_, strategies
from linearize.surgery.prune.strategies.base import Strategy, register

KW = dict(tokens=400, seq_len=40, batch_size=4, calib="builtin:calib")


def test_every_strategy_says_what_it_is():
    names = strategies.names()
    assert names[0] == "linear-greedy" and "last-k" in names and len(set(names)) == len(names)
    for name in names:
        s = strategies.get(name)
        assert s.name == name and s.summary, name
    with pytest.raises(LinearizeError, match="unknown strategy 'nope'"):
        strategies.get("nope")


@pytest.mark.parametrize("replace", ["none", "linear", "fold"])
def test_last_k_removes_the_deepest_layers_but_the_final_one(replace, tokenizer):
    model = make_tiny("llama", num_hidden_layers=6)
    c = PruneConfig(remove=2, strategy="last-k", replace=replace, **KW)
    res = prune_model_(model, tokenizer, c)
    assert sorted(res.removed) == [3, 4] and res.chosen_by == "depth"
    assert len(model.model.layers) == 4


def test_last_k_keeps_protected_layers_and_takes_the_final_one_last(tokenizer):
    model = make_tiny("llama", num_hidden_layers=4)
    c = PruneConfig(remove=2, strategy="last-k", replace="none", protect=[2, 0], **KW)
    assert sorted(prune_model_(model, tokenizer, c).removed) == [1, 3]


def test_a_strategy_registered_later_is_one_class_and_is_validated_and_listed(tokenizer):
    @register
    class Shallow(Strategy):
        name = "test-first-k"
        summary = "the first k layers"

        def choose(self, s):
            return {p: None for p in range(s.k)}

    try:
        assert "test-first-k" in strategies.names()
        model = make_tiny("llama", num_hidden_layers=4)
        c = PruneConfig(remove=2, strategy="test-first-k", replace="none", **KW)
        assert prune_model_(model, tokenizer, c).removed == [0, 1]
    finally:
        strategies.base.REGISTRY.unregister("test-first-k")
    with pytest.raises(LinearizeError, match="unknown strategy 'test-first-k'"):
        PruneConfig(strategy="test-first-k").check(4)
