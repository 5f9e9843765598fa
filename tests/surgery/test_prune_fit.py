"""Fit targets, priors and the cached greedy restart (issue: pruning that generalises)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from conftest import fixed_ids, make_tiny

from linearize import arch, data
from linearize.capture import masked_rows
from linearize.stats import PairStats, fit_affine
from linearize.surgery.prune import PruneConfig, prune_model_
from linearize.surgery.replace import bridge_positions, get_bridge
from linearize.surgery.restart import BoundaryStore

KW = dict(tokens=1200, seq_len=48, batch_size=4, calib="builtin:calib")


class _AffineLayer(torch.nn.Module):
    def __init__(self, d, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(d, d, dtype=dtype)
        with torch.no_grad():  # near the identity, as a residual layer is
            self.proj.weight.copy_(
                torch.eye(d, dtype=dtype) + 0.2 * torch.randn(d, d, generator=g, dtype=dtype)
            )

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


def _linear_model(n=5):
    model = make_tiny("llama", torch.float64, num_hidden_layers=n)
    for i in range(1, n - 1):
        model.model.layers[i] = _AffineLayer(model.config.hidden_size, torch.float64, seed=i)
    return model


def _final_states(model, batches):
    """The last decoder layer's output (before the final norm) on each batch, masked rows."""
    out = []
    norm = arch.get_final_norm(model)
    keep = {}
    h = norm.register_forward_pre_hook(lambda m, args: keep.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                mask = b["attention_mask"].reshape(-1).bool()
                out.append(masked_rows(keep["x"], mask))
    finally:
        h.remove()
    return torch.cat(out)


def _calib_batches(tokenizer):
    seqs = list(data.token_sequences(tokenizer, KW["calib"], KW["seq_len"], KW["tokens"]))
    return list(data.batches(seqs, KW["batch_size"], data.pad_id_of(tokenizer)))


@pytest.mark.parametrize("layers", [[1, 3], [2, 3]])
def test_original_and_local_agree_when_layers_are_exactly_linear(tokenizer, layers):
    # named layers: greedy would pick among exact ties (every affine layer scores 1), by noise
    base = _linear_model()
    logits = []
    for target in ("local", "original"):
        m = copy.deepcopy(base)
        cfg = PruneConfig(2, strategy="layers", layers=layers, fit_target=target, **KW)
        cfg.reconstruct = 0  # the affine stand-in layers have no MLP to refit
        prune_model_(m, tokenizer, cfg)
        with torch.no_grad():
            logits.append(m(fixed_ids()).logits)
    with torch.no_grad():
        reference = base(fixed_ids()).logits
    assert (logits[0] - logits[1]).abs().max() <= 1e-6
    assert (logits[1] - reference).abs().max() <= 1e-6  # exact layers: nothing is lost


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("replace", ["linear", "fold"])
def test_original_target_gives_lower_downstream_error_than_local(tokenizer, k, replace):
    base = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=3)
    batches = _calib_batches(tokenizer)
    want = _final_states(base, batches)
    errors = {}
    for target in ("local", "original"):
        m = copy.deepcopy(base)
        cfg = PruneConfig(
            k,
            replace=replace,
            strategy="layers",
            layers={2: [1, 3], 3: [1, 3, 5]}[k],
            fit_target=target,
            reconstruct=0,  # the maps alone: the refits after them take up drift either way
            **KW,
        )
        prune_model_(m, tokenizer, cfg)
        errors[target] = float(
            (_final_states(m, batches) - want).square().sum() / want.square().sum()
        )
    assert errors["original"] < errors["local"], errors


@pytest.mark.parametrize("replace", ["linear", "fold", "none"])
@pytest.mark.parametrize("target", ["local", "original"])
def test_cached_restart_equals_full_rerun(tokenizer, replace, target):
    base = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=1)
    runs = []
    for restart in (True, False):
        m = copy.deepcopy(base)
        cfg = PruneConfig(3, replace=replace, fit_target=target, restart=restart, **KW)
        res = prune_model_(m, tokenizer, cfg)
        runs.append((m, res))
    (fast, r_fast), (full, r_full) = runs
    assert r_fast.removed == r_full.removed
    for a, b in zip(r_fast.steps, r_full.steps, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-9)
    assert bridge_positions(fast) == bridge_positions(full)
    for p_fast, p_full in zip(fast.parameters(), full.parameters(), strict=True):
        assert (p_fast - p_full).abs().max() <= 1e-6
    assert r_fast.calibration_passes < r_full.calibration_passes


def test_spilled_states_give_the_same_result(tokenizer):
    base = make_tiny("llama", torch.float64, num_hidden_layers=5, seed=2)
    outs = []
    for cache_gb in (4.0, 0.0):  # 0: every state goes through a safetensors file
        m = copy.deepcopy(base)
        res = prune_model_(
            m, tokenizer, PruneConfig(2, fit_target="original", cache_gb=cache_gb, **KW)
        )
        with torch.no_grad():
            outs.append(m(fixed_ids()).logits)
        spilled = res.state_spilled_mb
    assert spilled > 0
    assert torch.equal(outs[0], outs[1])


def test_refit_keeps_the_removals_and_lowers_the_final_error(tokenizer):
    base = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=3)
    batches = _calib_batches(tokenizer)
    want = _final_states(base, batches)
    errs = []
    for refit in (False, True):
        m = copy.deepcopy(base)
        res = prune_model_(m, tokenizer, PruneConfig(3, fit_target="original", refit=refit, **KW))
        errs.append(float((_final_states(m, batches) - want).square().sum()))
        assert len(res.removed) == 3
    assert errs[1] <= errs[0] * (1 + 1e-9)


def _random_stats(d=6, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        x
        @ (
            torch.eye(d, dtype=torch.float64)
            + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
        )
        + 1.5
    )
    s = PairStats()
    s.update(x, y)
    return s


def test_identity_prior_with_infinite_weight_is_the_identity_map():
    s = _random_stats()
    fit = fit_affine(s, ridge=math.inf, prior="identity")
    assert torch.equal(fit.weight, torch.eye(6, dtype=torch.float64))
    assert torch.allclose(fit.bias, (s.sy - s.sx) / s.n)  # only the mean shift is kept
    zero = fit_affine(s, ridge=math.inf, prior="zero")
    assert torch.equal(zero.weight, torch.zeros(6, 6, dtype=torch.float64))


def test_identity_prior_moves_from_least_squares_to_identity():
    s = _random_stats()
    ols = fit_affine(s).weight
    eye = torch.eye(6, dtype=torch.float64)
    dists = [
        float((fit_affine(s, ridge=r, prior="identity").weight - eye).norm())
        for r in (0.0, 0.1, 1.0, 100.0)
    ]
    assert dists[0] == pytest.approx(float((ols - eye).norm()), rel=1e-9)
    assert dists == sorted(dists, reverse=True) and dists[-1] < 0.05 * dists[0]


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_rank_limits_the_update_to_the_identity(rank):
    s = _random_stats()
    fit = fit_affine(s, rank=rank)
    update = fit.weight - torch.eye(6, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(update)) == rank
    full = fit_affine(s, rank=6)
    assert torch.allclose(full.weight, fit_affine(s).weight, atol=1e-10)


def test_boundary_store_spills_and_reads_back(tmp_path):
    store = BoundaryStore(ram_bytes=100, spill_dir=tmp_path)
    small, big = torch.ones(4), torch.arange(100.0)
    store.put(("a", 0), small)
    store.put(("b", 0), big)  # over the budget: to disk
    assert store.in_ram == 16 and store.spilled == 400
    assert torch.equal(store.get(("b", 0)), big) and torch.equal(store.get(("a", 0)), small)
    store.drop_where(lambda k: k[0] == "b")
    assert ("b", 0) not in store and ("a", 0) in store
    store.close()
    assert not any(tmp_path.iterdir())


def test_spilling_removes_the_states_of_runs_that_were_killed(tmp_path):
    """A run killed outright leaves its spill directory (its lock file, held by nobody); the
    next run that spills removes it. A live run's directory stays, even when its pid means
    nothing here (a run in another PID namespace: a container, another machine on a shared
    disk): what tells live from dead is the flock its owner holds, not the pid."""
    import fcntl
    import subprocess
    import sys

    child = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(child, text=True, capture_output=True, check=True).stdout.strip()
    orphan = tmp_path / f"linearize-states-{dead}-x1"
    elsewhere = tmp_path / f"linearize-states-{dead}-x2"  # same dead-looking pid, but alive
    legacy = tmp_path / f"linearize-states-{dead}-x3"  # no lock file: not ours to judge
    for d in (orphan, elsewhere, legacy):
        d.mkdir()
        (d / "o_1_0.safetensors").write_bytes(b"states")
    (orphan / ".lock").touch()
    holder = subprocess.Popen(  # another process holds elsewhere's lock, as its live run would
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(elsewhere / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        store = BoundaryStore(ram_bytes=0, spill_dir=tmp_path)
        store.put(("a", 0), torch.ones(4))
        assert not orphan.exists() and elsewhere.exists() and legacy.exists()
        own = [p for p in tmp_path.glob(f"linearize-states-{os.getpid()}-*")]
        assert len(own) == 1
        # the store's own directory is held for as long as it lives
        fd = os.open(own[0] / ".lock", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        store.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name, legacy.name]
    finally:
        holder.kill()
        holder.wait()
    later = BoundaryStore(ram_bytes=0, spill_dir=tmp_path)
    later.put(("a", 0), torch.ones(4))
    assert not elsewhere.exists()  # its run gone, the next spill removes it
    later.close()


def test_fortunes_source_is_prose_not_code():
    if data.default_ood() is None:
        pytest.skip("Debian's fortunes package is not installed")
    docs = list(data.iter_documents(data.resolve_source("fortunes")))
    assert len(docs) == len(data.FORTUNE_FILES)
    text = "".join(docs)
    assert len(text) > 500_000 and "\n%\n" not in text and "def " not in text[:20000]


def test_unknown_fit_target_and_prior_are_one_line_errors(tokenizer):
    from linearize.errors import LinearizeError

    m = make_tiny("llama", num_hidden_layers=3)
    with pytest.raises(LinearizeError, match="fit target"):
        prune_model_(m, tokenizer, PruneConfig(1, fit_target="global", **KW))
    with pytest.raises(LinearizeError, match="prior"):
        prune_model_(m, tokenizer, PruneConfig(1, prior="one", **KW))
    with pytest.raises(LinearizeError, match="rank"):
        prune_model_(m, tokenizer, PruneConfig(1, rank=-1, **KW))


def test_bridges_fitted_to_the_original_replace_rather_than_compose(tokenizer):
    m = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=4)
    prune_model_(
        m, tokenizer, PruneConfig(2, strategy="layers", layers=[2, 3], fit_target="original", **KW)
    )
    assert bridge_positions(m) == [2] and get_bridge(m, 2) is not None


def test_self_text_mixes_in_is_cached_and_reproducible(tokenizer, tmp_path, monkeypatch):
    from linearize.selfgen import calibration_sequences

    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    m = make_tiny("llama", num_hidden_layers=2)
    seqs = calibration_sequences(m, tokenizer, "builtin:calib+self", 48, 1000)
    assert sum(map(len, seqs)) == 1000
    calib = list(data.token_sequences(tokenizer, "builtin:calib", 48, 500))
    assert seqs[0::2][: len(calib)] == calib  # interleaved: part 1, part 2, part 1, …
    cached = list((tmp_path / "self-text").glob("*.json"))
    assert len(cached) == 1
    assert calibration_sequences(m, tokenizer, "builtin:calib+self", 48, 1000) == seqs
    with torch.no_grad():  # other weights: another cache entry, other text
        next(m.parameters()).add_(0.1)
    assert calibration_sequences(m, tokenizer, "builtin:calib+self", 48, 1000) != seqs
    assert len(list((tmp_path / "self-text").glob("*.json"))) == 2


def test_bad_calibration_part_is_one_line_error():
    from linearize.errors import LinearizeError

    with pytest.raises(LinearizeError, match="not found"):
        data.calib_parts("builtin:calib+./missing.txt")
    with pytest.raises(LinearizeError, match="empty part"):
        data.calib_parts("builtin:calib+")
    assert data.calib_parts("builtin:calib+self") == ["builtin:calib", "self"]


def test_rescoring_on_fewer_tokens_keeps_every_fit_on_all_of_them(tokenizer):
    # seed 2: a model on which the first batch alone ranks the layers as every token does
    base = make_tiny("llama", torch.float64, num_hidden_layers=6, seed=2)
    runs = []
    for rescore in (0, 300):  # 0: every token re-scores; 300: the first batch only
        m = copy.deepcopy(base)
        cfg = PruneConfig(3, fit_target="original", rescore_tokens=rescore, **KW)
        runs.append((m, prune_model_(m, tokenizer, cfg)))
    (full, r_full), (few, r_few) = runs
    assert r_few.calibration_passes < r_full.calibration_passes
    assert r_few.steps[0]["score"] == r_full.steps[0]["score"]  # the first pass sees every token
    assert r_few.steps[1]["score"] != pytest.approx(r_full.steps[1]["score"], abs=1e-12)
    # the same removals in the same order: then the maps, fitted on every token, are the same
    assert r_few.removed == r_full.removed
    for p_few, p_full in zip(few.parameters(), full.parameters(), strict=True):
        assert (p_few - p_full).abs().max() <= 1e-9


def test_a_norm_weighted_fold_fits_the_direction_the_next_layer_reads(tokenizer):
    """--fit-weight norm weighs each token by 1/‖target‖: a different fold than plain least
    squares, of the same model and cut; an unknown weighting is one line."""
    from linearize import arch

    folds = {}
    for weight in ("none", "norm"):
        m = make_tiny("llama", num_hidden_layers=5, seed=2)
        cfg = PruneConfig(1, strategy="layers", layers=[2], replace="fold", reconstruct=0,
                          fit_weight=weight, **KW)  # fmt: skip
        prune_model_(m, tokenizer, cfg)
        folds[weight] = arch.mlp_out_proj(m, 1).weight.detach().clone()
    assert not torch.allclose(folds["none"], folds["norm"])
    with pytest.raises(Exception, match="fit-weight"):
        PruneConfig(1, fit_weight="cosine").check(5)
