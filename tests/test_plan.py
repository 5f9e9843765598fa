"""Plans before the work (``--dry-run``): from a config alone, on the meta device, in seconds,
for models far too large for this machine; and a run whose plan does not fit is refused in
one line before any work."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import cli_run, one_line, prune_args
from transformers import AutoConfig

from linearize import plan
from linearize.surgery.prune import PruneConfig

# published shapes; parameter counts from their model cards
LARGE = {
    "llama-3.1-8b": (
        dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             tie_word_embeddings=False),
        8.03e9,
    ),
    "llama-3.1-70b": (
        dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
             tie_word_embeddings=False),
        70.6e9,
    ),
    "qwen3-30b-a3b": (
        dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
             moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
             vocab_size=151936, tie_word_embeddings=False),
        30.5e9,
    ),
}  # fmt: skip


def _config_dir(tmp_path, name):
    kw, _ = LARGE[name]
    d = tmp_path / name
    d.mkdir()
    AutoConfig.for_model(**kw).save_pretrained(d)
    return d


@pytest.mark.parametrize("name", list(LARGE))
def test_a_large_model_is_planned_from_its_config_alone_in_seconds(name, tmp_path):
    d = _config_dir(tmp_path, name)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    t0 = time.perf_counter()
    res = cli_run("prune", d, "--remove", "8", "--dry-run", "--out", tmp_path / "never")
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "never").exists()
    assert "peak RAM" in res.stdout and "disk" in res.stdout
    assert "\n  time" not in res.stdout  # no weights here: no timed forward
    config = AutoConfig.from_pretrained(d)
    shape = plan.shape_of(config, torch.bfloat16)
    assert abs(shape.params / LARGE[name][1] - 1) < 0.02, shape.params
    p = plan.prune_plan(config, name, PruneConfig(remove=8), 16384, torch.bfloat16)
    # one pass's boundary states: (n + 1) × tokens × d × 2 bytes; greedy re-scores 8,192 of
    # the 131,072 tokens after each cut: 1 + 0.05 + 0.6 × 1/16 copies at most
    one = (shape.layers + 1) * 131072 * shape.hidden * 2
    assert p.parts["stored states"] + p.spill_disk == int(one * 1.0875)
    assert p.peak_ram > shape.weights


def test_every_command_plans_a_config_only_directory(tmp_path):
    d = _config_dir(tmp_path, "llama-3.1-8b")
    for args in (["analyze", d], ["compress", d, "--remove", "4"]):
        res = cli_run(*args, "--dry-run")
        assert res.exit_code == 0 and "plan for linearize" in res.stdout, res.output


def test_the_plan_of_a_tiny_prune_bounds_what_it_stored(tiny_dir, tmp_path):
    res = cli_run(*prune_args(tiny_dir, tmp_path / "p"), "--cache-gb", "0")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "p" / "prune.json").read_text())
    config = AutoConfig.from_pretrained(tiny_dir)
    c = PruneConfig(**{k: rec[k] for k in ("remove", "tokens", "seq_len", "batch_size", "calib")})
    c.cache_gb = 0
    p = plan.prune_plan(config, "tiny", c, 300, torch.float32)
    one = p.spill_disk / plan.state_copies(c, c.tokens)
    peak = rec["state_disk_peak_mb"] * 2**20
    assert 0 < peak <= rec["state_spilled_mb"] * 2**20
    assert 0.9 * one <= peak <= plan.STATE_COPIES_BOUND * one * 1.1
    res = cli_run(
        "distill", tmp_path / "p", "--teacher", tiny_dir, "--dry-run", "--out", tmp_path / "d"
    )
    assert res.exit_code == 0 and "plan for linearize distill" in res.stdout, res.output
    assert "\n  time" in res.stdout and not (tmp_path / "d").exists()  # weights here: timed


def test_a_prune_that_does_not_fit_the_disk_is_refused_before_any_work(
    tiny_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(plan, "free_disk", lambda where: 1000)
    res = cli_run(*prune_args(tiny_dir, tmp_path / "p"), "--cache-gb", "0")
    line = one_line(res, "of disk", "--cache-gb", "--tokens")
    assert "is free" in line
    assert not (tmp_path / "p" / "prune.json").exists()


def test_a_prune_that_does_not_fit_the_ram_names_cache_gb(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "total_ram", lambda: 1 << 20)
    res = cli_run(*prune_args(tiny_dir, tmp_path / "p"))
    one_line(res, "of RAM", "--cache-gb")


def test_a_bfloat16_model_stores_its_states_in_half_the_bytes(tiny_dir, tmp_path):
    spilled = {}
    for dtype in ("float32", "bfloat16"):
        args = prune_args(tiny_dir, tmp_path / dtype)
        res = cli_run(*args, "--cache-gb", "0", "--dtype", dtype, "--tokens", "6000")
        assert res.exit_code == 0, res.output
        spilled[dtype] = json.loads((tmp_path / dtype / "prune.json").read_text())[
            "state_spilled_mb"
        ]
    assert spilled["float32"] > 0
    assert abs(spilled["bfloat16"] / spilled["float32"] - 0.5) < 0.05, spilled
