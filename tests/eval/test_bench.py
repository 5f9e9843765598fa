"""linearize bench: every file written, one row per model, ratios to the first model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from typer.testing import CliRunner

from linearize.cli import app
from linearize.eval.bench import METRICS, BenchConfig, bench_loaded
from linearize.surgery.prune import PruneConfig, prune_model_
from linearize.surgery.replace import save

FAST = dict(batch_size=2, seq_len=32, prompt_len=8, new_tokens=6, repeats=3)


def test_bench_rows_for_original_and_pruned(tokenizer):
    full = make_tiny("llama", num_hidden_layers=4)
    pruned = make_tiny("llama", num_hidden_layers=4)
    prune_model_(pruned, tokenizer, PruneConfig(2, tokens=600, seq_len=48, batch_size=4))
    rows = bench_loaded(
        [("full", full, tokenizer, None), ("pruned", pruned, tokenizer, None)], BenchConfig(**FAST)
    )
    assert [r["model"] for r in rows] == ["full", "pruned"]
    assert [r["layers"] for r in rows] == [4, 2]
    assert rows[1]["params_m"] < rows[0]["params_m"]
    for m in METRICS[:4]:
        assert rows[0][f"{m}_ratio"] == pytest.approx(1.0)
        assert rows[1][m] > 0 and rows[1][f"{m}_min"] <= rows[1][m] <= rows[1][f"{m}_max"]


def test_bench_cli_writes_every_file(tmp_path, tiny_dir, tokenizer):
    pruned = make_tiny("llama")
    res = prune_model_(
        pruned, tokenizer, PruneConfig(1, replace="fold", tokens=600, seq_len=48, batch_size=4)
    )
    save(pruned, tokenizer, tmp_path / "p", {"removed": res.removed, "original_layers": 3})
    out = tmp_path / "b"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            str(tiny_dir),
            str(tmp_path / "p"),
            "--out",
            str(out),
            "--labels",
            "orig,fold",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--new-tokens",
            "4",
            "--repeats",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("bench.json", "bench.csv", "bench.md", "bench.png", "bench.html"):
        assert (out / name).stat().st_size > 0
    rep = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in rep["rows"]] == ["orig", "fold"]
    assert rep["rows"][1]["disk_mb"] < rep["rows"][0]["disk_mb"]
    assert len((out / "bench.csv").read_text().splitlines()) == 3


def test_bench_bad_input_is_one_line(tmp_path, tiny_dir):
    res = CliRunner().invoke(
        app, ["bench", str(tiny_dir), "--repeats", "0", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and res.output.startswith("error: ") and "repeats" in res.output
    res = CliRunner().invoke(
        app, ["bench", str(tiny_dir), "--labels", "a,b", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "labels" in res.output


def test_psutil_free_timing_still_works(monkeypatch, tokenizer):
    import linearize.eval.bench as b

    def no_psutil():
        raise ImportError

    monkeypatch.setattr(b, "_PeakRSS", no_psutil)
    m = make_tiny("llama")
    rows = bench_loaded([("m", m, tokenizer, None)], BenchConfig(**dict(FAST, repeats=1)))
    assert rows[0]["prefill_tok_s"] > 0 and rows[0]["peak_mem_mb"] != rows[0]["peak_mem_mb"]
    assert torch.is_tensor(next(m.parameters()))


def test_eval_speed_goes_to_results_and_compare(tmp_path, tiny_dir):
    from linearize.eval.compare import compare

    res = CliRunner().invoke(
        app, ["eval", str(tiny_dir), "--ppl", "", "--speed", "--out", str(tmp_path / "e")]
    )
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "e" / "results.json").read_text())
    assert got["speed"]["prefill_tok_s"] > 0 and got["speed"]["layers"] == 3
    rows = compare([str(tmp_path / "e")], tmp_path / "c")
    assert rows[0]["speed/prefill tok/s"] == got["speed"]["prefill_tok_s"]
    assert "speed/decode tok/s (b=1)" in (tmp_path / "c" / "compare.md").read_text()
