"""Text sampled from the model: one pool per model and settings on disk, which any token count
reads a prefix of and grows only by what no earlier run sampled."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from linearize import selfgen


@pytest.fixture
def sampled(monkeypatch) -> list[int]:
    """The indices of the batches sampled from here on, in order."""
    calls: list[int] = []
    real = selfgen._sample_batch

    def counting(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(selfgen, "_sample_batch", counting)
    return calls


def test_the_pool_is_shared_between_counts_and_grows_by_the_difference(
    tokenizer, tmp_path, monkeypatch, sampled
):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    m = make_tiny("llama", num_hidden_layers=2)
    small = selfgen.self_sequences(m, tokenizer, 24, 100, batch_size=2)
    first = len(sampled)
    assert sum(map(len, small)) == 100 and sampled == list(range(first))
    big = selfgen.self_sequences(m, tokenizer, 24, 250, batch_size=2)
    # only the difference was sampled, from the next batch on
    assert sum(map(len, big)) == 250 and sampled == list(range(len(sampled)))
    assert len(sampled) > first
    flat = [t for s in big for t in s]
    assert flat[:100] == [t for s in small for t in s]  # the smaller count is a prefix
    n = len(sampled)
    again = selfgen.self_sequences(m, tokenizer, 24, 250, batch_size=2)
    assert again == big and len(sampled) == n  # read back, nothing sampled
    assert len(list((tmp_path / "self-text").glob("*.json"))) == 1


def test_a_batch_is_the_same_whatever_came_before(tokenizer):
    m = make_tiny("llama", num_hidden_layers=2)
    a = selfgen._sample_batch(m, tokenizer, 20, 0, 2, 3)
    selfgen._sample_batch(m, tokenizer, 20, 0, 2, 0)  # other sampling in between
    assert selfgen._sample_batch(m, tokenizer, 20, 0, 2, 3) == a
    assert selfgen._sample_batch(m, tokenizer, 20, 0, 2, 4) != a
    assert [len(s) for s in a] == [20, 20]  # every row full, whatever its opening's length


@pytest.mark.parametrize("broken", ["{", '{"a": 1}', "[1, 2]"])
def test_a_broken_pool_file_is_sampled_again(broken, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    m = make_tiny("llama", num_hidden_layers=2)
    first = selfgen.self_sequences(m, tokenizer, 24, 48, batch_size=2)
    (pool,) = (tmp_path / "self-text").glob("*.json")
    pool.write_text(broken)
    with torch.no_grad():
        assert selfgen.self_sequences(m, tokenizer, 24, 48, batch_size=2) == first


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_the_nucleus_filter_equals_transformers_top_k_then_top_p(scale):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(16, 5000, generator=g) * scale
    scores[0, :100] = 3.0  # ties across the top-k border
    ids = torch.zeros(16, 1, dtype=torch.long)
    k, p = selfgen.SAMPLING["top_k"], selfgen.SAMPLING["top_p"]
    theirs = TopPLogitsWarper(p)(ids, TopKLogitsWarper(k)(ids, scores.clone()))
    ours = selfgen._TopKTopP(k, p)(ids, scores.clone())
    kept = torch.isfinite(ours)
    assert torch.equal(kept[1:], torch.isfinite(theirs)[1:])
    assert torch.equal(ours[kept], scores[kept])
    # a tie at the border: transformers keeps every tied logit, we keep k of them, all equal
    assert kept[0].sum() <= torch.isfinite(theirs[0]).sum()
    assert 0 < kept.sum(-1).min() and kept.sum(-1).max() <= k


def test_sampling_draws_what_transformers_generate_draws(tokenizer):
    """The cheaper filter changes the cost of sampling, not the text."""
    m = make_tiny("llama", num_hidden_layers=2)
    ours = selfgen._sample_batch(m, tokenizer, 20, 0, 2, 3)
    theirs_kw = dict(selfgen.SAMPLING)
    real = m.generate

    def plain(*args, **kw):
        kw.pop("logits_processor")
        return real(*args, **{**kw, **theirs_kw})

    m.generate = plain
    assert selfgen._sample_batch(m, tokenizer, 20, 0, 2, 3) == ours


def test_a_count_of_whole_batches_samples_just_those_batches(
    tokenizer, tmp_path, monkeypatch, sampled
):
    """Rows are full, so 3 batches' worth of tokens is 3 batches, not a fourth for the few
    tokens that padding would have cost."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    m = make_tiny("llama", num_hidden_layers=2)
    seqs = selfgen.self_sequences(m, tokenizer, 24, 3 * 2 * 24, batch_size=2)
    assert sampled == [0, 1, 2] and [len(s) for s in seqs] == [24] * 6
