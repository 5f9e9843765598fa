"""The streaming statistics against the paper's stacked-matrix computation."""

import math

import pytest
import torch

from linearize.stats import (
    PairStats,
    SymmetricPinv,
    fit_affine,
    procrustes_linearity,
    typical_rows,
)


def _stream(x, y, chunk=37, x_source=None, fast=False):
    s = PairStats(x_source=x_source, fast=fast)
    for i in range(0, x.shape[0], chunk):
        s.update(x[i : i + chunk], y[i : i + chunk])
    return s


def _random_pair(n=500, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.tanh(x @ torch.randn(d, d, generator=g, dtype=torch.float64)) + 0.1 * x
    return x, y


def test_streaming_linearity_equals_svd_reference():
    x, y = _random_pair()
    s = _stream(x, y).scores()
    assert s["linearity"] == pytest.approx(procrustes_linearity(x, y), abs=1e-10)
    assert s["linearity_no_residual"] == pytest.approx(procrustes_linearity(x, y - x), abs=1e-10)
    assert 0.0 < s["linearity"] < 1.0


def test_exactly_linear_map_scores_one():
    x, _ = _random_pair()
    a = torch.randn(16, 16, dtype=torch.float64)
    y = x @ a + 5.0
    assert _stream(x, y).scores()["linearity"] == pytest.approx(1.0, abs=1e-12)


def test_rank_deficient_statistics_still_give_least_squares_answer():
    # fewer tokens than dimensions, and a dead dimension: a plain inverse would blow up
    x, y = _random_pair(n=10, d=16)
    x[:, 3] = 0.0
    s = _stream(x, y, chunk=3).scores()
    assert s["linearity"] == pytest.approx(procrustes_linearity(x, y), abs=1e-9)
    assert s["linearity"] == pytest.approx(1.0, abs=1e-9)  # n < d: trivially near 1


def test_dead_dimension_with_many_tokens_matches_reference():
    x, y = _random_pair(n=400, d=12, seed=3)
    x[:, 0] = 0.0
    x[:, 5] = 2.5  # constant: vanishes after centring
    got = _stream(x, y).scores()["linearity"]
    assert got == pytest.approx(procrustes_linearity(x, y), abs=1e-9)


def test_cosine_and_angle_match_direct_computation():
    x, y = _random_pair(n=200)
    s = _stream(x, y).scores()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert s["cosine"] == pytest.approx(float(cos.mean()), abs=1e-12)
    assert s["block_influence"] == pytest.approx(1 - float(cos.mean()), abs=1e-12)
    assert s["angular_distance"] == pytest.approx(
        float(torch.arccos(cos).mean() / math.pi), abs=1e-12
    )


def test_borrowed_input_moments_equal_own_moments():
    h0, h1 = _random_pair(seed=1)
    h2 = torch.sin(h1) + h1
    first = _stream(h0, h1)
    borrowed = _stream(h1, h2, x_source=first).scores()
    own = _stream(h1, h2).scores()
    for k in own:
        assert borrowed[k] == pytest.approx(own[k], abs=1e-12)


def test_batch_split_does_not_change_scores():
    x, y = _random_pair(n=333)
    a, b = _stream(x, y, chunk=1).scores(), _stream(x, y, chunk=333).scores()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12)


def test_fit_affine_recovers_map_and_bias():
    x, _ = _random_pair(n=300)
    w = torch.randn(16, 16, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    fit = fit_affine(_stream(x, x @ w + b))
    assert torch.allclose(fit.weight, w, atol=1e-9)
    assert torch.allclose(fit.bias, b, atol=1e-9)


def test_ridge_shrinks_the_fit():
    x, y = _random_pair(n=50)
    s = _stream(x, y)
    assert fit_affine(s, ridge=1.0).weight.norm() < fit_affine(s).weight.norm()


def test_anisotropy_matches_llm_microscope_definition():
    x, y = _random_pair()
    yc = y - y.mean(0)
    sv = torch.linalg.svdvals(yc) ** 2
    got = _stream(x, y).scores(anisotropy=True)["anisotropy"]
    assert got == pytest.approx(float(sv.max() / sv.sum()), abs=1e-12)


def test_pinv_solves_like_torch_pinv():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 6, generator=g, dtype=torch.float64)
    c = m.T @ m
    c[:, 2] = c[2, :] = 0.0
    b = torch.randn(6, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(SymmetricPinv(c).solve(b), torch.linalg.pinv(c) @ b, atol=1e-10)


def test_shape_mismatch_and_empty_are_refused():
    s = PairStats()
    with pytest.raises(ValueError):
        s.update(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="no tokens"):
        s.scores()


def test_affine_maps_compose_in_order():
    from linearize.stats import AffineMap

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = AffineMap(
        torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    )
    b = AffineMap(
        torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    )
    ab = a.then(b)
    assert torch.allclose(x @ ab.weight + ab.bias, (x @ a.weight + a.bias) @ b.weight + b.bias)


def _massive_residual_stream(n=4096, d=64, seed=0):
    """What breaks naive float32 moments: three massive dimensions with large means, and
    layer updates small next to the stream (cos ≈ 0.99)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:, :3] = h[:, :3] * 5 + torch.tensor([800.0, -1200.0, 400.0], dtype=torch.float64)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    states = [h]
    for _ in range(3):
        states.append(states[-1] + 0.05 * torch.tanh(states[-1] @ w) * states[-1].std(0))
    return [s.float() for s in states]


def test_float32_products_on_shifted_moments_stay_within_1e6_of_float64():
    states = _massive_residual_stream()
    chains = {}
    for fast in (False, True):
        prev, scores = None, []
        for x, y in zip(states[:-1], states[1:], strict=True):
            prev = _stream(x, y, chunk=512, x_source=prev, fast=fast)
            scores.append(prev.scores())
        chains[fast] = scores
    for exact, fast in zip(chains[False], chains[True], strict=True):
        for k in exact:
            assert fast[k] == pytest.approx(exact[k], abs=1e-6), k
    # and the float64 path equals the stacked SVD reference
    x, y = states[1].double(), states[2].double()
    assert chains[False][1]["linearity_no_residual"] == pytest.approx(
        procrustes_linearity(x, y - x), abs=1e-9
    )


def test_moments_about_zero_shift_are_the_same_statistics():
    from linearize.stats import unshift_

    h0, h1 = _random_pair(seed=2)
    h2 = torch.sin(h1) + h1
    first = _stream(h0, h1)
    second = _stream(h1, h2, x_source=first)
    before = [first.centered(), second.centered(), first.xy, second.yy]
    unshift_({0: first, 1: second})
    assert float(first.b.abs().max()) == 0.0 and float(second.a.abs().max()) == 0.0
    after = [first.centered(), second.centered(), first.xy, second.yy]
    for a, b in zip(before, after, strict=True):
        for u, v in zip(
            a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
        ):
            assert torch.allclose(u, v, rtol=1e-10, atol=1e-8)


def test_gram_and_row_angles():
    from linearize.stats import cosine_angle_from_norms, gram

    g = torch.Generator().manual_seed(3)
    v = torch.randn(50, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(gram(v), v.T @ v, atol=1e-12)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64)
    y = x + 1e-4 * torch.randn(40, 9, generator=g, dtype=torch.float64)  # nearly parallel
    y[0] = 0.0
    cos, angle = cosine_angle_from_norms(x.norm(dim=-1), y.norm(dim=-1), (y - x).norm(dim=-1))
    want = torch.nn.functional.cosine_similarity(x[1:], y[1:], dim=-1)
    assert torch.allclose(cos[1:], want, atol=1e-14)
    # the angle, where arccos of the cosine would have lost half its digits
    nx, ny = x[1:] / x[1:].norm(dim=-1, keepdim=True), y[1:] / y[1:].norm(dim=-1, keepdim=True)
    direct = 2 * torch.atan2((nx - ny).norm(dim=-1), (nx + ny).norm(dim=-1))
    assert torch.allclose(angle[1:], direct, rtol=1e-6, atol=0)
    assert cos[0] == 0.0 and angle[0] == pytest.approx(math.pi / 2)


def test_massive_rows_decide_the_score_and_typical_rows_leave_them_out():
    """A few rows of norm 10⁴× the rest, mapped linearly, make any layer look linear; the
    rows typical_rows keeps score as the clean rows alone do."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)
    y = x + torch.tanh(2 * x) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    sink = torch.randn(16, generator=g, dtype=torch.float64)
    xs = torch.cat([x, 1e4 * sink.expand(4, 16) + torch.randn(4, 16, generator=g)])
    ys = torch.cat([y, 2e4 * sink.expand(4, 16) + torch.randn(4, 16, generator=g)])
    keep = typical_rows(xs, ys, 10.0)
    assert keep.tolist() == [True] * 400 + [False] * 4
    assert procrustes_linearity(xs, ys) > 0.9999 > procrustes_linearity(x, y)
    s = PairStats()
    s.update(xs[keep], ys[keep])
    assert s.scores()["linearity"] == pytest.approx(procrustes_linearity(x, y), abs=1e-10)
